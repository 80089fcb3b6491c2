"""Decode videos into WebDataset shards of clips: frames resampled to --fps, short side --size.

Examples:
  abvid preprocess videos/ --out shards/                       # a folder, recursively
  abvid preprocess 'raw/**/*.mp4' list.txt --out shards/ --fps 2 --size 224
  abvid preprocess list.csv --out shards/ --slice 3/8          # slice 3 of 8 (0-based), run anywhere

Inputs are files, folders (searched recursively for video extensions), globs, and list
files (.txt one path per line; .csv / .jsonl with a 'path' column). One sample = one clip
of --clip-len consecutive frames, key <video_id>-<clip:06d>, files <key>.000.jpg ... and
<key>.json (pts, source, size, overlapping annotations). Frames after the last full clip
are dropped (counted as tail frames). Shards <prefix>-NNNNNN.tar hold whole videos and are
renamed from .tar.tmp when complete; manifest.jsonl has one row per input (ok / failed
with the reason / skipped), stats.json the totals. With --slice or --prefix the manifest,
stats and settings files are named <prefix>-manifest.jsonl etc.

Each video is decoded in a worker process: a decoder that crashes or runs past --timeout
fails that video only. Rerunning the same command resumes: videos the manifest lists as ok
are not decoded again, --retry-failed decodes the failed ones again; a run killed at any
moment (even SIGKILL) leaves only complete shards, and the rerun ends with the same samples.

Exit codes: 0 every input ok (or skipped); 1 some inputs failed (see the manifest);
2 usage error (bad option, unreadable list or annotation file, nothing to do, settings
differ from the run that wrote --out); 3 the job failed (every input failed, output locked).
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from abvid.tools.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE

if TYPE_CHECKING:   # the pipeline is imported only when the command runs (fast --help)
    from abvid.pipeline.preprocess import Stats


def _size(text: str) -> int:
    """'256MB', '1GB', '2GiB', '500k', '1000000' -> bytes (k/M/G/T powers of 1000, KiB/MiB/GiB of 1024)."""
    t = text.strip().lower().removesuffix("b")
    base = 1024 if t.endswith("i") else 1000
    t = t.removesuffix("i")
    units = {"k": base, "m": base**2, "g": base**3, "t": base**4}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 256MB, 1GB, 1000000)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders, globs or list files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    g = p.add_argument_group("frames and clips")
    g.add_argument("--fps", type=float, default=4.0, help="target frame rate (0 keeps every source frame)")
    g.add_argument("--size", type=int, default=256, help="short side of stored frames in pixels (0 keeps the size)")
    g.add_argument("--clip-len", type=int, default=16, help="frames per sample (clip)")
    g.add_argument("--clip-stride", type=int, default=0,
                   help="frames between the starts of consecutive clips (0 = --clip-len: no overlap)")
    g.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="frame image format")
    g.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality 1-100 (webp 100 = lossless)")
    g.add_argument("--annotations", metavar="FILE",
                   help="CSV/JSONL with video,start_s,end_s,label|text; rows overlapping a clip go in its JSON")
    g = p.add_argument_group("shards").add_mutually_exclusive_group()
    g.add_argument("--shard-clips", type=int, default=0, help="close a shard once it holds this many clips; 0 = no clip limit (shards then close at "
                        "--shard-bytes). Small shards give one-pass readers (data.resampled=false) enough shards")
    g.add_argument("--shard-bytes", type=_size, default=256_000_000,
                   help="close a shard once it holds this many bytes (e.g. 256MB, 1GB); ignored with --shard-clips")
    g = p.add_argument_group("running")
    g.add_argument("--prefix", default="", help="shard name prefix (default shard, or shard-I-of-N with --slice)")
    g.add_argument("--workers", type=int, default=0, help="decoder processes (0 = one per core)")
    g.add_argument("--threads", type=int, default=0, help="decoder threads per worker (0 = cores / workers)")
    g.add_argument("--backend", choices=("auto", "pyav", "decord"), default="auto",
                   help="decoder (auto: PyAV, decord when PyAV yields nothing)")
    g.add_argument("--slice", metavar="I/N", default="",
                   help="process only slice I of N (0-based) of the inputs; N jobs with I=0..N-1 cover all once")
    g.add_argument("--retry-failed", action="store_true", help="decode inputs the manifest lists as failed again")
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds per video before it fails (0 = none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Fault-injection seam for tests (see pipeline/preprocess.py): module:function called per video.
    p.add_argument("--decode-hook", default="", help=argparse.SUPPRESS)


def format_summary(stats: Stats) -> str:
    """The closing table of ``abvid preprocess``."""
    t = stats.to_json()["throughput"]
    lines = [("inputs", stats.inputs), ("ok (this run)", stats.ok - stats.resumed),
             ("ok (earlier runs)", stats.resumed), ("failed", stats.failed), ("skipped", stats.skipped),
             ("frames", stats.frames), ("clips", stats.clips), ("tail frames dropped", stats.tail_frames),
             ("decode errors", stats.decode_errors), ("new shards", len(stats.shards)),
             ("MB written", f"{stats.bytes / 1e6:.1f}"), ("seconds", f"{stats.seconds:.1f}"),
             ("source frames/s", t["source_frames_per_s"])]
    lines += [(f"  failed: {k}", v) for k, v in sorted(stats.failures_by_reason.items())]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines) + f"\nmanifest: {stats.manifest}"


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.annotations import AnnotationError
    from abvid.pipeline.inputs import InputError, parse_slice
    from abvid.pipeline.preprocess import JobError, PreprocessConfig, UsageError, run_preprocess

    try:
        si, sn = parse_slice(args.slice) if args.slice else (0, 1)
        cfg = PreprocessConfig(
            fps=args.fps or None, size=args.size or None, clip_len=args.clip_len, clip_stride=args.clip_stride,
            format=args.format, quality=args.quality,
            shard_clips=args.shard_clips, shard_bytes=0 if args.shard_clips else args.shard_bytes,
            workers=args.workers, threads=args.threads, backend=args.backend, annotations=args.annotations,
            slice_index=si, slice_count=sn, retry_failed=args.retry_failed, timeout_s=args.timeout,
            prefix=args.prefix, decode_hook=args.decode_hook)
        stats = run_preprocess(args.inputs, args.out, cfg, progress=not args.no_progress)
    except (UsageError, InputError, AnnotationError) as e:
        print(f"abvid preprocess: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        print(f"abvid preprocess: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:   # the output folder itself: disk full, permissions; rerun resumes after a fix
        print(f"abvid preprocess: failed writing {args.out}: {e}; fix it and rerun the same command to resume",
              file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(stats))
    if stats.inputs and stats.ok == 0 and stats.failed:
        return EXIT_FAILED
    return EXIT_PARTIAL if stats.failed else EXIT_OK
