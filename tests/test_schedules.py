"""Schedules are pure functions of the step (train/schedules.py)."""
from __future__ import annotations

import math

import pytest

from abvid.train.schedules import cosine, linear, scaled_lr, warmup_constant, warmup_cosine


def test_warmup_cosine_endpoints_and_shape():
    base, final, total, warm = 1e-3, 1e-6, 100, 10
    assert warmup_cosine(0, base, final, total, warm) == 0.0
    assert warmup_cosine(5, base, final, total, warm) == pytest.approx(base / 2)
    assert warmup_cosine(warm, base, final, total, warm) == pytest.approx(base)
    mid = warm + (total - warm) // 2
    assert warmup_cosine(mid, base, final, total, warm) == pytest.approx((base + final) / 2)
    assert warmup_cosine(total, base, final, total, warm) == final
    assert warmup_cosine(10 * total, base, final, total, warm) == final
    values = [warmup_cosine(s, base, final, total, warm) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(values[:warm], values[1:warm + 1]))        # rises during warm-up
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))         # then never rises


def test_warmup_longer_than_run_is_all_warmup():
    assert warmup_cosine(5, 1.0, 0.0, total=10, warmup=20) == pytest.approx(0.25)


def test_cosine_and_linear():
    assert cosine(0, 0.996, 1.0, 50) == pytest.approx(0.996)
    assert cosine(25, 0.996, 1.0, 50) == pytest.approx(0.998)
    assert cosine(50, 0.996, 1.0, 50) == 1.0
    assert cosine(3, 2.0, 1.0, 0) == 1.0                   # zero-length schedule: the end value
    assert linear(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert linear(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert warmup_constant(1000, 0.04, 0.07, 30) == 0.07


def test_pure_functions_of_the_step():
    # Same step -> same value, whatever was called before (nothing is stateful).
    a = [warmup_cosine(s, 1.0, 0.1, 40, 4) for s in (7, 3, 39, 7)]
    assert a[0] == a[3] and not math.isnan(a[1])


def test_scaled_lr():
    assert scaled_lr(5e-4, 256) == pytest.approx(5e-4)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="batch"):
        scaled_lr(5e-4, 0)
