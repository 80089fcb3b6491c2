"""abvid bench embed: end-to-end embedding frames/s against a bound the job can reach, measured in one run.

    abvid bench embed ../shared/media/videos/imageio-binaries/cockatoo.mp4 --copies 2 [--checkpoint CKPT]
    abvid bench embed clips/ --workers 2          # a folder of short clips, two decoder processes

Timings of the same frames (the videos at --fps, resized and cropped to --size):

* decode-only: train/embed_sources.decode_events with the same --workers (1: a decode thread;
  N: N decoder processes, batches crossing in shared memory), no model;
* model-only: the encoder (train/embed.encode: host->device copy, forward, result back to host)
  on the same number of frames in the same batch sizes, made beforehand (the first decoded
  batches, reused cyclically);
* end to end: train/embed.embed_inputs with --workers into a temp folder (decoders + encoder +
  part files + merge into embeddings.npy and embeddings.parquet).

The bound is what the job can reach on this machine:

* CPU (the encoder shares the cores with the decoders): decode and encode one after the other,
  1 / (1 / decode_fps + 1 / model_fps): a pipeline cannot overlap two jobs that each fill every core;
* CUDA: min(decode_fps, model_fps): the decoders and the GPU work in parallel, the slower one sets the pace.

INPUT is a video file (with --copies N: treated as N videos, symlinks, so decoding one overlaps
the model on another) or a folder of videos. Each timing is the best of --repeat rounds; a round
runs all three in turn (so load changes on a shared machine hit them alike), after a warm-up.
``cpu_ratio`` = (decode CPU-s + model CPU-s) / end-to-end CPU-s (this process and its decoder
processes): the CPU view of the sequential bound, steadier than the clock when other jobs share
the cores (torch's intra-op threads wait on the slowest one, so a busy core swings the wall times).
Without --checkpoint a randomly initialised --arch encoder is used (speed does not depend on the weights).
Exit codes: 0 ok, 2 usage error (no video, nothing decoded).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from abvid.tools.cli import EXIT_OK

KEEP_BATCHES = 8   # decoded batches kept in memory for the model-only timing


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a video file, or a folder of videos")
    p.add_argument("--checkpoint", default=argparse.SUPPRESS, metavar="CKPT",
                   help="exported encoder or training checkpoint (default: a random --arch encoder)")
    p.add_argument("--arch", default="vit_tiny", help="encoder arch when no --checkpoint is given")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second sampled (0 = every frame)")
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--workers", type=int, default=1, help="decoders: 1 = a thread, N = N processes (as abvid embed)")
    p.add_argument("--threads", type=int, default=0, help="decoder threads per decoder (0 = cores / workers)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the three timings; the best of each is kept")
    p.add_argument("--copies", type=int, default=1,
                   help="a file: treat it as this many videos (symlinks), so decoding one overlaps the model on another")


def _time(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its finished children, frames) of one call of ``fn() -> frames``."""
    c, t = os.times(), time.perf_counter()
    n = fn()
    wall, c2 = time.perf_counter() - t, os.times()
    cpu = (c2.user - c.user) + (c2.system - c.system) + (c2.children_user - c.children_user) + \
        (c2.children_system - c.children_system)
    return wall, cpu, n


def main(args: argparse.Namespace) -> int:
    from abvid.model import build_encoder
    from abvid.model.io import EncoderFileError, load_encoder
    from abvid.pipeline.errors import UsageError
    from abvid.pipeline.inputs import expand_inputs
    from abvid.train.embed import check_size, resolve_device

    src = Path(args.input)
    if not src.exists():
        raise UsageError(f"{args.input}: no such file or folder; pass a video file or a folder of videos")
    device = resolve_device(args.device)
    try:
        encoder = (load_encoder(args.checkpoint) if getattr(args, "checkpoint", None)
                   else build_encoder(args.arch, patch_size=16, img_size=args.size)).to(device).eval()
    except EncoderFileError as e:
        raise UsageError(str(e)) from None
    check_size(encoder, args.size)
    with tempfile.TemporaryDirectory(prefix="abvid-bench-embed-") as tmp:
        if src.is_dir():
            videos = [it.path for it in expand_inputs([str(src)])]
            if not videos:
                raise UsageError(f"{src}: no video file in this folder")
        else:
            videos = []
            for i in range(max(1, args.copies)):   # distinct paths = distinct inputs (a repeated path is skipped)
                link = Path(tmp) / "in" / f"copy{i}{src.suffix}"
                link.parent.mkdir(exist_ok=True)
                link.symlink_to(src.resolve())
                videos.append(str(link))
        return _bench(args, encoder, device, videos, Path(tmp) / "out")


