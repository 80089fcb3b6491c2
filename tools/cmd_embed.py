"""Write per-frame embeddings of videos or shards.

    abvid embed --checkpoint encoder.safetensors videos/ more.txt shards/ --out emb/ [--fps 4] [--size 224]

INPUT: video files, folders (recursive), globs, list files (.txt/.csv/.jsonl),
or shards (.tar files, folders of .tar). --checkpoint: an exported
.safetensors (`abvid export`) or a training checkpoint (EMA encoder by default).

Output in --out: embeddings.npy (N, D) float32 (or --float16), index.csv
(row,video_id,source,frame_index,pts_s; row i of the CSV is row i of the
array), embeddings.parquet when pyarrow is installed, report.jsonl (one row
per input: ok | cached | failed | skipped, with the reason). Broken inputs are
reported and skipped; rerunning the same command skips inputs already done.

Exit codes: 0 all inputs embedded, 1 some failed (see report.jsonl),
2 usage error, 3 nothing could be embedded.
"""
from __future__ import annotations

import argparse
import sys

from abvid.tools.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="videos, folders, globs, list files or shards")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="exported encoder (.safetensors) or training checkpoint")
    p.add_argument("--which", choices=("ema", "student"), default="ema",
                   help="encoder of a training checkpoint to use")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second sampled from videos (0 = every frame)")
    p.add_argument("--size", type=int, default=None,
                   help="square input size in pixels (default: the encoder's img_size, else 224)")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--float16", action="store_true", help="store embeddings.npy as float16 (half the size)")
    p.add_argument("--backend", choices=("auto", "pyav", "decord"), default="auto", help="video decoder")
    p.add_argument("--threads", type=int, default=0, help="decoder threads (0 = one per core)")
    p.add_argument("--overwrite", action="store_true", help="discard parts of an earlier run in --out")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the inputs an earlier run into --out failed on (skipped and reported by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch

    from abvid.model.io import EncoderFileError, load_encoder
    from abvid.pipeline.inputs import InputError
    from abvid.train.embed import EmbedError, embed_inputs

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        encoder = load_encoder(args.checkpoint, map_location="cpu", which=args.which)
    except EncoderFileError as e:
        print(f"abvid embed: {e}", file=sys.stderr)
        return EXIT_USAGE
    size = args.size or int(getattr(encoder, "encoder_kwargs", {}).get("img_size", 224))
    try:
        results = embed_inputs(args.inputs, args.out, encoder, fps=args.fps or None, size=size,
                               batch_size=args.batch_size, device=device,
                               dtype="float16" if args.float16 else "float32", backend=args.backend,
                               threads=args.threads, overwrite=args.overwrite, retry_failed=args.retry_failed,
                               progress=not args.no_progress)
    except (EmbedError, InputError) as e:
        print(f"abvid embed: {e}", file=sys.stderr)
        return EXIT_USAGE
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "cached", "failed", "skipped")}
    frames = sum(r.frames for r in results if r.status in ("ok", "cached"))
    print(f"{len(results)} inputs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; {frames} frames at {size}px -> {args.out}/embeddings.npy")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.input}: {r.error}", file=sys.stderr)
    if counts["ok"] + counts["cached"] == 0:
        return EXIT_FAILED
    return EXIT_PARTIAL if counts["failed"] else EXIT_OK
