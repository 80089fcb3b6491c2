"""Process-group set-up for ``torchrun`` (env://), and the few collectives the loop needs.

One code path: when ``torchrun`` has set ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, :func:`init` joins the
process group (NCCL on GPU, gloo on CPU) and pins this process to GPU
``LOCAL_RANK``; otherwise it returns a single-process context and every helper
below degrades to the identity. Multi-node is the same command on every node:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m abvid.tools.cli pretrain CONFIG.yaml --out RUN_DIR
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from abvid.pipeline.errors import UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None        # None when running as a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment; ``(0, 1, 0)`` when unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is visible, else CPU; ``cuda`` without a GPU is an error."""
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("train.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                             "use --set train.device=cpu or auto, or check the driver / CUDA_VISIBLE_DEVICES")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UsageError(f"LOCAL_RANK={local_rank} but only {n} CUDA devices are visible; "
                               f"start at most {n} processes per node (torchrun --nproc-per-node {n})")
        return torch.device("cuda", local_rank)
    if pref != "auto":
        raise UsageError(f"train.device must be auto, cpu or cuda, got {pref!r}")
    return torch.device("cpu")


def init(device_pref: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group when the environment asks for one; else a single process."""
    rank, world, local = env_world()
    device = pick_device(device_pref, local)
    # torchrun always sets WORLD_SIZE and MASTER_ADDR: then join a group even with one process (same code path
    # as many GPUs, and a one-GPU host can test NCCL); a plain `python`/`abvid` run sets neither.
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if world <= 1 and not launched:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(0, 1, 0, device, None)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun, "
                           f"or unset WORLD_SIZE to run as one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init, binds the communicator to this GPU
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local, device, backend)


def resolve_strategy(pref: str, ctx: DistContext) -> str:
    """``train.strategy`` -> what runs: ``single`` (no process group), ``ddp`` or ``fsdp`` (train/fsdp.py).

    ``auto`` is DDP whenever torchrun started a process group and a single process otherwise; ``ddp`` in a
    single process is the single process (there is nothing to reduce); ``fsdp`` needs a process group.
    """
    if pref not in ("auto", "ddp", "fsdp"):
        from abvid.pipeline.errors import UsageError
        raise UsageError(f"train.strategy must be auto, ddp or fsdp, got {pref!r}")
    if pref == "fsdp":
        if not ctx.distributed:
            from abvid.pipeline.errors import UsageError
            raise UsageError("train.strategy=fsdp needs a process group: launch with torchrun (e.g. torchrun "
                             "--nproc-per-node 2 -m abvid.tools.cli pretrain ...), or use train.strategy=auto")
        return "fsdp"
    return "ddp" if ctx.distributed else "single"


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_max(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (in place; returns ``t``)."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks (in place; returns ``t``)."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world_size
    return t


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (e.g. an EMA teacher outside DDP)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
