"""Shared output format of every ``abvid bench`` subcommand.

Each benchmark prints human-readable lines, then ends with exactly one JSON
line holding at least ``bench``, ``throughput``, ``unit``, ``bound`` and
``ratio`` (throughput / bound, both measured in the same run).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager


def report(bench: str, throughput: float, unit: str, bound: float, **extra) -> dict:
    ratio = throughput / bound if bound > 0 else float("nan")
    row = {"bench": bench, "throughput": round(throughput, 3), "unit": unit,
           "bound": round(bound, 3), "ratio": round(ratio, 3), **extra}
    print(f"{bench}: {throughput:.1f} {unit}  bound {bound:.1f} {unit}  ratio {ratio:.2f}")
    print(json.dumps(row), flush=True)
    return row


@contextmanager
def timer():
    """``with timer() as t: ...; t()`` -> elapsed seconds."""
    start = time.perf_counter()
    end = [None]
    yield lambda: (end[0] or time.perf_counter()) - start
    end[0] = time.perf_counter()
