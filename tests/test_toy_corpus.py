"""Tests for tools/toy_corpus.py: determinism, annotation rows, decodable videos, the CLI.

Run: .venv/bin/python -m pytest -q tests/test_toy_corpus.py
"""
from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest

from abvid.tools import toy_corpus as T
from abvid.tools.cli import main as cli_main

SMALL = dict(videos=3, seconds=2.0, size=(64, 48), fps=8.0)


def _rows(out: Path) -> list[dict]:
    with open(out / "annotations.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["video", "start_s", "end_s", "label"]
        return list(reader)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = T.make_toy_corpus(tmp_path / "a", seed=3, **SMALL)
    b = T.make_toy_corpus(tmp_path / "b", seed=3, **SMALL)
    c = T.make_toy_corpus(tmp_path / "c", seed=4, **SMALL)
    assert [p.name for p in a] == [p.name for p in b] == ["toy_0000.mp4", "toy_0001.mp4", "toy_0002.mp4"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    assert (tmp_path / "a" / "annotations.csv").read_bytes() == (tmp_path / "b" / "annotations.csv").read_bytes()
    assert any(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(a, c))


def test_annotations_valid(tmp_path):
    paths = T.make_toy_corpus(tmp_path, videos=8, seconds=3.0, size=(64, 48), fps=10.0, seed=1)
    rows = _rows(tmp_path)
    names = {p.name for p in paths}
    per_video: dict[str, list[str]] = {}
    for r in rows:
        assert r["video"] in names and (tmp_path / r["video"]).is_file()
        start, end = float(r["start_s"]), float(r["end_s"])
        assert 0.0 <= start < end <= 3.0 + 1e-9
        assert end - start >= 1.5 - 1e-9
        assert r["label"] in T.CLASSES
        per_video.setdefault(r["video"], []).append(r["label"])
    assert set(per_video) == names                     # every video has labels
    for labels in per_video.values():
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
    # the first object of each video spans the whole clip: every frame has a label
    first = {}
    for r in rows:
        first.setdefault(r["video"], r)
    assert all(float(r["start_s"]) == 0.0 and float(r["end_s"]) == 3.0 for r in first.values())
    assert len({r["label"] for r in rows}) >= 4        # several classes across the corpus


def test_videos_decode_with_expected_frames_and_size(tmp_path):
    paths = T.make_toy_corpus(tmp_path, seed=2, **SMALL)
    for p in paths:
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
            assert s.codec_context.name == "h264" and float(s.average_rate) == 8.0
        assert len(frames) == 16 and frames[0].shape == (48, 64, 3)
        # fresh background noise: consecutive frames differ almost everywhere
        diff = np.abs(frames[0].astype(int) - frames[1].astype(int)).sum(-1)
        assert (diff > 0).mean() > 0.8


def test_colour_does_not_identify_class():
    """Instances of one class get widely different colours across videos."""
    colours: dict[str, list[np.ndarray]] = {}
    for i in range(30):
        rng = np.random.default_rng([5, i])
        for o in T._plan_objects(rng, 24, 12.0, 128, 96):
            colours.setdefault(o["cls"], []).append(o["colour"])
    for cls, cs in colours.items():
        if len(cs) >= 3:
            assert np.std(np.array(cs), axis=0).max() > 40, cls


def test_cli_writes_corpus(tmp_path, capsys):
    out = tmp_path / "toy"
    rc = cli_main(["toy-corpus", str(out), "--videos", "2", "--seconds", "1", "--size", "32x32",
                   "--fps", "6", "--seed", "7"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["annotations.csv", "toy_0000.mp4", "toy_0001.mp4"]
    assert "wrote 2 videos" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--size", "33x32"], ["--size", "big"], ["--videos", "0"], ["--fps", "-1"]])
def test_cli_rejects_bad_options(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["toy-corpus", str(tmp_path / "x"), *bad])
    assert e.value.code == 2
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out_fails_cleanly(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli_main(["toy-corpus", str(tmp_path / "file"), "--videos", "1", "--seconds", "1"]) == 3
    assert "cannot write" in capsys.readouterr().err


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["toy-corpus", "--help"])
    text = capsys.readouterr().out
    for word in ("--videos", "--seconds", "--size", "--fps", "--seed", "annotations.csv"):
        assert word in text


def test_crowd_kind_three_objects_of_eight_classes_in_square_frames(tmp_path):
    paths = T.make_toy_corpus(tmp_path, videos=4, seconds=3.0, fps=8.0, seed=0, kind="crowd")
    rows = _rows(tmp_path)
    per_video: dict[str, list[dict]] = {}
    for r in rows:
        assert r["label"] in T.CROWD_CLASSES
        per_video.setdefault(r["video"], []).append(r)
    assert set(per_video) == {p.name for p in paths}
    for objs in per_video.values():
        assert len(objs) == 3 and len({r["label"] for r in objs}) == 3          # distinct classes
        assert any(float(r["start_s"]) == 0.0 and float(r["end_s"]) == 3.0 for r in objs)   # a label every frame
    with av.open(str(paths[0])) as c:
        s = c.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (96, 96)
    with pytest.raises(ValueError, match="unknown kind"):
        T.make_toy_corpus(tmp_path / "x", videos=1, kind="zoo")


def test_crowd_objects_start_in_different_quadrants_and_stay_in_the_frame():
    rng = np.random.default_rng(0)
    objs = T._plan_crowd(rng, n_frames=60, fps=12.0, w=96, h=96)
    quadrants = {(int(o["pos"][0] >= 48), int(o["pos"][1] >= 48)) for o in objs}
    assert len(objs) == 3 and len(quadrants) == 3
    for o in objs:
        for _ in range(60):
            T._step(o)
            assert o["radius"] - 1e-9 <= o["pos"][0] <= 96 - o["radius"] + 1e-9
            assert o["radius"] - 1e-9 <= o["pos"][1] <= 96 - o["radius"] + 1e-9
