"""Loader throughput (views/s, transitions/s) against reading and decoding the same JPEGs alone.

    abvid bench loader /data/shards --workers 2 --batches 30
    abvid bench loader /data/shards --workers 2 --set aug_in_loader=false   # colour/blur left to the GPU

Both measurements run in this process, one after the other, on the same shards with the same
number of processes (``--workers``; 0 = this process):

    loader  build_loader(...): tar -> shuffle -> views -> decode -> crop/resize/flip/augment into
            batches in shared memory -> this process
    bound   the necessary part of that job: the same processes read the same shards' tar bytes
            (pipeline/source.py's own tar reader) and decode, per clip, as many of its JPEGs as the
            loader decoded per clip (views.decode_frame, the loader's decoder; one thread each, as in
            a DataLoader worker), and nothing else: no view sampling, rendering, batching or IPC

so the ratio shows what sampling, rendering, batching and moving batches between processes cost.
The bound's processes each take a share of the shards (cycled) and are timed from a common
start to the last one's end over as many clips as the loader's timed batches held.

The loader skips ``--warmup`` batches, then times ``--batches`` batches; ``--rounds`` alternates
loader and bound and keeps each one's best round (the machine may be shared: the least disturbed
round is the closest to its cost). Two views of the loader runs:

    wall   clips/s by the clock: the headline throughput / bound / ratio
    cpu    clips per CPU-second of the worker processes (from the "cpu_s" each worker
           stores in its loader state, taken at the first and last timed batch): what one
           core does, robust to other jobs on the machine; cpu_ratio = loader / bound, per CPU-second

views/s = clips/s x n (n = n_global + n_local, default 2 x 224 px + 4 x 96 px); the bound is
given in the same unit. transitions/s counts n x (n - 1) ordered pairs of distinct views per
clip (identity pairs i -> i left out). views/s per core = views per worker CPU-second. The
closing JSON line is tools/bench/common.report's. Exit codes: 0 ok, 2 usage error.
"""
from __future__ import annotations

import argparse
import time

import torch

from torchdata.stateful_dataloader import StatefulDataLoader

from abvid.pipeline.config import merge, parse_overrides
from abvid.pipeline.loader import DataConfig, build_loader
from abvid.tools.bench.common import report


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


def _bound_worker(urls: list[str], clips: int, warmup: int, frames_per_clip: float, start, conn) -> None:
    """One bound process: read ``urls`` (cycled) and decode ``frames_per_clip`` JPEGs per clip on average."""
    import itertools

    import cv2

    from abvid.pipeline.source import group_samples, tar_members
    from abvid.pipeline.views import decode_frame

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    samples = group_samples()(tar_members()(itertools.cycle(urls)))
    owed, decoded = 0.0, 0

    def one() -> None:
        nonlocal owed, decoded
        s = next(samples)
        frames = sorted(k for k in s if k[:3].isdigit() and k.endswith(("jpg", "webp")))
        owed += frames_per_clip
        k = min(len(frames), int(owed))          # whole JPEGs per clip, averaging frames_per_clip
        owed -= k
        for name in frames[:k]:
            decode_frame(s[name], name)
        decoded += k

    for _ in range(warmup):
        one()
    conn.send("ready")
    start.wait()
    cpu0 = time.process_time()
    for _ in range(clips):
        one()
    conn.send((time.perf_counter(), time.process_time() - cpu0, decoded))


def _measure_bound(urls: list[str], workers: int, clips: int, warmup: int, frames_per_clip: float
                   ) -> tuple[float, float]:
    """(clips per wall second, clips per CPU-second) of the bound in ``max(1, workers)`` processes."""
    import multiprocessing as mp
    n = max(1, workers)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs, conns = [], []
    for w in range(n):
        share = urls[w::n] if len(urls) >= n else urls
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=_bound_worker, daemon=True,
                                 args=(share, clips // n + (w < clips % n), warmup, frames_per_clip, start, child)))
        procs[-1].start()
        conns.append(parent)
    for c in conns:
        c.recv()
    t0 = time.perf_counter()
    start.set()
    ends = [c.recv() for c in conns]
    for p in procs:
        p.join()
    wall = max(e[0] for e in ends) - t0
    cpu = sum(e[1] for e in ends)
    return clips / wall, clips / max(cpu, 1e-9)


def main(args: argparse.Namespace) -> int:
    cfg = merge(DataConfig(shards=args.shards, workers=args.workers, resampled=True),
                parse_overrides(args.set))
    n = cfg.n_global + cfg.n_local
    if cfg.workers == 0:
        torch.set_num_threads(1)     # one core, as in a DataLoader worker (intra-op threads spin on a busy machine)
    print(f"views per clip: {cfg.n_global} x {cfg.global_size} px + {cfg.n_local} x {cfg.local_size} px; "
          f"workers {cfg.workers}, batch {args.batch_size}, aug_in_loader={cfg.aug_in_loader}", flush=True)
    from abvid.pipeline.source import expand_shards
    urls = expand_shards(cfg.shards, allow_pipe=cfg.allow_pipe)
    best = {"loader": (0.0, 0.0, 0.0), "bound": (0.0, 0.0, 0.0)}
    for r in range(args.rounds):
        loader = build_loader(cfg, batch_size=args.batch_size)
        wall, cpu, fpc = _measure(loader, args.warmup, args.batches)
        del loader
        print(f"round {r} loader: {wall:7.1f} clips/s wall, {cpu:7.1f} clips per worker CPU-s, "
              f"{fpc:.2f} distinct frames per clip", flush=True)
        best["loader"] = (max(best["loader"][0], wall), max(best["loader"][1], cpu), fpc)
        bwall, bcpu = _measure_bound(urls, cfg.workers, args.batches * args.batch_size,
                                     args.warmup * args.batch_size // max(1, cfg.workers), fpc)
        print(f"round {r} bound : {bwall:7.1f} clips/s wall, {bcpu:7.1f} clips per CPU-s "
              f"(read + decode {fpc:.2f} JPEGs per clip)", flush=True)
        best["bound"] = (max(best["bound"][0], bwall), max(best["bound"][1], bcpu), fpc)
    (wall, cpu, fpc), (bwall, bcpu, _) = best["loader"], best["bound"]
    print(f"loader {wall * n:.1f} views/s, bound (read + decode the same JPEGs) {bwall * n:.1f} views/s; "
          f"per core: {cpu * n:.1f} vs {bcpu * n:.1f} views/CPU-s (cpu ratio {cpu / bcpu:.2f}); "
          f"toward 250 views/s per core (ViT-S/16, one H100, 16 cores): {cpu * n / 250:.2f}x")
    report("loader", wall * n, "views/s", bwall * n, transitions_per_s=round(wall * n * (n - 1), 1),
           transition_unit="n*(n-1) ordered pairs of distinct views per clip", clips_per_s=round(wall, 2),
           views_per_s_per_core=round(cpu * n, 1), bound_views_per_s_per_core=round(bcpu * n, 1),
           cpu_ratio=round(cpu / bcpu, 3), workers=cfg.workers, batch_size=args.batch_size,
           frames_per_clip=round(fpc, 2), aug_in_loader=cfg.aug_in_loader)
    return 0
