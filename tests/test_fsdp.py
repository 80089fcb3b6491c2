"""train/fsdp.py: FSDP2 on 2 gloo ranks against DDP, checkpoints across strategies, kill + resume, and
activation checkpointing.

Must-show tests of issue 11: FSDP with 2 ranks gives DDP's losses (fp32, relative difference <= 1e-5)
for a few steps of a tiny ViT; a SIGKILLed FSDP run resumes to the losses of an uninterrupted one. Also:
the FSDP checkpoint is the plain dict DDP writes (same keys, shapes, optimizer layout; export and
load_encoder read it), and a DDP checkpoint resumes under FSDP and vice versa with the same losses.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from abvid.train.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dist import free_port  # noqa: E402
from test_pretrain import TINY, losses, shards  # noqa: E402,F401  (shards: module-scoped fixture)

# 2 clips per rank per step, in-process loading (workers=0), one pass per epoch: the same data under either
# strategy; stochastic depth on, so the random masks must agree too (across strategies and recomputes)
BASE = [*TINY, "data.workers=0", "data.resampled=false", "train.batch_size=2", "train.ckpt_every=2",
        "train.keep_last=4", "model.drop_path=0.1"]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def _strategies_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    """Runs, in one process group: DDP and FSDP for 4 steps; FSDP resumed from DDP's step-2 checkpoint and
    DDP from FSDP's; FSDP with per-module compile (dynamo's eager backend: the wrapping order, not inductor)
    and activation checkpointing."""
    _env(rank, world, port)
    import functools

    from abvid.train import compile as tcompile
    tcompile.compile_modules = functools.partial(tcompile.compile_modules, backend="eager")
    from abvid.model import encoder_kwargs
    from abvid.pipeline.config import load_config, to_dict
    from abvid.pipeline.loader import build_loader
    from abvid.train import dist
    from abvid.train.config import PretrainConfig
    from abvid.train.loop import seed_everything, train
    from abvid.train.objectives import build_objective

    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, None, [f"data.shards={shards}", *BASE, "train.steps=4"])
    ctx = dist.init("cpu", timeout_s=120)
    plan = [("ddp", "ddp", None, False), ("fsdp", "fsdp", None, False), ("ddp_to_fsdp", "fsdp", "ddp", False),
            ("fsdp_to_ddp", "ddp", "fsdp", False), ("fsdp_ac", "fsdp", None, True)]   # fsdp_ac: + compile
    try:
        for name, strategy, resume_from, ac in plan:
            run = Path(out) / name
            if resume_from and ctx.is_main:
                (run / "checkpoints").mkdir(parents=True)
                shutil.copy(Path(out) / resume_from / "checkpoints" / "ckpt-00000002.pt", run / "checkpoints")
            dist.barrier(ctx)
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy=strategy,
                                                                   activation_checkpointing=ac, compile=ac))
            seed_everything(c.train.seed)
            obj = build_objective(c.objective, c.model)
            loader = build_loader(c.data, c.train.batch_size, rank=ctx.rank, world_size=ctx.world_size)
            s = train(obj, loader, c.train, run, ctx, to_dict(c), encoder_kwargs(c.model))
            assert s["strategy"] == strategy and s["step"] == 4, s
            from torch.distributed.tensor import DTensor
            sharded = [isinstance(p, DTensor) for p in obj.parameters()]
            assert (sum(sharded) > 0.9 * len(sharded)) == (strategy == "fsdp"), (name, sum(sharded), len(sharded))
    finally:
        dist.shutdown(ctx)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.slow
def test_fsdp_matches_ddp_and_checkpoints_cross_strategies(shards, tmp_path):
    mp.spawn(_strategies_worker, args=(2, free_port(), str(shards), str(tmp_path)), nprocs=2, join=True)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    for step in ddp:                                    # must-show: FSDP == DDP within 1e-5 (fp32)
        assert _close(ddp[step], fsdp[step]), (step, ddp[step], fsdp[step])
    ac = losses(tmp_path / "fsdp_ac")
    assert all(_close(ac[s], fsdp[s]) for s in fsdp), (ac, fsdp)
    for name, ref in (("ddp_to_fsdp", ddp), ("fsdp_to_ddp", fsdp)):   # resumed at step 2 under the other one
        got = losses(tmp_path / name)
        assert sorted(got) == [3, 4], got
        assert all(_close(got[s], ref[s]) for s in (3, 4)), (name, got, ref)

    # The FSDP checkpoint is the plain dict DDP writes.
    a = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "ckpt-00000004.pt")
    b = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "ckpt-00000004.pt")
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        w = b["model"][k]
        assert type(w) is torch.Tensor and w.device.type == "cpu" and (w.shape, w.dtype) == (v.shape, v.dtype), k
        # Encoders only: a bias before BatchNorm (the heads) gets a zero gradient up to rounding noise, which
        # Adam normalises into lr-sized steps, so those values differ between any two reduction orders.
        if k.startswith(("student_encoder.", "teacher_encoder.")):
            assert torch.allclose(v, w, atol=1e-5), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for key, v in st.items():
            w = b["optimizer"]["state"][i][key]
            assert type(w) is torch.Tensor and w.shape == v.shape, (i, key)
    assert b["rng"]["world_size"] == b["loader_state"]["world_size"] == 2

    from abvid.model import load_encoder
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        za = load_encoder(tmp_path / "ddp" / "checkpoints" / "ckpt-00000004.pt").embed(x)
        zb = load_encoder(tmp_path / "fsdp" / "checkpoints" / "ckpt-00000004.pt").embed(x)
    assert torch.allclose(za, zb, atol=1e-4)


def _pretrain_worker(rank: int, world: int, port: int, shards: str, run_dirs: list[str], kill_at_call: int) -> None:
    """``abvid pretrain``'s function under FSDP, once per run dir; SIGKILLs itself (no handler, no checkpoint)
    at the given loss call, on every rank, at the start of the step: a real kill, not an exception."""
    _env(rank, world, port)
    from abvid.pipeline.config import load_config
    from abvid.train.config import PretrainConfig
    from abvid.train.objectives.base import Objective
    from abvid.train.pretrain import pretrain

    if kill_at_call:
        calls, loss = [0], Objective.loss

        def counted(self, batch, teacher_temp=None):
            calls[0] += 1
            if calls[0] == kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(self, batch, teacher_temp)
        Objective.loss = counted
    cfg = load_config(PretrainConfig, None, [f"data.shards={shards}", *TINY, "train.strategy=fsdp",
                                             "train.steps=6", "train.ckpt_every=3"])
    ports = [port] + [int(p) for p in os.environ.get("ABVID_TEST_MORE_PORTS", "").split(",") if p]
    for run_dir, p in zip(run_dirs, ports):  # pretrain() seeds everything and makes its own process group
        os.environ["MASTER_PORT"] = str(p)   # a fresh rendezvous store for each group
        pretrain(cfg, run_dir)


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_same_losses(shards, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):            # killed in step 5
        mp.spawn(_pretrain_worker, args=(2, free_port(), str(shards), [part], 5), nprocs=2, join=True)
    assert [p.name for p in sorted((tmp_path / "part" / "checkpoints").iterdir())] == ["ckpt-00000003.pt"]
    # the resume, then an uninterrupted run for reference (same processes: two launches instead of three)
    os.environ["ABVID_TEST_MORE_PORTS"] = str(free_port())            # read by the spawned workers
    try:
        mp.spawn(_pretrain_worker, args=(2, free_port(), str(shards), [part, full], 0), nprocs=2, join=True)
    finally:
        del os.environ["ABVID_TEST_MORE_PORTS"]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert "resuming from" in (tmp_path / "part" / "train.log").read_text()


def test_activation_checkpointing_keeps_losses_and_gradients():
    from abvid.model import ModelConfig
    from abvid.tools.bench.train import random_batch
    from abvid.train.fsdp import checkpoint_blocks
    from abvid.train.objectives import ObjectiveConfig, build_objective

    torch.manual_seed(0)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=3, num_heads=2, drop_path=0.2)
    obj = build_objective(ObjectiveConfig(name="simclr", proj_dim=16, proj_hidden_dim=32, decoder_dim=16,
                                          decoder_depth=1, decoder_heads=2), mcfg)
    ref = copy.deepcopy(obj)
    assert checkpoint_blocks(obj.student_encoder) == 3
    batch = random_batch(3, 2, 32, 2, 16, "cpu")
    out = []
    for m in (obj, ref):
        torch.manual_seed(1)                              # stochastic depth draws: recomputed identically
        loss, _ = m.loss(batch)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    for n, g in out[0][1].items():
        torch.testing.assert_close(g, out[1][1][n], rtol=1e-5, atol=1e-7)
    assert obj.state_dict().keys() == ref.state_dict().keys()           # names unchanged
