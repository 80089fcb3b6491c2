"""train/embed_ray.py on a real local Ray (one module-scoped ``ray.init(num_cpus=2)``, no mocks).

The Ray Data pipeline writes what the single-process executor writes: the same rows in the same
order, vectors within 1e-5, the same report; a rerun finds every unit done.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_video, write_test_shards

from abvid.model import build_encoder
from abvid.train import embed as E

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install -e '.[ray]'")

TINY = {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _index(out: Path) -> list[dict]:
    with (out / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_ray_data_embed_equals_the_single_process_output_and_resumes(tmp_path, cluster):
    torch.manual_seed(0)
    encoder = build_encoder(**TINY).eval()
    for i in range(3):
        make_video(tmp_path / "v" / f"c{i}.mp4", fps=12, num_frames=20 + 13 * i, width=80, height=64, seed=i)
    (tmp_path / "v" / "broken.mp4").write_bytes(b"not a video")
    write_test_shards(tmp_path / "shards", videos=2, clips_per_video=2, clip_len=4, shard_clips=3)
    inputs = [str(tmp_path / "v"), str(tmp_path / "shards")]
    kw = dict(size=32, batch_size=5, pool="cls+mean", normalize=True, progress=False)
    local = E.embed_inputs(inputs, tmp_path / "local", encoder, **kw)
    remote = E.embed_inputs(inputs, tmp_path / "ray", encoder, executor="ray", **kw)
    assert [(r.input, r.status, r.frames) for r in remote] == [(r.input, r.status, r.frames) for r in local]
    assert [r.status for r in local].count("failed") == 1 and sum(r.frames for r in local) > 40
    assert _index(tmp_path / "ray") == _index(tmp_path / "local")
    a, b = np.load(tmp_path / "ray" / "embeddings.npy"), np.load(tmp_path / "local" / "embeddings.npy")
    assert a.shape == b.shape == (len(_index(tmp_path / "local")), 128)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    report = [json.loads(line) for line in (tmp_path / "ray" / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in report] == [r.status for r in local]
    again = E.embed_inputs(inputs, tmp_path / "ray", encoder, executor="ray", **kw)   # resumable: all done
    assert [r.status for r in again] == ["cached" if r.status == "ok" else r.status for r in local]
    assert np.load(tmp_path / "ray" / "embeddings.npy").tobytes() == a.tobytes()
