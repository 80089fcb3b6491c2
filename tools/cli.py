"""abvid: pre-train visual encoders on unlabeled video with annotation bootstrapping.

The three jobs:
  1. abvid preprocess VIDEOS... --out SHARDS        videos -> WebDataset shards of frames
  2. abvid pretrain CONFIG.yaml --out RUN           train an encoder on frame transitions
  3. abvid embed --checkpoint CKPT VIDEOS... --out EMB, then abvid probe --embeddings EMB --labels L.csv
Also: toy-corpus (synthetic videos to try it on), export, inspect, ablate, bench.
`abvid COMMAND --help` explains each command's options.

Exit codes (all commands):
    0  success
    1  the job ran but some inputs failed (listed in the manifest / report)
    2  usage or configuration error (bad flag, unknown config key, missing file)
    3  the job itself failed (e.g. training diverged, no usable input at all)

Every expected failure prints one line on stderr that names the file, key or
option at fault and what to do. Anything else is a bug in abvid: one line says
so and names a log file holding the full traceback (--debug prints it instead).
"""
# Implementation: a thin dispatcher. Each command module defines ``add_arguments(parser)`` and
# ``main(args) -> int`` and is imported only when its command runs, so ``abvid --help`` stays fast.
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "toy-corpus": ("abvid.tools.toy_corpus", "generate a synthetic H.264 video corpus with annotations"),
    "preprocess": ("abvid.tools.cmd_preprocess", "decode videos into WebDataset shards of resampled, resized frames"),
    "pretrain": ("abvid.tools.cmd_pretrain", "pre-train an encoder with annotation bootstrapping (CPU, GPU, torchrun)"),
    "embed": ("abvid.tools.cmd_embed", "write per-frame embeddings of videos or shards"),
    "probe": ("abvid.tools.cmd_probe", "linear / k-NN probe of embeddings against frame labels"),
    "export": ("abvid.tools.cmd_export", "write the encoder of a checkpoint alone (safetensors)"),
    "inspect": ("abvid.tools.cmd_inspect", "summarise shards and draw a contact sheet of clips and sampled views"),
    "ablate": ("abvid.tools.cmd_ablate", "seeded ablation of annotation bootstrapping: runs, probes, table"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "preprocess": ("abvid.tools.bench.preprocess", "preprocessing frames/s vs decode-only"),
    "loader": ("abvid.tools.bench.loader", "transition loader views/s vs JPEG decode alone"),
    "train": ("abvid.tools.bench.train", "bootstrapped step time vs base-method step time"),
    "embed": ("abvid.tools.bench.embed", "embedding frames/s vs min(decode-only, model-only)"),
}


EXIT_CODES_EPILOG = """Exit codes: 0 done; 2 usage error (bad option, missing or unreadable input,
output path that is a file); 3 the job failed. An unexpected error (a bug)
exits 3 and names a log file with the traceback."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' only where there is a default worth showing: not for required options,
    flags (store_true) or options whose default is None (their help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.nargs == 0 or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help or ""
        return super()._get_help_string(action)


def version() -> str:
    """The installed distribution's version ('unknown' when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v
    try:
        return _v("abvid")
    except PackageNotFoundError:
        return "unknown"


def _add(sub, name: str, module: str, help_: str) -> None:
    mod = importlib.import_module(module)
    description = (mod.__doc__ or help_).strip()
    p = sub.add_parser(name, help=help_, description=description, formatter_class=_Formatter,
                       epilog=None if "Exit codes" in description else EXIT_CODES_EPILOG)
    mod.add_arguments(p)
    p.set_defaults(_main=mod.main)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abvid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"abvid {version()}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (anywhere on the line; "
                             "or set ABVID_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module of the command being run (others get a stub entry for --help).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        if name == wanted:
            _add(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_)
    bench = sub.add_parser("bench", help="benchmarks: throughput and its ratio to a bound measured in the same run",
                           epilog=EXIT_CODES_EPILOG)
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench_wanted = argv[argv.index("bench") + 1] if wanted == "bench" and argv.index("bench") + 1 < len(argv) else None
    for name, (module, help_) in BENCHES.items():
        if name == bench_wanted:
            _add(bsub, name, module, help_)
        else:
            bsub.add_parser(name, help=help_)
    return parser


def one_line(e: BaseException) -> str:
    """The message of an expected error, as one line.

    An error raised inside a DataLoader worker reaches the main process re-created with the
    worker's traceback as its message ('Caught JobError in DataLoader worker process 0.
    Original Traceback ...'): keep the original message, the text after the last 'Type: '.
    """
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(f"{type(e).__name__}: ", 1)[-1]
    return " ".join(text.split())


def crash_log(command: str, argv: list[str]) -> Path:
    """Write the current exception's traceback to a log file; returns its path.

    The folder is $ABVID_LOG_DIR, else the system temp folder; the name carries the command,
    the time and the process id, so concurrent runs never share a file.
    """
    import platform
    import tempfile
    import time

    folder = Path(os.environ.get("ABVID_LOG_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"abvid-crash-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"abvid {version()} on Python {platform.python_version()} ({platform.platform()})\n"
                    f"command line: abvid {' '.join(argv)}\n\n{traceback.format_exc()}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("ABVID_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    fn = getattr(args, "_main", None)
    if fn is None:
        parser.print_help()
        return EXIT_USAGE
    from abvid.pipeline.config import ConfigError
    from abvid.pipeline.errors import AbvidError
    command = args.command + (f" {args.bench}" if getattr(args, "bench", None) else "")
    try:
        return int(fn(args) or 0)
    except AbvidError as e:          # expected failures: one line naming the culprit and the fix
        if debug:
            traceback.print_exc()
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"abvid {command}: {kind}{one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"abvid {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- anything else is a bug: one line, the traceback in a file
        if debug:
            traceback.print_exc()
            print(f"abvid {command}: unexpected error (a bug in abvid): {type(e).__name__}: {one_line(e)}",
                  file=sys.stderr)
            return EXIT_FAILED
        try:
            where = f"the traceback is in {crash_log(command.replace(' ', '-'), argv)}"
        except OSError as log_error:
            where = f"(could not write a crash log: {log_error})"
        print(f"abvid {command}: unexpected error (a bug in abvid, please report it): {type(e).__name__}: "
              f"{one_line(e)[:300]}; {where}; rerun with --debug to see it here", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
