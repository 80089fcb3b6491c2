"""Loader throughput (views/s, transitions/s) against decoding the same frames' JPEGs alone.

    abvid bench loader /data/shards --workers 2 --batches 30
    abvid bench loader /data/shards --workers 2 --set aug_in_loader=false   # colour/blur left to the GPU

Both measurements run in this process, one after the other, on the same shards
with the same seed and the same number of DataLoader worker processes:

    loader  build_loader(...): tar -> shuffle -> views -> decode -> crop/resize/flip/augment into the batch
    bound   the same ClipDataset stream with decode_only=True: it decodes exactly the frames the
            views of each clip use (same clips, same view parameters) and nothing else

Each measurement skips ``--warmup`` batches, then times ``--batches`` batches;
``--rounds`` alternates loader and bound and keeps each one's best round (the
machine may be shared: the least disturbed round is the closest to its cost).
Two views of the same runs:

    wall   clips/s by the clock: the headline throughput / bound / ratio
    cpu    clips per CPU-second of the worker processes (from the "cpu_s" each worker
           stores in its loader state, taken at the first and last timed batch): what one
           core does, robust to other jobs on the machine; cpu_ratio = loader / bound

views/s = clips/s x n (n = n_global + n_local, default 2 x 224 px + 4 x 96 px);
the bound is given in the same unit. transitions/s counts n x (n - 1) ordered
pairs of distinct views per clip (identity pairs i -> i left out). views/s per
core = views per worker CPU-second. The closing JSON line is tools/bench/common.report's.
"""
from __future__ import annotations

import argparse
import time

import torch

from torchdata.stateful_dataloader import StatefulDataLoader

from abvid.pipeline.loader import DataConfig, build_dataset, build_loader
from abvid.tools.bench.common import report
from abvid.pipeline.config import merge, parse_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="shard spec: .tar path, folder, brace pattern, URL (see pipeline/source.py)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0 = main process)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing starts (worker start-up, buffer fill)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating loader/bound rounds; the best of each is kept")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="DataConfig override, e.g. --set n_local=8 --set shuffle_buffer=64")


def _worker_cpu(state: dict) -> float:
    """Sum of the "cpu_s" of every worker's dataset state inside a StatefulDataLoader state dict."""
    if "cpu_s" in state and "position" in state:
        return float(state["cpu_s"])
    return sum(_worker_cpu(v) for v in state.values() if isinstance(v, dict))


def _measure(loader: StatefulDataLoader, warmup: int, timed: int) -> tuple[float, float, float]:
    """(clips per wall second, clips per worker CPU-second, distinct frames per clip) over ``timed`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    cpu0, start = _worker_cpu(loader.state_dict()), time.perf_counter()
    clips = frames = 0
    for _ in range(timed):
        b = next(it)
        clips += len(b["key"])
        frames += int(b["frames"].sum()) if "frames" in b else sum(len(set(f.tolist())) for f in b["frame_idx"])
    wall = time.perf_counter() - start
    cpu = _worker_cpu(loader.state_dict()) - cpu0
    del it
    return clips / wall, clips / max(cpu, 1e-9), frames / clips


def _collate_count(rows: list[dict]) -> dict:
    return {"key": [r["key"] for r in rows], "frames": torch.tensor([r["frames"] for r in rows])}


def main(args: argparse.Namespace) -> int:
    cfg = merge(DataConfig(shards=args.shards, workers=args.workers, resampled=True),
                parse_overrides(args.set))
    n = cfg.n_global + cfg.n_local
    if cfg.workers == 0:
        torch.set_num_threads(1)     # one core, as in a DataLoader worker (intra-op threads spin on a busy machine)
    print(f"views per clip: {cfg.n_global} x {cfg.global_size} px + {cfg.n_local} x {cfg.local_size} px; "
          f"workers {cfg.workers}, batch {args.batch_size}, aug_in_loader={cfg.aug_in_loader}", flush=True)
    best = {"loader": (0.0, 0.0, 0.0), "bound": (0.0, 0.0, 0.0)}
    for r in range(args.rounds):
        loader = build_loader(cfg, batch_size=args.batch_size)
        bound = StatefulDataLoader(build_dataset(cfg, decode_only=True), batch_size=args.batch_size,
                                   num_workers=cfg.workers, collate_fn=_collate_count,
                                   prefetch_factor=cfg.prefetch_factor if cfg.workers > 0 else None)
        for name, dl in (("loader", loader), ("bound", bound)):
            wall, cpu, fpc = _measure(dl, args.warmup, args.batches)
            print(f"round {r} {name:6s}: {wall:7.1f} clips/s wall, {cpu:7.1f} clips per worker CPU-s, "
                  f"{fpc:.2f} distinct frames per clip", flush=True)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu), fpc)
        del loader, bound
    (wall, cpu, fpc), (bwall, bcpu, _) = best["loader"], best["bound"]
    print(f"loader {wall * n:.1f} views/s, bound (decode only) {bwall * n:.1f} views/s; "
          f"per core: {cpu * n:.1f} vs {bcpu * n:.1f} views/CPU-s (cpu ratio {cpu / bcpu:.2f}); "
          f"toward 250 views/s per core (ViT-S/16, one H100, 16 cores): {cpu * n / 250:.2f}x")
    report("loader", wall * n, "views/s", bwall * n, transitions_per_s=round(wall * n * (n - 1), 1),
           transition_unit="n*(n-1) ordered pairs of distinct views per clip", clips_per_s=round(wall, 2),
           views_per_s_per_core=round(cpu * n, 1), bound_views_per_s_per_core=round(bcpu * n, 1),
           cpu_ratio=round(cpu / bcpu, 3), workers=cfg.workers, batch_size=args.batch_size,
           frames_per_clip=round(fpc, 2), aug_in_loader=cfg.aug_in_loader)
    return 0