def _bench(args: argparse.Namespace, encoder, device, videos: list[str], out: Path) -> int:
    import torch

    from abvid.pipeline.errors import UsageError
    from abvid.tools.bench.common import report
    from abvid.train.embed import embed_inputs, encode, expand_units
    from abvid.train.embed_sources import decode_events

    fps = args.fps or None
    units = expand_units(videos)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def decode_run(keep: list | None = None, sizes: list | None = None) -> int:
        """The job's decoders (same --workers), no model; batches made (pinned on CUDA) and dropped."""
        n = 0
        for kind, _, payload in decode_events(units, workers=args.workers, fps=fps, size=args.size,
                                              batch_size=args.batch_size, threads=args.threads, pin_memory=cuda):
            if kind == "batch":
                rows, x = payload
                n += len(rows)
                if sizes is not None:
                    sizes.append(len(rows))
                if keep is not None and len(keep) < KEEP_BATCHES:
                    keep.append(x)   # the first decoded batches: the model-only input
            elif kind == "failed":
                raise UsageError(f"{args.input}: a video failed to decode: {payload}")
        return n

    kept: list = []
    sizes: list[int] = []
    frames = decode_run(kept, sizes)   # also warms the file cache and the decoders
    if frames == 0:
        raise UsageError(f"{args.input} gave no frame at fps={args.fps}")
    # model-only input: real frames, in the batch sizes the job makes, kept batches cycled
    full = [x for x in kept if len(x) == max(sizes)] or kept
    batches = [full[i % len(full)][:n] for i, n in enumerate(sizes)]
    encode(encoder, batches[0], device)   # warm-up (allocator, kernels)

    def model_run() -> int:
        for b in batches:
            encode(encoder, b, device)
        sync()
        return frames

    def e2e_run() -> int:
        res = embed_inputs(videos, out, encoder, fps=fps, size=args.size, batch_size=args.batch_size,
                           device=device, threads=args.threads, workers=args.workers, overwrite=True,
                           progress=False)
        sync()
        if any(r.status != "ok" for r in res):
            raise RuntimeError(f"{args.input}: embedding failed: {[r.error for r in res if r.error]}")
        return sum(r.frames for r in res)

    # Interleave the three timings round by round, so a change in machine load hits all of them alike.
    best = {"decode": float("inf"), "model": float("inf"), "e2e": float("inf")}
    cpu = dict(best)
    for r in range(max(1, args.repeat)):
        line = []
        for name, fn in (("decode", decode_run), ("model", model_run), ("e2e", e2e_run)):
            t, c, n = _time(fn)
            if n != frames:
                raise RuntimeError(f"{name} run gave {n} frames, the first decode {frames}")
            best[name], cpu[name] = min(best[name], t), min(cpu[name], c)
            line.append(f"{name} {frames / t:.1f} ({c:.2f} CPU-s)")
        print(f"round {r}: " + "  ".join(line) + " frames/s", flush=True)
    # CPU view, steadier on a shared machine: the job's CPU-seconds against decode's plus the model's
    cpu_ratio = (cpu["decode"] + cpu["model"]) / cpu["e2e"]
    decode_fps, model_fps, e2e_fps = frames / best["decode"], frames / best["model"], frames / best["e2e"]
    if cuda:
        bound, rule = min(decode_fps, model_fps), "min(decode, model): decoders and GPU in parallel"
    else:
        bound, rule = 1 / (1 / decode_fps + 1 / model_fps), "decode then model: both fill the same CPU cores"
    print(f"{len(videos)} videos, {frames} frames at fps={args.fps} size={args.size} batch={args.batch_size} "
          f"device={device} workers={args.workers} torch threads={torch.get_num_threads()} cores={os.cpu_count()}")
    print(f"decode-only {decode_fps:.1f} frames/s   model-only {model_fps:.1f} frames/s   "
          f"end-to-end {e2e_fps:.1f} frames/s   bound {bound:.1f} ({rule}); CPU-s: decode {cpu['decode']:.2f} "
          f"+ model {cpu['model']:.2f} vs end-to-end {cpu['e2e']:.2f} (cpu ratio {cpu_ratio:.2f})")
    arch = getattr(encoder, "encoder_kwargs", {}).get("arch", args.arch)
    report("embed", e2e_fps, "frames/s", bound, bound_rule=rule, decode_fps=round(decode_fps, 2),
           model_fps=round(model_fps, 2), cpu_ratio=round(cpu_ratio, 3), frames=frames, videos=len(videos), workers=args.workers,
           device=str(device), arch=arch, size=args.size, fps=args.fps, batch_size=args.batch_size,
           input=str(args.input), load=round(os.getloadavg()[0], 2))
    return EXIT_OK
