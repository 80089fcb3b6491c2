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
"""
# Implementation: a thin dispatcher. Each command module defines ``add_arguments(parser)`` and
# ``main(args) -> int`` and is imported only when its command runs, so ``abvid --help`` stays fast.
from __future__ import annotations

import argparse
import importlib
import sys

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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add(sub, name: str, module: str, help_: str) -> None:
    mod = importlib.import_module(module)
    p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(), formatter_class=_Formatter)
    mod.add_arguments(p)
    p.set_defaults(_main=mod.main)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abvid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module of the command being run (others get a stub entry for --help).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        if name == wanted:
            _add(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_)
    bench = sub.add_parser("bench", help="benchmarks: throughput and its ratio to a bound measured in the same run")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench_wanted = argv[argv.index("bench") + 1] if wanted == "bench" and argv.index("bench") + 1 < len(argv) else None
    for name, (module, help_) in BENCHES.items():
        if name == bench_wanted:
            _add(bsub, name, module, help_)
        else:
            bsub.add_parser(name, help=help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    fn = getattr(args, "_main", None)
    if fn is None:
        parser.print_help()
        return EXIT_USAGE
    from abvid.pipeline.config import ConfigError
    from abvid.pipeline.errors import AbvidError
    try:
        return int(fn(args) or 0)
    except ConfigError as e:
        print(f"abvid {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AbvidError as e:          # expected failures: one line naming the culprit and the fix
        print(f"abvid {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"abvid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
