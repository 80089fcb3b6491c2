"""What a training run says about itself: metrics.jsonl, train.log, TensorBoard, a progress bar.

* ``RUN_DIR/metrics.jsonl``: one JSON object per logging interval, every row
  with ``step`` (the number of optimizer steps done), the interval's mean loss
  and objective metrics, schedules, ``views_per_s``, ``step_time_s`` and
  ``data_wait_frac`` (the share of wall time spent waiting for the loader:
  near 0 means the model is the bottleneck, near 1 the data). Events such as
  skipped non-finite steps are rows with an ``event`` field. On resume the
  rows past the checkpoint's step are dropped, so the file always reads as one
  uninterrupted run.
* ``RUN_DIR/train.log``: the human log (resume, checkpoints, warnings).
* TensorBoard (the ``tb`` extra: ``pip install 'abvid[tb]'``) in ``RUN_DIR/tb``: every
  metrics row as scalars at its step (loss, objective metrics, schedules, throughput,
  ``data_skipped``), and images written with :func:`write_tb_image` (``abvid pretrain``
  draws the first batch: tools/contact_sheet.py ``batch_sheet``). Without tensorboard
  the run says so once in the log and writes the rest.
* a tqdm bar with loss and views/s on rank 0.

Only rank 0 writes files; other ranks log warnings to stderr with their rank.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from tqdm import tqdm
except ImportError:  # a bare GPU host (tools/gpu_check.sh) may lack it: no bar, the log lines remain
    tqdm = None

log = logging.getLogger("abvid.train")


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if tqdm is None:
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill training; mirror logging.Handler.handleError
            self.handleError(record)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Console (+ ``run_dir/train.log`` on rank 0) handlers for the ``abvid.train`` logger."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = _TqdmHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    log.addHandler(console)
    if rank == 0 and run_dir is not None:
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file (for tests, plots and the README)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact readable
    return v


class IntervalMeter:
    """Sums over one logging interval: loss/metrics, step time, data-wait time, views."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.views = 0
        self.data_s = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, float], views: int, data_s: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        self.views += views
        self.data_s += data_s

    def summary(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        out.update(views_per_s=self.views / wall, step_time_s=wall / max(self.steps, 1),
                   data_wait_frac=min(self.data_s / wall, 1.0))
        return out


class MetricsWriter:
    """metrics.jsonl + TensorBoard + progress bar; inert (``enabled=False``) on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self._drop_rows_after(start_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step)
            except ImportError:
                log.info("tensorboard not installed (pip install 'abvid[tb]'); metrics go to %s only", self.path)
        interactive = sys.stderr.isatty()
        self.bar = None if tqdm is None else tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=0.5 if interactive else 30.0, file=sys.stderr,
                        disable=total_steps == 0)

    def _drop_rows_after(self, step: int) -> None:
        """Keep only rows with ``step <= step`` (a resumed run redoes the steps after its checkpoint)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics_tolerant(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert "step" in row, "every metrics row carries the step"
        self.file.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
        if self.tb is not None and "event" not in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])

    def advance(self, n: int, loss: float, views_per_s: float | None) -> None:
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}"}
            if views_per_s is not None:
                post["views/s"] = f"{views_per_s:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def write_tb_image(run_dir: str | Path, tag: str, image: Any, step: int = 0) -> bool:
    """Write one (H, W, 3) uint8 image to ``RUN_DIR/tb`` under ``tag``; False when tensorboard is missing.

    A writer of its own (a second event file in the same folder; TensorBoard merges them), so the
    caller needs no handle on the run's :class:`MetricsWriter`.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    writer = SummaryWriter(str(Path(run_dir) / "tb"))
    try:
        writer.add_image(tag, image, step, dataformats="HWC")
    finally:
        writer.close()
    return True


def read_metrics_tolerant(path: Path) -> list[dict]:
    """Like :func:`read_metrics` but drops a torn last line (a run killed mid-write)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping unreadable line %r (run killed mid-write?)", path, line[:80])
    return rows


def to_floats(metrics: dict[str, Any], *extra: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """Tensor metrics (and ``extra`` 0-d tensors) -> floats in one device transfer; NaN metrics (empty
    buckets) are dropped. ``Objective.loss`` returns its metrics as tensors so that the training loop
    can make this the one host sync of a step (train/loop.py ``train_step``)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    tensors = [metrics[k].detach().float().reshape(()) for k in keys] + [t.detach().float().reshape(()) for t in extra]
    values = torch.stack(tensors).tolist() if tensors else []
    out.update(zip(keys, values))
    return {k: v for k, v in out.items() if not math.isnan(v)}, values[len(keys):]
