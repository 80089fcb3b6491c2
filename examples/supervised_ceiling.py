"""The supervised ceiling of a config's encoder: how far can *labels* take this architecture on this corpus?

A reference point for a pretraining table, not a pretraining method: the config's encoder (same
architecture, random init from --seed) is trained with a multi-label loss on the frame labels that
`abvid preprocess --annotations` stored in the shards, on random-resized crops of the frames (the
config's global view size and scale, horizontal flips). The encoder goes to an exported .safetensors
file, which `abvid embed` and `abvid probe` read like any checkpoint, so it is probed exactly as the
rows of `abvid ablate` are:

    python examples/supervised_ceiling.py examples/configs/tiny_cpu.yaml --shards PRETRAIN_SHARDS \\
        --out sup/seed0.safetensors --seed 0 [--steps 1200] [--batch-size 64] [--lr 1e-3]
    abvid embed --checkpoint sup/seed0.safetensors PROBE_SHARDS --out sup/emb-seed0
    abvid probe --embeddings sup/emb-seed0 --labels PROBE_LABELS.csv --method linear knn --seed 0

README "Does annotation bootstrapping earn its place?" (the eleventh experiment) quotes its numbers on the
toy corpora: 1,200 steps, about 2.5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from abvid.model import build_encoder, encoder_kwargs
from abvid.model.io import save_encoder
from abvid.pipeline.config import load_config
from abvid.pipeline.loader import frames_of, labels_at
from abvid.pipeline.source import group_samples, tar_members
from abvid.pipeline.views import decode_frame
from abvid.train.config import PretrainConfig


def labelled_frames(shards: str) -> tuple[torch.Tensor, list[set[str]]]:
    """Every distinct frame of the shards (uint8, (N, 3, H, W)) and the labels whose segment holds its time."""
    paths = sorted(str(p) for p in Path(shards).glob("*.tar")) if Path(shards).is_dir() else [shards]
    if not paths:
        sys.exit(f"error: no .tar shards in {shards}; pass the --out folder of `abvid preprocess`")
    frames, labels, seen = [], [], set()
    for sample in group_samples()(tar_members(strict=True)(paths)):
        if "json" not in sample:
            sys.exit(f"error: {sample['__url__']}: sample {sample['__key__']} has no .json; "
                     "is this a shard folder written by `abvid preprocess`?")
        meta, members = json.loads(sample["json"]), frames_of(sample)
        for i, (fi, t) in enumerate(zip(meta["frame_indices"], meta["pts_s"])):
            if (meta["video_id"], fi) in seen:                   # overlapping clips share frames
                continue
            seen.add((meta["video_id"], fi))
            if i not in members:
                sys.exit(f"error: {sample['__url__']}: sample {sample['__key__']} lacks frame {i:03d}; "
                         "re-run preprocessing")
            ext, data = members[i]
            frames.append(decode_frame(data, ext))
            labels.append(set(labels_at(meta.get("annotations") or [], [t])))     # as the loader reads them
    if not any(labels):
        sys.exit(f"error: no frame of {shards} carries a label; preprocess with --annotations LABELS.csv")
    return torch.stack(frames), labels


def random_crops(x: torch.Tensor, size: int, scale: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """Random-resized crops (area fraction in ``scale``, aspect 3/4..4/3) of uint8 frames -> floats in [0, 1]."""
    H, W = x.shape[-2:]
    out = []
    for img in x:
        area = rng.uniform(*scale) * H * W
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h, w = min(H, round(math.sqrt(area / ratio))), min(W, round(math.sqrt(area * ratio)))
        i, j = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        crop = F.interpolate(img[None, :, i:i + h, j:j + w].float() / 255, size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
        out.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the pretraining config whose encoder (model.*) and view size (data.*) to use")
    ap.add_argument("--shards", required=True, help="preprocessed shards with annotations (pretraining corpus)")
    ap.add_argument("--out", required=True, help="the encoder file to write (.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    frames, label_sets = labelled_frames(args.shards)
    classes = sorted(set().union(*label_sets))
    targets = torch.tensor([[c in s for c in classes] for s in label_sets], dtype=torch.float32)
    print(f"{len(frames)} frames, {len(classes)} classes: {', '.join(classes)}", flush=True)

    kwargs = encoder_kwargs(cfg.model)
    encoder = build_encoder(**kwargs)
    head = torch.nn.Linear(encoder.embed_dim, len(classes))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    scale = tuple(cfg.data.global_scale)
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, len(frames), args.batch_size))
        logits = head(encoder.embed(random_crops(frames[idx], cfg.data.global_size, scale, rng)))
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}", flush=True)
    path = save_encoder(encoder.eval(), kwargs, args.out)
    print(f"wrote {path}; probe it with `abvid embed --checkpoint {path} ...` then `abvid probe`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
