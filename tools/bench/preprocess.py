"""Benchmark preprocessing against an honest bound (and the ffmpeg command line when there is one).

    abvid bench preprocess ../shared/media/videos/imageio-binaries/cockatoo.mp4 --fps 4 --size 256
    abvid bench preprocess videos/ --workers 2          # a folder: videos per hour per node

One FILE: throughput = the file's source frames per second of the whole per-video path of
``abvid preprocess`` (decode + pts selection + resize + JPEG encode + spool + shard write;
in-process, one video). The bound is ``video.decode_only(fps=...)``: the same PyAV packet loop
with the same skipping of non-reference frames no slot needs (``skip_frame=NONREF``), the same
threads, and nothing else: what preprocessing costs beyond decoding what it must decode. When
an ``ffmpeg`` binary is on PATH (it is not a dependency), the same extraction by the ffmpeg
command line (fps filter, area scale to the short side, JPEG files) is timed too and abvid's
speed-up over it printed.

A FOLDER (``--workers N``): ``run_preprocess`` on every video of it with N worker processes
(the local executor, into a temp folder): videos per hour on this machine, the number to plan a
corpus with. The bound runs ``decode_only(fps=...)`` on the same videos in N processes.

Rounds alternate pipeline and bound and the best round of each is reported (the least disturbed
by other load on the machine); ``cpu_ratio`` (one file) compares process CPU seconds instead,
steadier on a shared machine. Ends with the JSON line of ``tools/bench/common.report``.
Exit codes: 0 ok, 2 usage error (no such input), 3 the video failed to preprocess.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from abvid.tools.bench.common import report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a video file, or a folder of videos (then see --workers)")
    p.add_argument("--fps", type=float, default=4.0, help="target frame rate")
    p.add_argument("--size", type=int, default=256, help="short side in pixels")
    p.add_argument("--threads", type=int, default=0, help="decoder threads (0 = FFmpeg's choice; a folder: cores / workers)")
    p.add_argument("--clip-len", type=int, default=16, help="frames per clip (preprocess's default)")
    p.add_argument("--format", choices=("jpg", "webp"), default="jpg", help="frame image format")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of pipeline and bound; best kept")
    p.add_argument("--backend", choices=("auto", "pyav", "decord"), default="pyav", help="decoder backend")
    p.add_argument("--workers", type=int, default=0, help="a folder: worker processes (0 = one per core)")


def _preprocess_once(path: str, cfg, threads: int, tmp: Path) -> tuple[float, float, dict]:
    from abvid.pipeline.clips import process_video
    from abvid.pipeline.manifest import Manifest, video_id
    from abvid.pipeline.shardwriter import ShardWriter

    for f in tmp.iterdir():
        f.unlink()
    c0, t0 = time.process_time(), time.perf_counter()
    row = process_video({"path": path, "video_id": video_id(path), "spool": str(tmp / "v.spool"),
                         "annotations": []}, cfg, threads)
    if row["status"] != "ok":
        from abvid.pipeline.errors import JobError
        raise JobError(f"{path}: {row['status']}: {row['error']}")
    writer = ShardWriter(tmp, "bench", Manifest(tmp / "manifest.jsonl"), max_bytes=1 << 40)
    writer.append(tmp / "v.spool", row["clips"], {"path": path, "status": "ok"})
    writer.close()
    return time.perf_counter() - t0, time.process_time() - c0, row


def ffmpeg_command(path: str, out_dir: Path, fps: float, size: int, threads: int, quality: int) -> list[str] | None:
    """The ffmpeg CLI doing the same extraction (fps, short side ``size``, area scaling, JPEG files); None without ffmpeg."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    q = max(2, min(31, round(2 + (100 - quality) / 4)))      # -q:v 2 (best) .. 31; q90 -> 4
    scale = f"scale='if(lt(iw,ih),{size},-2)':'if(lt(iw,ih),-2,{size})':flags=area"
    return [exe, "-nostdin", "-v", "error", "-threads", str(threads), "-i", path, "-vf", f"fps={fps:g},{scale}",
            "-q:v", str(q), "-f", "image2", str(out_dir / "%06d.jpg")]


def main(args: argparse.Namespace) -> int:
    from abvid.pipeline.errors import UsageError

    if not os.path.exists(args.input):
        raise UsageError(f"{args.input}: no such file or folder; pass a video file or a folder of videos")
    if os.path.isdir(args.input):
        return _folder(args)
    return _file(args)


