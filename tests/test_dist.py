"""Process-group helpers (train/dist.py): single process without torchrun, gloo collectives with two."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from abvid.pipeline.errors import UsageError
from abvid.train import dist

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_when_env_unset(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    ctx = dist.init("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.is_main) == (0, 1, 0, False, True)
    t = torch.tensor([1.0, 5.0])
    assert dist.all_reduce_max(ctx, t) is t and dist.gather_objects(ctx, {"a": 1}) == [{"a": 1}]
    dist.barrier(ctx)
    dist.shutdown(ctx)


def test_world_without_master_is_a_clear_error(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        dist.init("cpu")


def test_pick_device():
    assert dist.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert dist.pick_device("auto").type == "cpu"
        with pytest.raises(UsageError, match="train.device=cpu"):
            dist.pick_device("cuda")


def test_resolve_strategy():
    from abvid.pipeline.errors import UsageError

    one = dist.DistContext(0, 1, 0, torch.device("cpu"), None)
    two = dist.DistContext(0, 2, 0, torch.device("cpu"), "gloo")
    assert [dist.resolve_strategy(s, one) for s in ("auto", "ddp")] == ["single", "single"]
    assert [dist.resolve_strategy(s, two) for s in ("auto", "ddp", "fsdp")] == ["ddp", "ddp", "fsdp"]
    with pytest.raises(UsageError, match="train.strategy=fsdp needs a process group: launch with torchrun"):
        dist.resolve_strategy("fsdp", one)
    with pytest.raises(UsageError, match="auto, ddp or fsdp"):
        dist.resolve_strategy("zero3", two)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = dist.init("cpu", timeout_s=60)
    try:
        assert ctx.backend == "gloo" and ctx.rank == rank and ctx.world_size == world
        mx = dist.all_reduce_max(ctx, torch.tensor([float(rank), -float(rank)]))
        mean = dist.all_reduce_mean(ctx, torch.tensor([float(rank)]))
        objs = dist.gather_objects(ctx, {"rank": rank})
        torch.manual_seed(100 + rank)                       # different init on every rank ...
        m = torch.nn.Linear(3, 2)
        dist.broadcast_module_(ctx, m)                      # ... until rank 0's weights are broadcast
        torch.save({"max": mx, "mean": mean, "objs": objs, "w": m.weight.detach().clone()}, f"{out}/r{rank}.pt")
    finally:
        dist.shutdown(ctx)


def test_two_process_gloo_collectives(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["max"].tolist() == [1.0, 0.0] and r0["mean"].item() == 0.5
    assert r0["objs"] == r1["objs"] == [{"rank": 0}, {"rank": 1}]
    assert torch.equal(r0["w"], r1["w"])
