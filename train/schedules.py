"""Training schedules: pure functions of the step (DINO / DINOv2 style).

Every quantity the loop changes over time (learning rate, weight decay, EMA
momentum, teacher temperature) is a function ``f(step) -> float`` with no
state, so a resumed run needs nothing but the step to be back on schedule and
the functions can be unit-tested and plotted alone.

    lr = warmup_cosine(step, base=5e-4, final=1e-6, total=10_000, warmup=1_000)

Conventions: ``step`` counts optimizer steps already taken (0 for the first
update); values past ``total`` stay at ``final``.
"""
from __future__ import annotations

import math


def cosine(step: int, start: float, end: float, total: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    if total <= 0 or step >= total:
        return end
    step = max(step, 0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total))


def linear(step: int, start: float, end: float, total: int) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    if total <= 0 or step >= total:
        return end
    step = max(step, 0)
    return start + (end - start) * step / total


def warmup_cosine(step: int, base: float, final: float, total: int, warmup: int = 0,
                  warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup`` steps, then cosine to ``final``.

    The warm-up reaches ``base`` at step ``warmup``; the cosine covers the
    remaining ``total - warmup`` steps (DINO's ``cosine_scheduler``). With
    ``warmup >= total`` the whole run is warm-up.
    """
    if warmup > 0 and step < warmup:
        return linear(step, warmup_start, base, warmup)
    return cosine(step - warmup, base, final, total - warmup)


def warmup_constant(step: int, start: float, end: float, warmup: int) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, then ``end`` (DINO's teacher temperature)."""
    return linear(step, start, end, warmup)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017; DINO: lr = 5e-4 * batch / 256)."""
    if global_batch <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch}")
    return base_lr * global_batch / reference_batch
