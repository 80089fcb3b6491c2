"""abvid bench train: one optimisation step of the base method vs the same method with bootstrapping.

    abvid bench train --arch vit_tiny --views 2x224,4x96 --batch 8 --steps 5
    abvid bench train --objective simclr --set target_network=false --threads 1

Both objectives share the encoder architecture, views and batch (random
pixels and boxes, a fixed seed). A step is forward + backward + AdamW step +
EMA update. Steps of the two methods are interleaved (base, AB, base, AB, ...)
so that load from other processes hits both alike, and the median step time of
each is reported. The closing JSON line has ``throughput`` = bootstrapped step
(ms), ``bound`` = base step (ms) and ``ratio`` = AB step / base step (target:
<= 1.25 on CPU for vit_tiny with 2 x 224 + 4 x 96 views).

Measured on the shared 2-core CPU machine (load 4-9 from other jobs), vit_tiny/16,
2 x 224 + 4 x 96, batch 4, ``--threads 1``: DINO 1.08 (1888 -> 2032 ms; 1.07-1.19
over five runs), SimCLR 1.33, CLIP ~1.4-1.55, SimCLR with ``--set
target_network=false`` 1.03. The decoder itself is cheap (~+5-10%); the SimCLR /
CLIP gap is the EMA teacher's forward pass over all views, which their base
methods do not run and DINO's base already runs over the globals. Two torch
threads on the loaded machine spin-wait and give ratios that swing 1.1-1.4.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from abvid.tools.bench.common import report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--objective", default="dino", choices=["dino", "simclr", "clip"])
    p.add_argument("--views", default="2x224,4x96", help="NxSIZE of global views, then NxSIZE of local views")
    p.add_argument("--batch", type=int, default=4, help="clips per batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up step each)")
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="ObjectiveConfig override for both runs, e.g. --set target_network=false (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")


def parse_views(spec: str) -> tuple[int, int, int, int]:
    """'2x224,4x96' -> (2, 224, 4, 96); a single group means no local views."""
    try:
        groups = [tuple(int(v) for v in g.lower().split("x")) for g in spec.split(",") if g]
        ng, gs = groups[0]
        nl, ls = groups[1] if len(groups) > 1 else (0, gs)
    except (ValueError, IndexError):
        raise SystemExit(f"--views must look like 2x224,4x96 (count x size, globals first), got {spec!r}")
    return ng, gs, nl, ls


def random_batch(B: int, ng: int, gs: int, nl: int, ls: int, device: str, next_views: int = 4) -> dict:
    """Random pixels and view parameters shaped like a loader batch, with ``next_views`` fresh views per clip
    (the targets of bootstrapping's next actions when gamma > 0)."""
    from abvid.pipeline.actions import AUG_DIM
    g = torch.Generator().manual_seed(0)
    n = ng + nl

    def boxes(k: int) -> torch.Tensor:
        hw = 0.2 + 0.8 * torch.rand(B, k, 2, generator=g)
        return torch.cat([(1 - hw) * torch.rand(B, k, 2, generator=g), hw], -1)
    batch = {"global": torch.randint(0, 256, (B, ng, 3, gs, gs), dtype=torch.uint8, generator=g),
             "local": torch.randint(0, 256, (B, nl, 3, ls, ls), dtype=torch.uint8, generator=g),
             "boxes": boxes(n), "frame_idx": torch.randint(0, 8, (B, n), generator=g),
             "time_s": torch.zeros(B, n), "aug": torch.rand(B, n, AUG_DIM, generator=g),
             "clip_id": torch.arange(B), "next_boxes": boxes(next_views),
             "next_frame_idx": torch.randint(0, 8, (B, next_views), generator=g),
             "next_aug": torch.rand(B, next_views, AUG_DIM, generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["key"] = [f"clip{i}" for i in range(B)]
    batch["labels"] = [[["cat"], ["dog"], []][i % 3] for i in range(B)]
    return batch


def main(args: argparse.Namespace) -> int:
    from abvid.model import ModelConfig
    from abvid.pipeline.config import merge, parse_overrides
    from abvid.train.objectives import ObjectiveConfig, build_objective
    if args.threads:
        torch.set_num_threads(args.threads)
    ng, gs, nl, ls = parse_views(args.views)
    torch.manual_seed(0)
    mcfg = ModelConfig(arch=args.arch, patch_size=args.patch_size, img_size=gs)
    data_info = {"texts": ["cat", "dog"]}
    runs = {}
    ocfg = merge(ObjectiveConfig(name=args.objective, gamma=args.gamma), parse_overrides(args.overrides))
    for name, bootstrap in (("base", False), ("ab", True)):
        obj = build_objective(merge(ocfg, {"bootstrap": bootstrap}), mcfg, data_info).to(args.device).train()
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (obj, opt)
    batch = random_batch(args.batch, ng, gs, nl, ls, args.device, next_views=ocfg.num_next_actions)

    def step(name: str) -> float:
        obj, opt = runs[name]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = obj.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.update_teacher(0.996)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000.0

    times: dict[str, list[float]] = {"base": [], "ab": []}
    for name in times:                                   # warm-up (allocations, kernels)
        step(name)
    for _ in range(args.steps):
        for name in times:
            times[name].append(step(name))
    base, ab = statistics.median(times["base"]), statistics.median(times["ab"])
    nparams = {k: sum(p.numel() for p in runs[k][0].parameters() if p.requires_grad) for k in runs}
    print(f"{args.objective} {args.arch}/{args.patch_size} views {args.views} batch {args.batch} "
          f"threads {torch.get_num_threads()} device {args.device}")
    for name in times:
        print(f"  {name:4s} step ms: " + " ".join(f"{t:.0f}" for t in times[name])
              + f"  (median {statistics.median(times[name]):.0f}; trainable params {nparams[name] / 1e6:.2f}M)")
    report("train", ab, "ms/step", base, objective=args.objective, arch=args.arch, views=args.views,
           overrides=list(args.overrides), gamma=args.gamma,
           batch=args.batch, steps=args.steps, base_ms=round(base, 1), ab_ms=round(ab, 1),
           threads=torch.get_num_threads(), device=args.device)
    return 0
