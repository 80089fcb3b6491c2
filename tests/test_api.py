"""Tests of abvid.api (tools/api/): the jobs as functions, end to end on two tiny videos."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_video  # noqa: E402

from abvid.api import embed, export, load_encoder, preprocess, pretrain, probe  # noqa: E402
from abvid.pipeline.errors import UsageError  # noqa: E402

TINY = ["data.workers=0", "data.shuffle_buffer=4", "data.global_size=32", "data.local_size=16", "data.n_local=2",
        "objective.name=simclr", "objective.bootstrap=false", "objective.proj_dim=16",
        "objective.proj_hidden_dim=32", "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2", "train.steps=1",
        "train.device=cpu", "train.threads=1"]


def test_preprocess_pretrain_export_load_embed(tmp_path):
    for i in range(2):
        make_video(tmp_path / "videos" / f"v{i}.mp4", fps=8, num_frames=16, width=64, height=48, seed=i)
    stats = preprocess([str(tmp_path / "videos")], tmp_path / "shards", fps=4, size=48, clip_len=4, workers=1)
    assert stats.ok == 2 and stats.clips == 4
    with pytest.raises(UsageError, match="unknown setting.*clip_length"):
        preprocess(str(tmp_path / "videos"), tmp_path / "x", clip_length=4)
    summary = pretrain(None, tmp_path / "run", overrides=[*TINY, f"data.shards={tmp_path / 'shards'}"])
    assert summary["status"] == "completed" and Path(summary["checkpoint"]).is_file()
    enc = load_encoder(summary["checkpoint"])
    path = export(summary["checkpoint"], tmp_path / "vit.safetensors", format="timm")
    from safetensors.torch import load_file
    assert "patch_embed.proj.weight" in load_file(str(path))
    results = embed(str(tmp_path / "videos"), summary["checkpoint"], tmp_path / "emb", fps=4, device="cpu")
    assert [r.status for r in results] == ["ok", "ok"]
    x = np.load(tmp_path / "emb" / "embeddings.npy")
    assert x.shape == (16, 32)                                        # 2 s at 4 fps, twice
    frames = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with torch.no_grad():
        assert enc.embed(frames).shape == (1, 32)
    (tmp_path / "labels.csv").write_text("video,label\nv0.mp4,a\nv1.mp4,b\n")
    with pytest.raises(UsageError, match="one video only"):             # probe's refusal, raised, not exited
        probe(tmp_path / "emb", tmp_path / "labels.csv")
