"""Checkpoints: atomic write, keep-last-k, weights_only load, corrupt newest -> previous, RNG state."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from abvid.train.checkpoint import (CheckpointError, capture_rng, ckpt_path, list_checkpoints, load_checkpoint,
                                    load_latest, restore_rng, save_checkpoint)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "param_groups": []},
            "scaler": None, "step": step, "epoch": 0, "loader_state": None,
            "rng": {"world_size": 1, "ranks": [capture_rng()]}, "config": {"train": {"steps": 9}},
            "encoder_kwargs": {"arch": "vit_tiny"}}


def test_save_load_roundtrip_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert not list(tmp_path.glob("*.tmp"))                     # temp files renamed away
    state, path = load_latest(tmp_path)
    assert path == ckpt_path(tmp_path, 5) and state["step"] == 5
    assert torch.equal(state["model"]["w"], torch.full((3,), 5.0))


def test_truncated_newest_is_skipped_with_warning(tmp_path, caplog):
    save_checkpoint(_state(1), tmp_path, 1)
    newest = save_checkpoint(_state(2), tmp_path, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="abvid.train"):
        state, path = load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt"
    assert any("skipping checkpoint" in r.message and "ckpt-00000002.pt" in r.message for r in caplog.records)


@pytest.mark.parametrize("cut", [0, 10, 200, -40])
def test_truncated_anywhere_is_a_checkpoint_error(tmp_path, cut):
    p = save_checkpoint(_state(3), tmp_path, 3)
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(CheckpointError, match="ckpt-00000003.pt"):
        load_checkpoint(p)


def test_all_corrupt_is_an_error_and_empty_is_none(tmp_path):
    assert load_latest(tmp_path / "nothing") is None
    ckpt_path(tmp_path, 7).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="--no-resume"):
        load_latest(tmp_path)


def test_unsafe_content_is_refused_not_skipped(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1)
    bad = _state(2)
    bad["loader_state"] = np.arange(3)  # pickled by torch.save, refused by weights_only
    save_checkpoint(bad, tmp_path, 2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_latest(tmp_path)


def test_rng_capture_restore_roundtrip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    p = save_checkpoint({"step": 0, "rng": state}, tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(p)["rng"])                     # through torch.save/load(weights_only)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoints_carry_a_format_version_and_other_formats_stop_the_resume(tmp_path):
    from abvid.model.io import CHECKPOINT_FORMAT
    from abvid.train.checkpoint import IncompatibleCheckpointError
    p = save_checkpoint(_state(1), tmp_path, 1)
    assert load_checkpoint(p)["format_version"] == CHECKPOINT_FORMAT
    torch.save({**_state(2), "format_version": CHECKPOINT_FORMAT + 1}, ckpt_path(tmp_path, 2))
    # a newer format is not damage: no fallback to ckpt 1, an error saying what to do
    with pytest.raises(IncompatibleCheckpointError, match=r"ckpt-00000002.pt.*newer abvid.*upgrade.*--no-resume"):
        load_latest(tmp_path)
    ckpt_path(tmp_path, 2).unlink()
    torch.save({"weights": torch.zeros(2)}, ckpt_path(tmp_path, 3))          # a foreign dict
    with pytest.raises(IncompatibleCheckpointError, match="not an abvid checkpoint"):
        load_latest(tmp_path)
    ckpt_path(tmp_path, 3).unlink()
    legacy = _state(4)                                                        # format 0: no version key
    torch.save(legacy, ckpt_path(tmp_path, 4))
    assert load_latest(tmp_path)[0]["step"] == 4
