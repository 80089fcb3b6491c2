"""Decode videos into WebDataset shards of clips: frames resampled to --fps, short side --size.

Examples:
  abvid preprocess videos/ --out shards/                       # a folder, recursively
  abvid preprocess 'raw/**/*.mp4' list.txt --out shards/ --fps 2 --size 224
  abvid preprocess list.csv --out shards/ --slice 3/8          # slice 3 of 8 (0-based), run anywhere
  abvid preprocess list.csv --out /shared/shards --executor ray  # every video a task on a Ray cluster

Inputs are files, folders (searched recursively for video extensions), globs, and list
files (.txt one path per line; .csv / .jsonl with a 'path' column). One sample = one clip
of --clip-len consecutive frames, key <video_id>-<clip:06d>, files <key>.000.jpg ... and
<key>.json (pts, source, size, overlapping annotations). Frames after the last full clip
are dropped (counted as tail frames). Shards <prefix>-NNNNNN.tar hold whole videos and are
renamed from .tar.tmp when complete; manifest.jsonl has one row per input (ok / failed
with the reason / skipped), stats.json the totals. With --slice or --prefix the manifest,
stats and settings files are named <prefix>-manifest.jsonl etc.

Each video is decoded in a worker process: a decoder that crashes or runs past --timeout
fails that video only. Videos shorter than one clip are skipped (reason "too short").

--executor ray runs the same per-video work as Ray tasks on the workers of a cluster
(--ray-address, else RAY_ADDRESS, else a local Ray): each worker writes its own shards
(<prefix>-rayNNN-NNNNNN.tar) into --out, which must be a folder every node shares; this
process keeps the manifest. A worker (process or node) that is lost mid-video is retried
--retries times, then the video is failed with reason "lost worker". The local and the Ray
executor write the same keys and bytes, so either resumes the other's run. Rerunning the same command resumes: videos the manifest lists as ok
are not decoded again, --retry-failed decodes the failed ones again; a run killed at any
moment (even SIGKILL) leaves only complete shards, and the rerun ends with the same samples.

Exit codes: 0 every input ok (or skipped) and some clips exist; 1 some inputs failed (see
the manifest); 2 usage error (bad option, an input path that does not exist, unreadable list
or annotation file, nothing to do, --out is a file, settings differ from the run that wrote
--out, a Ray cluster that does not answer); 3 the job failed (no usable clip written by this
run or earlier ones: every input failed or was too short; output locked).
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from abvid.tools.cli import EXIT_OK, EXIT_PARTIAL

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
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS,
                   help="output folder (created; reused to resume); required")
    g = p.add_argument_group("frames and clips")
    g.add_argument("--fps", type=float, default=4.0, help="target frame rate (0 keeps every source frame)")
    g.add_argument("--size", type=int, default=256, help="short side of stored frames in pixels (0 keeps the size)")
    g.add_argument("--clip-len", type=int, default=16, help="frames per sample (clip)")
    g.add_argument("--clip-stride", type=int, default=0,
                   help="frames between the starts of consecutive clips (0 = --clip-len: no overlap)")
    g.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="frame image format")
    g.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality 1-100 (webp 100 = lossless)")
    g.add_argument("--annotations", metavar="FILE", default=argparse.SUPPRESS,
                   help="CSV/JSONL with video,start_s,end_s,label|text; rows overlapping a clip go in its JSON")
    g = p.add_argument_group("shards").add_mutually_exclusive_group()
    g.add_argument("--shard-clips", type=int, default=0,
                   help="close a shard once it holds this many clips; 0 = no clip limit (shards then close at "
                        "--shard-bytes). Small shards give one-pass readers (data.resampled=false) enough shards")
    g.add_argument("--shard-bytes", type=_size, default=256_000_000,
                   help="close a shard once it holds this many bytes (e.g. 256MB, 1GB); ignored with --shard-clips")
    g = p.add_argument_group("running")
    g.add_argument("--prefix", default=argparse.SUPPRESS, help="shard name prefix (default shard, or shard-I-of-N with --slice)")
    g.add_argument("--workers", type=int, default=0,
                   help="decoder processes (0 = one per core; with --executor ray: one per CPU of the cluster)")
    g.add_argument("--threads", type=int, default=0, help="decoder threads per worker (0 = cores / workers)")
    g.add_argument("--backend", choices=("auto", "pyav", "decord"), default="auto",
                   help="decoder (auto: PyAV, decord when PyAV yields nothing)")
    g.add_argument("--slice", metavar="I/N", default=argparse.SUPPRESS,
                   help="process only slice I of N (0-based) of the inputs; N jobs with I=0..N-1 cover all once")
    g.add_argument("--retry-failed", action="store_true", help="decode inputs the manifest lists as failed again")
    g.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a worker may spend on one video before it fails (0 = none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("executor")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: worker processes on this machine; ray: Ray tasks across a cluster (pip install "
                        "'abvid[ray]')")
    g.add_argument("--ray-address", default=argparse.SUPPRESS, metavar="ADDR",
                   help="Ray cluster to join: host:port of its head or 'auto' (default: RAY_ADDRESS if set, else "
                        "a local Ray)")
    g.add_argument("--retries", type=int, default=2,
                   help="--executor ray: times a video is retried when its worker process or node is lost")
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
    lines += [(f"  skipped: {k}", v) for k, v in sorted(stats.skipped_by_reason.items())]
    for node, n in sorted(stats.by_node.items()):   # this run's videos per machine
        lines.append((f"  node {node}", f"{n['videos']} videos ({n['failed']} failed), {n['frames']} frames, "
                                        f"{n['seconds']:.1f} worker-s"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines) + f"\nmanifest: {stats.manifest}"


def nothing_usable(stats: Stats, clip_len: int) -> str:
    """Why no clip exists for these inputs (this run's and earlier runs' together), or "" if some do."""
    if stats.clips > 0 or stats.inputs == 0:   # (an empty --slice of a job array has nothing to do)
        return ""
    why = []
    if stats.failed:
        why.append(f"{stats.failed} failed ({', '.join(f'{k}: {v}' for k, v in sorted(stats.failures_by_reason.items()))})")
    if short := stats.skipped_by_reason.get("too short", 0):
        why.append(f"{short} shorter than one clip of {clip_len} frames (lower --clip-len or raise --fps)")
    return (f"nothing usable was written: {stats.inputs} inputs gave 0 clips; " + "; ".join(why or ["no input left"])
            + f"; see {stats.manifest}")


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.annotations import AnnotationError
    from abvid.pipeline.errors import JobError, UsageError
    from abvid.pipeline.inputs import parse_slice
    from abvid.pipeline.preprocess import PreprocessConfig, run_preprocess

    si, sn = parse_slice(args.slice) if getattr(args, "slice", "") else (0, 1)
    cfg = PreprocessConfig(
        fps=args.fps or None, size=args.size or None, clip_len=args.clip_len, clip_stride=args.clip_stride,
        format=args.format, quality=args.quality,
        shard_clips=args.shard_clips, shard_bytes=0 if args.shard_clips else args.shard_bytes,
        workers=args.workers, threads=args.threads, backend=args.backend,
        annotations=getattr(args, "annotations", None), slice_index=si, slice_count=sn,
        retry_failed=args.retry_failed, timeout_s=args.timeout, prefix=getattr(args, "prefix", ""),
        decode_hook=args.decode_hook, executor=args.executor, ray_address=getattr(args, "ray_address", ""),
        retries=args.retries)
    if not args.no_progress or args.executor == "ray":
        _log_to_stderr()
    try:
        stats = run_preprocess(args.inputs, args.out, cfg, progress=not args.no_progress)
    except AnnotationError as e:
        raise UsageError(str(e)) from None
    except OSError as e:   # the output folder itself: disk full, permissions; rerun resumes after a fix
        raise JobError(f"failed writing {args.out}: {e}; fix it and rerun the same command to resume") from e
    print(format_summary(stats), flush=True)
    if why := nothing_usable(stats, cfg.clip_len):
        raise JobError(why)
    return EXIT_PARTIAL if stats.failed else EXIT_OK


def _log_to_stderr() -> None:
    """INFO lines of abvid.preprocess (which node did what) on stderr, unless logging is set up already."""
    import logging
    log = logging.getLogger("abvid.preprocess")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
