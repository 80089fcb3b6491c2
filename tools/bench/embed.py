"""abvid bench embed: end-to-end embedding frames/s vs min(decode-only, model-only), measured in one run.

    abvid bench embed ../shared/media/videos/imageio-binaries/cockatoo.mp4 [--checkpoint CKPT] [--arch vit_tiny]

Three timings of the same frames (the file at --fps, resized and cropped to --size):

* decode-only: pipeline/video.py decoding + resize + centre crop + batching
  (train/embed.py's own frame and batch functions), no model;
* model-only: the encoder (train/embed.encode: host->device copy, forward,
  result back to host) on the same number of frames in the same batch sizes,
  made beforehand (the first decoded batches, reused cyclically);
* end to end: train/embed.embed_inputs on the file into a temp folder
  (decode thread + encoder + part files + merge into embeddings.npy).

--copies N embeds the file as N videos (symlinks): decoding of one video then
overlaps the encoder on the previous one, as in a corpus of short clips; with one
copy whose frames fit one batch, nothing can overlap.

bound = min(decode-only, model-only) frames/s; ratio = end-to-end / bound.
Each timing is the best of --repeat rounds; a round runs all three in turn (so
load changes on a shared machine hit them alike), after a warm-up decode and batch.
Without --checkpoint a randomly initialised --arch encoder is used (speed does
not depend on the weights).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from abvid.tools.cli import EXIT_OK, EXIT_USAGE

KEEP_BATCHES = 8   # decoded batches kept in memory for the model-only timing


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a video file")
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="exported encoder or training checkpoint")
    p.add_argument("--arch", default="vit_tiny", help="encoder arch when no --checkpoint is given")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second sampled (0 = every frame)")
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="decoder threads (0 = one per core)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the three timings; the best of each is kept")
    p.add_argument("--copies", type=int, default=1,
                   help="treat the file as this many videos (symlinks), so decoding one overlaps the model on another")


def _time(fn) -> tuple[float, int]:
    """(seconds, frames) of one call of ``fn() -> frames``."""
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def main(args: argparse.Namespace) -> int:
    import torch

    from abvid.model import build_encoder
    from abvid.model.io import load_encoder

    if not Path(args.file).is_file():
        print(f"abvid bench embed: {args.file} is not a file; pass a video file", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    encoder = (load_encoder(args.checkpoint) if args.checkpoint
               else build_encoder(args.arch, patch_size=16, img_size=args.size)).to(device).eval()
    with tempfile.TemporaryDirectory(prefix="abvid-bench-embed-") as tmp:
        copies = []
        for i in range(max(1, args.copies)):   # distinct paths = distinct inputs (a repeated path is skipped)
            link = Path(tmp) / "in" / f"copy{i}{Path(args.file).suffix}"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(Path(args.file).resolve())
            copies.append(str(link))
        return _bench(args, encoder, device, copies, Path(tmp) / "out")


def _bench(args: argparse.Namespace, encoder, device, copies: list[str], out: Path) -> int:
    import torch

    from abvid.tools.bench.common import report
    from abvid.train.embed import batched, embed_inputs, encode, video_frames

    fps = args.fps or None
    pin = device.type == "cuda"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # decode-only: the same frame + batch code as embed, tensors made (and pinned on CUDA), no model
    def decode_one(path: str, keep: list | None) -> int:
        n = 0
        for rows, pixels in batched(video_frames(path, fps, args.size, threads=args.threads), args.batch_size):
            x = torch.from_numpy(pixels)
            if pin:
                x = x.pin_memory()
            if keep is not None and len(keep) < KEEP_BATCHES:
                keep.append(x)   # the first few decoded batches: the model-only input
            n += len(rows)
        return n

    def decode_run(keep: list | None = None) -> int:
        return sum(decode_one(c, keep if i == 0 else None) for i, c in enumerate(copies))

    kept: list = []
    frames = decode_run(kept)   # also warms the file cache and the decoder
    if frames == 0:
        print(f"abvid bench embed: {args.file} gave no frame at fps={args.fps}", file=sys.stderr)
        return EXIT_USAGE
    # model-only input: real frames, in the batch sizes embed uses (per copy), kept batches cycled
    one = frames // len(copies)
    sizes = [min(args.batch_size, one - i) for i in range(0, one, args.batch_size)] * len(copies)
    batches = [kept[i % len(kept)][:n] for i, n in enumerate(sizes)]
    encode(encoder, batches[0], device)   # warm-up (allocator, kernels)

    def model_run() -> int:
        for b in batches:
            encode(encoder, b, device)
        sync()
        return frames

    def e2e_run() -> int:
        res = embed_inputs(copies, out, encoder, fps=fps, size=args.size, batch_size=args.batch_size,
                           device=device, threads=args.threads, overwrite=True, progress=False)
        sync()
        if any(r.status != "ok" for r in res):
            raise RuntimeError(f"{args.file}: embedding failed: {[r.error for r in res if r.error]}")
        return sum(r.frames for r in res)

    # Interleave the three timings round by round, so a change in machine load hits all of them alike.
    best = {"decode": float("inf"), "model": float("inf"), "e2e": float("inf")}
    for _ in range(max(1, args.repeat)):
        for name, fn in (("decode", decode_run), ("model", model_run), ("e2e", e2e_run)):
            t, n = _time(fn)
            if n != frames:
                raise RuntimeError(f"{name} run gave {n} frames, the first decode {frames}")
            best[name] = min(best[name], t)
    decode_fps, model_fps, e2e_fps = frames / best["decode"], frames / best["model"], frames / best["e2e"]
    print(f"file {args.file} x{len(copies)}: {frames} frames at fps={args.fps} size={args.size} "
          f"batch={args.batch_size} device={device} torch threads={torch.get_num_threads()}")
    print(f"decode-only {decode_fps:.1f} frames/s   model-only {model_fps:.1f} frames/s   "
          f"end-to-end {e2e_fps:.1f} frames/s")
    arch = getattr(encoder, "encoder_kwargs", {}).get("arch", args.arch)
    report("embed", e2e_fps, "frames/s", min(decode_fps, model_fps), decode_fps=round(decode_fps, 2),
           model_fps=round(model_fps, 2), frames=frames, device=str(device), arch=arch, size=args.size,
           fps=args.fps, batch_size=args.batch_size, copies=len(copies), file=str(args.file))
    return EXIT_OK
