"""Write per-frame embeddings of videos or shards.

    abvid embed --checkpoint encoder.safetensors videos/ more.txt shards/ --out emb/ [--fps 4] [--size 224]
    abvid embed --checkpoint enc.safetensors videos/ --out emb/ --workers 8           # 8 decoder processes
    abvid embed --checkpoint enc.safetensors list.txt --out /shared/emb --executor ray  # Ray Data pipeline

INPUT: video files, folders (recursive), globs, list files (.txt/.csv/.jsonl),
or shards (.tar files, folders of .tar, http(s) URLs and brace patterns of
them, streamed without a local copy). --checkpoint: an exported
.safetensors (`abvid export`) or a training checkpoint (EMA encoder by default).

Output in --out: embeddings.npy (N, D) float32 (or --float16), index.csv
(row,video_id,source,frame_index,pts_s; row i of the CSV is row i of the
array), embeddings.parquet (the index columns and an `embedding` list column),
with --faiss embeddings.faiss (a flat faiss index whose ids are the rows),
report.jsonl (one row per input: ok | cached | failed | skipped, with the reason).
Broken inputs are reported and skipped; rerunning the same command skips inputs
already done.

--pool cls: the CLS token (default); mean: the mean of the patch tokens; cls+mean: both,
concatenated (2 x D). --normalize: unit L2 norm (dot product = cosine similarity).

Decoding: --workers 1 decodes in a thread beside the encoder; --workers N decodes N
videos at once in N processes feeding the one encoder (use about one per core on a GPU
host). --executor ray runs a Ray Data pipeline instead: decoding in CPU tasks across the
cluster (--ray-address, else RAY_ADDRESS, else a local Ray), the encoder in --workers
actors (one GPU each on CUDA); outputs are written by this process, identical in content.

Exit codes: 0 all inputs embedded, 1 some failed (see report.jsonl),
2 usage error (bad option, --out is a file, --checkpoint is not an encoder, --device cuda
without a GPU, --size not a multiple of the patch size, output made with other settings,
a Ray cluster that does not answer), 3 nothing could be embedded, or --out is in use.
"""
from __future__ import annotations

import argparse
import sys

from abvid.tools.cli import EXIT_OK, EXIT_PARTIAL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="videos, folders, globs, list files or shards (paths or http(s) URLs)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", default=argparse.SUPPRESS,
                   help="exported encoder (.safetensors) or training checkpoint; required")
    p.add_argument("--which", choices=("ema", "student"), default="ema",
                   help="encoder of a training checkpoint to use: ema (the teacher, if the run has one) or "
                        "student (the online encoder; better after short runs, when the EMA still lags)")
    p.add_argument("--out", required=True, metavar="DIR", default=argparse.SUPPRESS, help="output folder; required")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second sampled from videos (0 = every frame)")
    p.add_argument("--size", type=int, default=argparse.SUPPRESS,
                   help="square input size in pixels, a multiple of the patch size (default: the encoder's "
                        "img_size, else 224)")
    p.add_argument("--batch-size", type=int, default=64, help="frames per encoder batch")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--pool", choices=("cls", "mean", "cls+mean"), default="cls",
                   help="vector per frame: CLS token, mean of patch tokens, or both concatenated")
    p.add_argument("--normalize", action="store_true", help="scale each vector to unit L2 norm")
    p.add_argument("--float16", action="store_true", help="store embeddings.npy as float16 (half the size)")
    p.add_argument("--faiss", action="store_true",
                   help="also write embeddings.faiss, a flat faiss index (inner product with --normalize, else "
                        "L2); needs pip install 'abvid[faiss]'")
    p.add_argument("--backend", choices=("auto", "pyav", "decord"), default="auto", help="video decoder")
    p.add_argument("--workers", type=int, default=1,
                   help="decoders: 1 = a thread beside the encoder, N = N processes; with --executor ray: "
                        "encoder actors")
    p.add_argument("--threads", type=int, default=0, help="decoder threads per decoder (0 = cores / workers)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine; ray: a Ray Data pipeline across a cluster (pip install 'abvid[ray]')")
    p.add_argument("--ray-address", default=argparse.SUPPRESS, metavar="ADDR",
                   help="Ray cluster to join: host:port of its head or 'auto' (default: RAY_ADDRESS, else local)")
    p.add_argument("--overwrite", action="store_true", help="discard parts of an earlier run in --out")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the inputs an earlier run into --out failed on (skipped and reported by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from abvid.model.io import EncoderFileError, load_encoder
    from abvid.pipeline.errors import JobError, UsageError
    from abvid.train.embed import embed_inputs, resolve_device

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder; pass a folder (created if missing)")
    if getattr(args, "ray_address", "") and args.executor != "ray":
        raise UsageError("--ray-address is set but --executor is not ray; add --executor ray")
    device = resolve_device(args.device)    # before loading anything: a missing GPU is a usage error
    try:
        encoder = load_encoder(args.checkpoint, map_location="cpu", which=args.which)
    except EncoderFileError as e:
        raise UsageError(str(e)) from None
    size = getattr(args, "size", None) or int(getattr(encoder, "encoder_kwargs", {}).get("img_size", 224))
    results = embed_inputs(args.inputs, args.out, encoder, fps=args.fps or None, size=size,
                           batch_size=args.batch_size, device=device, dtype="float16" if args.float16 else "float32",
                           backend=args.backend, threads=args.threads, workers=args.workers, executor=args.executor,
                           ray_address=getattr(args, "ray_address", ""), pool=args.pool, normalize=args.normalize,
                           faiss=args.faiss, overwrite=args.overwrite, retry_failed=args.retry_failed,
                           progress=not args.no_progress)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "cached", "failed", "skipped")}
    frames = sum(r.frames for r in results if r.status in ("ok", "cached"))
    print(f"{len(results)} inputs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + f"; {frames} frames at {size}px -> {args.out}/embeddings.npy")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.input}: {r.error}", file=sys.stderr)
    if counts["ok"] + counts["cached"] == 0:
        raise JobError(f"nothing could be embedded: every input failed or was skipped (see {args.out}/report.jsonl)")
    return EXIT_PARTIAL if counts["failed"] else EXIT_OK
