"""Benchmark preprocessing of one video against the decode-only bound, measured in the same run.

    abvid bench preprocess ../shared/media/videos/imageio-binaries/cockatoo.mp4 --fps 4 --size 256

Throughput = source frames of the file (as counted by decode-only) per second of the
whole per-video path of ``abvid preprocess`` (decode + pts selection + resize + JPEG
encode + spool + shard write; in-process, one video); bound = ``video.decode_only``
(PyAV decoding every frame to nothing) with the same threads. Rounds alternate the two
and the best round of each is reported (the least disturbed by other load on the
machine); ``cpu_ratio`` compares process CPU seconds instead, steadier on a shared
machine. Ends with the JSON line of ``tools/bench/common.report``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="video file to preprocess")
    p.add_argument("--fps", type=float, default=4.0, help="target frame rate")
    p.add_argument("--size", type=int, default=256, help="short side in pixels")
    p.add_argument("--threads", type=int, default=0, help="decoder threads for both runs (0 = FFmpeg's choice)")
    p.add_argument("--clip-len", type=int, default=16, help="frames per clip (preprocess's default)")
    p.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="frame image format")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of pipeline and bound; best kept")
    p.add_argument("--backend", choices=("auto", "pyav", "decord"), default="pyav", help="decoder backend")


def _preprocess_once(path: str, cfg, threads: int, tmp: Path) -> tuple[int, float, dict]:
    from abvid.pipeline.preprocess import process_video, video_id
    from abvid.pipeline.shardwriter import Manifest, ShardWriter

    for f in tmp.iterdir():
        f.unlink()
    c0, t0 = time.process_time(), time.perf_counter()
    row = process_video({"path": path, "video_id": video_id(path), "spool": str(tmp / "v.spool"),
                         "annotations": []}, cfg, threads)
    if row["status"] != "ok":
        raise SystemExit(f"abvid bench preprocess: {path} failed: {row['error']}")
    writer = ShardWriter(tmp, "bench", Manifest(tmp / "manifest.jsonl"), max_bytes=1 << 40)
    writer.append(tmp / "v.spool", row["clips"], {"path": path, "status": "ok"})
    writer.close()
    return row["source_frames"], time.perf_counter() - t0, time.process_time() - c0, row


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.preprocess import PreprocessConfig
    from abvid.pipeline.video import decode_only, probe
    from abvid.tools.bench.common import report

    path = os.path.abspath(args.file)
    info = probe(path)
    cfg = PreprocessConfig(fps=args.fps, size=args.size, clip_len=args.clip_len, format=args.format, quality=args.quality,
                           backend=args.backend)
    print(f"{path}: {info.width}x{info.height} {info.codec} {info.fps} fps, {info.num_frames} frames; "
          f"fps {args.fps} size {args.size} {args.format} q{args.quality} threads {args.threads}")
    best_pipe = best_bound = cpu_pipe = cpu_bound = float("inf")
    with tempfile.TemporaryDirectory(prefix="abvid-bench-") as tmp:
        _preprocess_once(path, cfg, args.threads, Path(tmp))  # warm-up: imports, file cache
        for r in range(args.rounds):
            frames, secs, cpu, row = _preprocess_once(path, cfg, args.threads, Path(tmp))
            c0, t0 = time.process_time(), time.perf_counter()
            n = decode_only(path, args.threads)
            bound_secs, bound_cpu = time.perf_counter() - t0, time.process_time() - c0
            best_pipe, best_bound = min(best_pipe, secs), min(best_bound, bound_secs)
            cpu_pipe, cpu_bound = min(cpu_pipe, cpu), min(cpu_bound, bound_cpu)
            print(f"round {r}: preprocess {n / secs:.1f} frames/s ({secs:.3f} s wall, {cpu:.3f} s CPU, "
                  f"{row['frames']} frames written)  decode-only {n / bound_secs:.1f} frames/s "
                  f"({bound_secs:.3f} s wall, {bound_cpu:.3f} s CPU)")
    if n != frames:   # the decoder may skip non-reference frames no slot needs; the file has n frames
        print(f"note: decode-only decoded {n} frames, the preprocess decoder {frames}")
    report("preprocess", n / best_pipe, "source frames/s", n / best_bound, file=os.path.basename(path),
           fps=args.fps, size=args.size, clip_len=args.clip_len, threads=args.threads, format=args.format,
           frames_written=row.get("frames", 0), cpu_ratio=round(cpu_bound / cpu_pipe, 3), load=_loadavg())
    return 0


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")
