"""``train.compile``: torch.compile per module (bounded compile time) or the whole loss call, with a cache.

Why per module. Compiling the whole step as one graph (``train.compile_scope=step``, the
old behaviour) traces student, teacher, heads, value decoder and losses together: on the
H100 host the first step of that ran over 170 s and never finished (README, "Limits").
``compile_scope=modules`` (the default) compiles, from the outside and in place, each
module's ``forward`` (an instance attribute: state-dict keys do not change, and module hooks
such as FSDP's stay outside the compiled code):

* every ViT block of the student and of the teacher. They run the same code, and
  dynamo treats a module's parameters as inputs, so all blocks share the few graphs of
  one block: one per (view size, grad mode, stochastic-depth branch), whatever the depth
  (tests/test_compile.py counts them);
* the heads and the value decoders (student and teacher);
* the family's target and base losses (``family.target_probs``, ``family.base_loss``).

What stays eager: patch embedding and position-embedding interpolation, the glue in
``Objective.loss`` and the bootstrap loss function (issue 10 owns those files; a
module-level function cannot be wrapped from outside). Shapes are static
(``dynamic=False``: one graph per view size, the form CUDA graphs need) and the
recompile limit is raised to :data:`RECOMPILE_LIMIT` so a deep encoder never falls back to
eager silently. Every graph is compiled on the first step that needs it; the inductor
cache (``train.compile_cache``, default ``~/.cache/abvid/torchinductor``; "" = the environment's
``TORCHINDUCTOR_CACHE_DIR`` or torch's ``/tmp`` default) makes later runs with the same shapes
load instead of compile.

Measured on this 2-core CPU (inductor's C++ backend; ``abvid pretrain`` of a width-32, depth-2
ViT for 3 steps, wall time of the whole command, two sessions at load 1-3 and 3-5): per module
79 / 103 s with a cold cache and 9.6 / 11.5 s with a warm one; the whole step 123 / 209 s cold and
20 / 32 s warm; eager 4.1 / 4.8 s. A compiled 3-step run gives the eager losses to 1e-4
(tests/test_pretrain.py). On CUDA (Triton) neither is measured yet: tools/gpu_check.sh times it.

Order with the other wrappers (train/loop.py ``_wrap``): compile, then activation
checkpointing around the compiled forward, then FSDP / DDP; ``scope=step`` compiles the
wrapped loss call last and is refused under FSDP (train/config.py ``validate``). Checkpointing
outside the compiled code matters: ``torch.utils.checkpoint`` restores the RNG before the
recompute, so stochastic depth draws the same masks twice. Traced inside the compiled block
(checkpointing first, then ``nn.Module.compile``), the recompute drew other masks and the
gradients differed (FSDP, 2 ranks, stochastic depth 0.1: loss 10.505 instead of 10.668 at step 2).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("abvid.train")

RECOMPILE_LIMIT = 64     # per code object; a block has ~8 variants, the default limit is 8


def set_cache_dir(cache_dir: str) -> Path | None:
    """Point inductor's cache at ``cache_dir`` (created); "" leaves TORCHINDUCTOR_CACHE_DIR / torch's default.

    The setting wins over the environment variable: torch itself writes that variable the first time it
    looks for its cache, so its presence does not mean a user chose it.
    """
    if not cache_dir:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) if os.environ.get("TORCHINDUCTOR_CACHE_DIR") else None
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):        # renamed in torch 2.7; set whichever exists
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))


def compile_modules(objective: nn.Module, backend: str | Callable = "inductor", **options: Any) -> list[str]:
    """Compile, in place, the blocks, heads, value decoders and family losses of an Objective.

    Returns the names of what was compiled (for the log). ``backend``/``options`` go to torch.compile
    (tests pass a counting backend).
    """
    _raise_recompile_limit()
    kw = {"backend": backend, "dynamic": False, **options}
    done: list[str] = []
    for enc_name in ("student_encoder", "teacher_encoder"):
        enc = getattr(objective, enc_name, None)
        for i, blk in enumerate(getattr(enc, "blocks", None) or []):
            blk.forward = torch.compile(blk.forward, **kw)
            done.append(f"{enc_name}.blocks.{i}")
    for name in ("student_head", "teacher_head", "student_value", "teacher_value"):
        mod = getattr(objective, name, None)
        if isinstance(mod, nn.Module):
            mod.forward = torch.compile(mod.forward, **kw)
            done.append(name)
    family = getattr(objective, "family", None)
    for fn in ("target_probs", "base_loss"):
        method = getattr(family, fn, None)
        if method is not None:
            setattr(family, fn, torch.compile(method, **kw))   # instance attribute: the class is untouched
            done.append(f"family.{fn}")
    return done


def compile_step(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """``train.compile_scope=step``: the whole loss call as one compiled module (may take minutes on CUDA)."""
    _raise_recompile_limit()
    return torch.compile(model, backend=backend)


def apply(objective: nn.Module, scope: str, cache_dir: str) -> None:
    """The loop's entry for ``scope=modules`` (``step`` is applied by the loop after wrapping)."""
    where = set_cache_dir(cache_dir)
    if scope == "modules":
        done = compile_modules(objective)
        log.info("torch.compile per module (%d modules: ViT blocks, heads, value decoders, losses); cache %s",
                 len(done), where or "torch's default")
    else:
        log.info("torch.compile of the whole loss call; cache %s", where or "torch's default")
