"""The training loop (train/loop.py) with a tiny fake objective and a real StatefulDataLoader.

Fakes keep these tests fast and independent of the model/objective code; the
real stack (shards -> loader -> ViT objective) runs in tests/test_pretrain.py.
Run alone: ``pytest -q tests/test_loop.py``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from abvid.train import dist
from abvid.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from abvid.train.loop import train
from abvid.train.metrics import read_metrics

TESTS = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class FakeTrainConfig:
    """The TrainConfig fields the loop reads, with tiny-run values (kept independent of abvid.train.config)."""
    steps: int = 12
    batch_size: int = 4
    lr: float = 0.05
    scale_lr: bool = False
    min_lr: float = 1e-3
    warmup_steps: int = 2
    weight_decay: float = 0.01
    weight_decay_end: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = 0.9
    momentum_end: float = 0.99
    teacher_temp: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_steps: int = 5
    clip_grad: float = 1.0
    amp: bool = False
    compile: bool = False
    find_unused_parameters: bool = False
    deterministic: bool = False
    log_every: int = 1
    ckpt_every: int = 4
    keep_last: int = 2
    max_bad_steps: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    compile_scope: str = "modules"
    compile_cache: str = ""
    strategy: str = "auto"
    activation_checkpointing: bool = False


class FakeObjective(nn.Module):
    """Student + EMA teacher + random noise: loss depends on weights, optimizer, EMA and torch RNG."""

    def __init__(self, dim: int = 16, sleep_s: float = 0.0, nan_from_step: int | None = None,
                 crash_at_call: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.student_encoder = nn.Sequential(nn.Linear(48, dim), nn.GELU(), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, 4)
        self.teacher_encoder = copy.deepcopy(self.student_encoder).requires_grad_(False)
        self.register_buffer("target_proj", torch.randn(48, 4, generator=g))
        self.sleep_s, self.nan_from_step, self.crash_at_call, self.calls = sleep_s, nan_from_step, crash_at_call, 0
        self.keys_seen: list[str] = []

    def loss(self, batch: dict, teacher_temp: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise RuntimeError("simulated crash")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.keys_seen.extend(batch["key"])
        x = batch["global"].float().flatten(0, 1) / 255                     # (B*n, 3, S, S)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)                          # (B*n, 48)
        z = self.student_encoder(x + 0.05 * torch.randn_like(x))           # noise: uses the torch RNG
        with torch.no_grad():
            zt = self.teacher_encoder(x)
        loss = F.mse_loss(self.head(z), x @ self.target_proj) + 0.1 * F.mse_loss(z, zt)
        if self.nan_from_step is not None and self.calls > self.nan_from_step:
            loss = loss * float("nan")
        return loss, {"consistency": float(F.mse_loss(z.detach(), zt))}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for pt, ps in zip(self.teacher_encoder.parameters(), self.student_encoder.parameters()):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


class FakeClips(torch.utils.data.Dataset):
    """Map-style clips with a random flip drawn from the global torch RNG (single-process loading)."""

    def __init__(self, n: int = 24, indices: list[int] | None = None) -> None:
        self.ids = indices if indices is not None else list(range(n))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        cid = self.ids[i]
        g = torch.Generator().manual_seed(cid)
        x = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"global": x, "key": f"clip{cid:03d}", "clip_id": cid}


def fake_loader(rank: int = 0, world: int = 1, batch_size: int = 4) -> StatefulDataLoader:
    ds = FakeClips(indices=list(range(24))[rank::world])
    return StatefulDataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)


def run_fake(run_dir: str, resume: bool = True, sleep_s: float = 0.0, crash_at_call: int | None = None,
             **overrides) -> dict:
    """One fake single-process run (also the entry point of the kill/resume subprocess)."""
    torch.set_num_threads(1)
    tc = FakeTrainConfig(**overrides)
    torch.manual_seed(tc.seed)
    obj = FakeObjective(sleep_s=sleep_s, crash_at_call=crash_at_call)
    ctx = dist.DistContext(0, 1, 0, torch.device("cpu"), None)
    return train(obj, fake_loader(), tc, run_dir, ctx, {"train": dataclasses.asdict(tc)}, {"arch": "fake"}, resume)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r}


def test_trains_logs_and_checkpoints(tmp_path):
    s = run_fake(str(tmp_path), steps=12)
    assert s["status"] == "completed" and s["step"] == 12
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13)) and all("step" in r for r in rows)
    for k in ("loss", "lr", "views_per_s", "step_time_s", "data_wait_frac", "consistency", "teacher_temp"):
        assert k in rows[-1], k
    assert 0.0 <= rows[-1]["data_wait_frac"] <= 1.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00000008.pt", "ckpt-00000012.pt"]
    ck = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000012.pt")
    assert set(ck) >= {"model", "optimizer", "scaler", "step", "epoch", "loader_state", "rng", "config",
                       "encoder_kwargs"}
    assert any(k.startswith("teacher_encoder.") for k in ck["model"])
    assert ck["step"] == 12 and ck["epoch"] == 1   # 0-based pass of the last batch: 6 steps per pass
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "train.log").exists()


def test_zero_steps_writes_untrained_checkpoint(tmp_path):
    s = run_fake(str(tmp_path), steps=0)
    assert s["status"] == "completed" and s["step"] == 0
    ck = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000000.pt")
    assert ck["step"] == 0 and ck["optimizer"]["state"] == {}


def test_resume_in_process_matches_uninterrupted(tmp_path, caplog):
    full = tmp_path / "full"
    run_fake(str(full), steps=12)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fake(str(part), steps=12, crash_at_call=11)    # dies in step 11, after the step-8 checkpoint
    with caplog.at_level(logging.INFO, logger="abvid.train"):
        s = run_fake(str(part), steps=12)                  # resumes from step 8
    assert s["start_step"] == 8
    assert "resuming from" in (part / "train.log").read_text()
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 13))
    for step in range(9, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_no_resume_starts_over(tmp_path):
    run_fake(str(tmp_path), steps=4)
    s = run_fake(str(tmp_path), steps=4, resume=False)
    assert s["start_step"] == 0 and s["step"] == 4
    assert list(tmp_path.glob("checkpoints.*"))            # old checkpoints moved aside, not deleted
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    torch.manual_seed(0)
    obj = FakeObjective(nan_from_step=5)
    tc = FakeTrainConfig(steps=20, max_bad_steps=3, ckpt_every=100)
    ctx = dist.DistContext(0, 1, 0, torch.device("cpu"), None)
    s = train(obj, fake_loader(), tc, str(tmp_path), ctx, {}, {})
    assert s["status"] == "diverged" and s["step"] == 8 and s["bad_steps"] == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    events = [r for r in rows if r.get("event") == "skipped_nonfinite"]
    assert [r["step"] for r in events] == [6, 7, 8]
    assert all(torch.isfinite(p).all() for p in obj.parameters())   # NaN never reached the weights


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL a run after its first checkpoint, resume it, compare per-step losses with a clean run."""
    full, part = tmp_path / "full", tmp_path / "part"
    kw = "steps=16, ckpt_every=4"
    run_fake(str(full), steps=16, ckpt_every=4)
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_loop import run_fake; "
            f"run_fake({str(part)!r}, sleep_s=0.15, {kw})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(part / "checkpoints") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)                                    # kill mid-way between checkpoints
        assert proc.poll() is None, "run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = list_checkpoints(part / "checkpoints")
    assert saved and not list((part / "checkpoints").glob("*.tmp"))
    resumed_from = load_checkpoint(saved[-1])["step"]
    assert 0 < resumed_from < 16
    s = run_fake(str(part), steps=16, ckpt_every=4)
    assert s["start_step"] == resumed_from and s["step"] == 16
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 17))
    for step in range(1, 17):   # steps before the kill: two fresh runs agree; after: the resume does
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    code = (f"import sys, json; sys.path.insert(0, {str(TESTS)!r}); from test_loop import run_fake; "
            f"print(json.dumps(run_fake({str(tmp_path)!r}, sleep_s=0.1, steps=1000, ckpt_every=1000)))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or len(read_metrics(tmp_path / "metrics.jsonl")) < 2:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = __import__("json").loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["signal"] == signal.SIGTERM
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert len(ckpts) == 1 and load_checkpoint(ckpts[0])["step"] == summary["step"] < 1000
    assert "received SIGTERM" in err


def test_truncated_newest_checkpoint_resumes_from_previous(tmp_path):
    full = tmp_path / "full"
    run_fake(str(full), steps=12)
    run = tmp_path / "run"
    run_fake(str(run), steps=12)                            # keeps ckpt 8 and 12
    newest = run / "checkpoints" / "ckpt-00000012.pt"
    newest.write_bytes(newest.read_bytes()[:1000])          # a copy cut short (disk full, partial rsync)
    s = run_fake(str(run), steps=12)
    assert s["start_step"] == 8 and s["step"] == 12
    log_text = (run / "train.log").read_text()
    assert "skipping checkpoint" in log_text and "ckpt-00000012.pt" in log_text
    a, b = losses(full), losses(run)
    assert all(abs(a[k] - b[k]) <= 1e-6 for k in range(1, 13))


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    run_fake(str(tmp_path), steps=4)
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.05 -> 0\.02") as e:
        run_fake(str(tmp_path), steps=8, lr=0.02)
    assert "--no-resume" in str(e.value)
    s = run_fake(str(tmp_path), steps=8, log_every=2)     # steps and log_every are safe to change
    assert s["start_step"] == 4 and s["step"] == 8


def test_config_keys_added_after_a_run_started_do_not_block_its_resume():
    from abvid.train.loop import config_diff
    old = {"train": {"lr": 0.1}, "data": {"seed": 0}}
    new = {"train": {"lr": 0.1, "new_key": 3}, "data": {"seed": 0, "max_bad_fraction": 0.1}, "model": {"x": 1}}
    assert config_diff(old, new) == []
    assert config_diff(old, {"train": {"lr": 0.2}, "data": {"seed": 0}}) == ["train.lr: 0.1 -> 0.2"]
