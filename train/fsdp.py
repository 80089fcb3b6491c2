"""``train.strategy=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), full-state checkpoints, and
activation checkpointing per ViT block.

    torchrun --nproc-per-node 8 -m abvid.tools.cli pretrain examples/configs/vit_l16_multinode.yaml \\
        --set train.strategy=fsdp --out RUN

Sharding (:func:`shard`), ZeRO-3 style over all ranks (one mesh dimension):

* every ViT block of the student **and of the teacher** is its own FSDP unit: its parameters are
  all-gathered just before it runs and freed after (the student's again for backward);
* the root unit is the loss call (``train/loop._LossCall``), holding everything else: patch
  embeddings, tokens, final norms, heads, value decoders. It is gathered once when the loss call
  starts and kept until backward ends. Heads and value decoders cannot be units of their own:
  ``Objective.loss`` reads their parameters outside their ``forward`` (``head.prototypes()``,
  ``value.scale()``), where FSDP would hand it shards.

The EMA teacher is sharded exactly like the student, not replicated. ``update_teacher`` runs
``torch._foreach_lerp_(teacher, student, 1 - m)`` after the optimizer step, when every parameter
is a DTensor shard: teacher and student shards have the same shapes, mesh and placement, so the
EMA is a purely local elementwise update (no communication) and equals the replicated update on
the same elements. A replicated teacher would need the full student every step (an all-gather
of all student parameters for the EMA, as much traffic as the sharded teacher's forward gathers)
and a full copy of the teacher on every rank; sharding keeps teacher memory at 1/world.

Checkpoints are the plain dict DDP writes (docs/INTERFACES.md): :func:`full_model_state` gathers
``objective.state_dict()`` as full CPU tensors on rank 0
(``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict`` and
``cpu_offload``) and :func:`full_optimizer_state` gathers ``optimizer.state_dict()`` in its own
format (state keyed by parameter index, as DDP's), every rank taking part. Resume reads the
same dict on every rank and keeps each rank's shard (:func:`load_model_state`,
:func:`load_optimizer_state`), so ``abvid export``, ``load_encoder`` and resume work across
strategies (tests/test_fsdp.py: DDP -> FSDP and FSDP -> DDP resumes repeat the losses).
Parameters are all-gathered in fp32 under bf16 autocast, as DDP computes (the same numbers;
``MixedPrecisionPolicy(param_dtype=bf16)`` would halve the traffic, untried without a GPU).

Activation checkpointing (:func:`checkpoint_blocks`, ``train.activation_checkpointing``, any
strategy): each student block's forward runs under ``torch.utils.checkpoint`` (non-reentrant,
RNG preserved) and is recomputed in backward. The block's ``forward`` is replaced on the
instance, so parameter names and checkpoints do not change; the teacher runs without gradients
and keeps nothing to recompute.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from abvid.train import dist


def _require_fsdp2():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:                                    # torch < 2.6
        from abvid.pipeline.errors import UsageError
        raise UsageError(f"train.strategy=fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                         f"this is torch {torch.__version__}: upgrade torch or use train.strategy=ddp") from None
    return fully_shard


def _blocks(objective: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [blk for name in names for blk in getattr(getattr(objective, name, None), "blocks", None) or []]


def _mean_grad_over_ranks(param: torch.Tensor) -> None:
    torch.distributed.all_reduce(param.grad)
    param.grad.div_(torch.distributed.get_world_size())


def shard(loss_call: nn.Module, objective: nn.Module, ctx: dist.DistContext) -> nn.Module:
    """fully_shard each student and teacher ViT block, then the loss call (the root); returns the root.

    fully_shard refuses 0-d parameters (the value decoder's ``logit_scale``): they stay replicated plain
    tensors outside FSDP (``ignored_params``) and their gradients are averaged over ranks as soon as they
    are accumulated, as DDP would. Optimizer, gradient clipping and the EMA accept the mixed lists.
    """
    fully_shard = _require_fsdp2()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for blk in _blocks(objective, ("student_encoder", "teacher_encoder")):
        fully_shard(blk, mesh=mesh)
    scalars = {p for p in objective.parameters() if p.ndim == 0}
    fully_shard(loss_call, mesh=mesh, ignored_params=scalars or None)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_mean_grad_over_ranks)
    return loss_call


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(encoder: nn.Module) -> int:
    """Recompute each block of ``encoder`` in backward (names unchanged); returns the number of blocks."""
    blocks = list(getattr(encoder, "blocks", None) or [])
    for blk in blocks:
        blk.forward = functools.partial(_checkpointed, blk.forward)
    return len(blocks)


def _is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full_model_state(objective: nn.Module, sharded: bool, ctx: dist.DistContext) -> dict | None:
    """``objective.state_dict()`` as full tensors, on rank 0 (None elsewhere). Collective when sharded."""
    if not sharded:
        return objective.state_dict() if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if ctx.is_main else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, sharded: bool, ctx: dist.DistContext) -> dict | None:
    """``optimizer.state_dict()`` with every sharded state tensor gathered, on rank 0 (None elsewhere).

    Same layout as an unsharded optimizer's: state keyed by parameter index. Every rank gathers the
    same tensors in the same (index, key) order, one at a time (peak memory: one full tensor).
    """
    state = optimizer.state_dict()
    if not sharded:
        return state if ctx.is_main else None
    out: dict[int, dict[str, Any]] = {}
    for idx in sorted(state["state"]):
        entry = {}
        for key, value in state["state"][idx].items():
            if _is_sharded(value):
                value = value.full_tensor()
            entry[key] = value.detach().cpu() if torch.is_tensor(value) else value
        out[idx] = entry
    return {"state": out, "param_groups": state["param_groups"]} if ctx.is_main else None


def load_model_state(objective: nn.Module, state: dict, sharded: bool) -> None:
    """Load a full (plain) state dict; under FSDP each rank keeps its shard of every tensor."""
    if not sharded:
        objective.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(objective, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load an ``optimizer.state_dict()``-format dict of full tensors; under FSDP shard each like its parameter.

    Every rank holds the same full dict (each read the checkpoint), so the shards are cut locally.
    """
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(params) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"optimizer state for {sum(len(g['params']) for g in state['param_groups'])} parameters, "
                         f"this model has {len(params)}")
    local: dict[int, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        local[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if _is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in entry.items()}
    optimizer.load_state_dict({"state": local, "param_groups": state["param_groups"]})


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), or ``t`` itself (e.g. the gradient norm under FSDP)."""
    return t.full_tensor() if _is_sharded(t) else t
