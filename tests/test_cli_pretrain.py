"""`abvid pretrain` end to end, for what issue 13 adds: bad shards, model.init_from, TensorBoard.

One training run (module fixture) over shards of which one is a truncated tar and one holds a
clip whose frame is not a JPEG: it must finish, name both shards on stderr and count both in
``data_skipped``. Its checkpoint, exported, then starts a second run (``model.init_from``) that
must begin with the same features. The first run's TensorBoard folder holds the scalars and the
first batch's contact sheet.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_test_shards  # noqa: E402
from test_cli_errors import TINY, _sets  # noqa: E402

from abvid.train.metrics import read_metrics  # noqa: E402


def abvid(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "abvid.tools.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def damage(shards: list[Path]) -> tuple[Path, Path]:
    """Truncate shards[1] mid-file; make the first clip of shards[2] a one-frame clip whose frame is no JPEG."""
    truncated, bad = shards[1], shards[2]
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with tarfile.open(bad) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = members[0][0].name.split(".")[0]
    with tarfile.open(bad, "w") as tf:
        for m, payload in members:
            if m.name.startswith(key + ".") and m.name.endswith(".jpg"):
                if not m.name.endswith(".000.jpg"):
                    continue
                payload = b"this member is not a JPEG"
            elif m.name == f"{key}.json":
                meta = json.loads(payload)
                meta["pts_s"], meta["frame_indices"] = meta["pts_s"][:1], meta["frame_indices"][:1]
                payload = json.dumps(meta).encode()
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    return truncated, bad


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path, Path]:
    d = tmp_path_factory.mktemp("pretrain_bad_shards")
    shards = write_test_shards(d / "shards", videos=4, clips_per_video=4, clip_len=4, shard_clips=4)
    truncated, bad = damage(shards)
    # one pass per epoch over every shard (not resampled), in a real DataLoader worker process
    r = abvid(d, "pretrain", "--out", "run", *_sets(*TINY, "data.shards=shards", "data.resampled=false",
                                                    "data.workers=1", "train.steps=8", "train.log_every=2",
                                                    "train.ckpt_every=8"))
    return d, r, truncated, bad


def test_training_over_a_truncated_tar_and_a_bad_jpeg_finishes_and_reports_both(run):
    d, r, truncated, bad = run
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 8
    err = r.stderr                                                   # paths as given: relative to the run's cwd
    t, b = f"shards/{truncated.name}", f"shards/{bad.name}"
    assert f"skipping shard {t}: tar stream broken" in err
    assert f"skipping shard {b}, key " in err and "frame does not decode" in err
    # once per shard and fault, not once per sample and epoch (8 steps x 4 clips: 2+ passes over the shards)
    assert err.count(f"skipping shard {t}: tar stream broken") == 1
    assert err.count(f"skipping shard {b}") == 1
    rows = [row for row in read_metrics(d / "run" / "metrics.jsonl") if "event" not in row]
    assert rows[-1]["step"] == 8 and rows[-1]["data_skipped"] >= 4           # both faults, in each of 2+ epochs
    assert summary["data_skipped"] == rows[-1]["data_skipped"]
    assert [row["data_skipped"] for row in rows] == sorted(row["data_skipped"] for row in rows)   # a running total


def test_init_from_an_exported_checkpoint_starts_with_the_same_features(run):
    """Must-show: export a trained checkpoint, start a new run from it: its encoders give the same features."""
    from abvid.model import load_encoder
    d = run[0]
    ckpt = d / "run" / "checkpoints" / "ckpt-00000008.pt"
    assert abvid(d, "export", str(ckpt), "--out", "enc.safetensors").returncode == 0
    r = abvid(d, "pretrain", "--out", "run2", *_sets(*TINY, "data.shards=shards", "model.init_from=enc.safetensors"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.init_from: encoder weights from enc.safetensors (abvid export)" in r.stderr
    start = d / "run2" / "checkpoints" / "ckpt-00000000.pt"
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_encoder(d / "enc.safetensors").embed(x)
        assert torch.equal(load_encoder(start, which="student").embed(x), want)
        assert torch.equal(load_encoder(start, which="ema").embed(x), want)
        from abvid.model import build_encoder
        exported = load_encoder(d / "enc.safetensors")
        torch.manual_seed(0)                                         # what run2 would start from without init_from
        fresh = build_encoder(**exported.encoder_kwargs).eval()
        assert not torch.equal(fresh.embed(x), want)


def test_tensorboard_gets_scalars_per_step_and_the_first_batch_sheet(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d = run[0]
    acc = EventAccumulator(str(d / "run" / "tb"), size_guidance={"images": 4, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "data_skipped", "views_per_s"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6, 8]
    [image] = acc.Images("data/first_batch")
    assert image.width >= 4 * 96 and image.height > 4 * 96        # 4 clips x (2 global + 2 local) views