def _file(args: argparse.Namespace) -> int:
    from abvid.pipeline.preprocess import PreprocessConfig
    from abvid.pipeline.video import decode_only, probe

    path = os.path.abspath(args.input)
    info = probe(path)
    cfg = PreprocessConfig(fps=args.fps, size=args.size, clip_len=args.clip_len, format=args.format,
                           quality=args.quality, backend=args.backend)
    total = decode_only(path, args.threads)          # the file's frames (untimed): the unit of both rates
    print(f"{path}: {info.width}x{info.height} {info.codec} {info.fps} fps, {total} frames; "
          f"fps {args.fps} size {args.size} {args.format} q{args.quality} threads {args.threads}")
    best = {"pipe": float("inf"), "bound": float("inf"), "ffmpeg": float("inf")}
    cpu = {"pipe": float("inf"), "bound": float("inf")}
    with tempfile.TemporaryDirectory(prefix="abvid-bench-") as tmp:
        work, ff_dir = Path(tmp) / "w", Path(tmp) / "ff"
        work.mkdir()
        ff_dir.mkdir()
        ff = ffmpeg_command(path, ff_dir, args.fps, args.size, args.threads, args.quality)
        _preprocess_once(path, cfg, args.threads, work)  # warm-up: imports, file cache
        for r in range(args.rounds):
            secs, cpu_s, row = _preprocess_once(path, cfg, args.threads, work)
            c0, t0 = time.process_time(), time.perf_counter()
            decoded = decode_only(path, args.threads, fps=args.fps)
            bound_secs, bound_cpu = time.perf_counter() - t0, time.process_time() - c0
            best["pipe"], best["bound"] = min(best["pipe"], secs), min(best["bound"], bound_secs)
            cpu["pipe"], cpu["bound"] = min(cpu["pipe"], cpu_s), min(cpu["bound"], bound_cpu)
            line = (f"round {r}: preprocess {total / secs:.1f} frames/s ({secs:.3f} s, {cpu_s:.3f} s CPU, "
                    f"{row['source_frames']} decoded, {row['frames']} written)  bound {total / bound_secs:.1f} "
                    f"frames/s ({bound_secs:.3f} s, {bound_cpu:.3f} s CPU, {decoded} decoded)")
            if ff:
                for f in ff_dir.iterdir():
                    f.unlink()
                t0 = time.perf_counter()
                subprocess.run(ff, check=True)
                best["ffmpeg"] = min(best["ffmpeg"], time.perf_counter() - t0)
                line += f"  ffmpeg CLI {time.perf_counter() - t0:.3f} s ({len(list(ff_dir.iterdir()))} JPEGs)"
            print(line, flush=True)
    extra = {}
    if ff:
        extra = {"ffmpeg_s": round(best["ffmpeg"], 3), "speedup_vs_ffmpeg": round(best["ffmpeg"] / best["pipe"], 3)}
        print(f"ffmpeg command line: {' '.join(ff)}\nabvid is {extra['speedup_vs_ffmpeg']:.2f}x the ffmpeg CLI's speed")
    else:
        print("(no ffmpeg binary on PATH: the ffmpeg CLI comparison is skipped)")
    report("preprocess", total / best["pipe"], "source frames/s", total / best["bound"], file=os.path.basename(path),
           fps=args.fps, size=args.size, clip_len=args.clip_len, threads=args.threads, format=args.format,
           frames_decoded=decoded, frames_in_file=total, frames_written=row.get("frames", 0),
           cpu_ratio=round(cpu["bound"] / cpu["pipe"], 3), load=_loadavg(), **extra)
    return 0


def _decode_task(job: tuple[str, int, float]) -> int:
    from abvid.pipeline.video import VideoError, decode_only
    path, threads, fps = job
    try:
        return decode_only(path, threads, fps=fps)
    except VideoError:
        return 0


def _folder(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    from abvid.pipeline.inputs import expand_inputs
    from abvid.pipeline.preprocess import PreprocessConfig, run_preprocess

    videos = [it.path for it in expand_inputs([args.input]) if not it.skip_reason]
    workers = args.workers or os.cpu_count() or 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    cfg = PreprocessConfig(fps=args.fps, size=args.size, clip_len=args.clip_len, format=args.format,
                           quality=args.quality, backend=args.backend, workers=workers, threads=threads)
    print(f"{args.input}: {len(videos)} videos; fps {args.fps} size {args.size} {args.format} q{args.quality}; "
          f"{workers} workers x {threads} threads on {os.cpu_count()} cores")
    best_pipe = best_bound = float("inf")
    ctx = mp.get_context("forkserver")
    with tempfile.TemporaryDirectory(prefix="abvid-bench-") as tmp:
        for r in range(args.rounds):
            out = Path(tmp) / f"r{r}"
            t0 = time.perf_counter()
            stats = run_preprocess([args.input], out, cfg, progress=False)
            secs = time.perf_counter() - t0
            shutil.rmtree(out)
            t0 = time.perf_counter()
            with ctx.Pool(workers) as pool:
                decoded = sum(pool.imap_unordered(_decode_task, [(v, threads, args.fps) for v in videos]))
            bound_secs = time.perf_counter() - t0
            best_pipe, best_bound = min(best_pipe, secs), min(best_bound, bound_secs)
            print(f"round {r}: preprocess {secs:.2f} s ({stats.ok} ok, {stats.failed} failed, "
                  f"{stats.source_frames} frames decoded)  bound {bound_secs:.2f} s ({decoded} decoded)", flush=True)
    per_hour = len(videos) * 3600 / best_pipe
    print(f"{per_hour:.0f} videos/hour on this node ({len(videos) / best_pipe:.2f} videos/s, "
          f"{stats.source_frames / best_pipe:.0f} source frames/s)")
    report("preprocess", per_hour, "videos/hour/node", len(videos) * 3600 / best_bound, input=args.input,
           videos=len(videos), workers=workers, threads=threads, fps=args.fps, size=args.size,
           clip_len=args.clip_len, format=args.format, source_frames_per_s=round(stats.source_frames / best_pipe, 1),
           cores=os.cpu_count(), load=_loadavg())
    return 0


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")
