"""tools/bench/preprocess.py and loader.py: honest bounds, the closing JSON lines (embed's: test_embed.py)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import make_video, write_test_shards

from abvid.pipeline.video import decode_only, open_video
from abvid.tools.cli import main


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_preprocess_bound_decodes_what_the_pipeline_decodes(tmp_path):
    """H.264 with B-frames at 4 fps of 30: the bound skips the non-reference frames no slot needs, as preprocess does."""
    video = make_video(tmp_path / "b.mp4", fps=30, num_frames=90, width=96, height=64)
    with open_video(str(video), fps=4.0, short_side=48) as dec:
        list(dec)
        pipeline_decoded = dec.frames_decoded
    assert decode_only(video, fps=4.0) == pipeline_decoded < decode_only(video) == 90


def test_bench_preprocess_file_and_folder_end_with_json(tmp_path, capsys, monkeypatch):
    video = make_video(tmp_path / "in" / "a.mp4", fps=30, num_frames=90, width=96, height=64)
    make_video(tmp_path / "in" / "b.mp4", fps=10, num_frames=40, width=96, height=64, seed=1)
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))   # no ffmpeg binary: the comparison is skipped
    assert main(["bench", "preprocess", str(video), "--size", "48", "--clip-len", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    row = _last_json(out)
    assert row["bench"] == "preprocess" and row["unit"] == "source frames/s" and row["frames_in_file"] == 90
    assert row["frames_decoded"] == decode_only(video, fps=4.0) and "ffmpeg_s" not in row and "no ffmpeg" in out
    assert row["ratio"] == pytest.approx(row["throughput"] / row["bound"], rel=1e-2)
    assert main(["bench", "preprocess", str(tmp_path / "in"), "--workers", "2", "--size", "48", "--clip-len", "4",
                 "--rounds", "1"]) == 0
    row = _last_json(capsys.readouterr().out)
    assert (row["unit"], row["videos"], row["workers"]) == ("videos/hour/node", 2, 2) and row["throughput"] > 0


def test_bench_preprocess_times_the_ffmpeg_cli_when_one_is_on_path(tmp_path, capsys, monkeypatch):
    """The comparison's plumbing, with a stand-in ``ffmpeg`` (none is installed here; abvid does not need one)."""
    video = make_video(tmp_path / "a.mp4", fps=10, num_frames=30, width=96, height=64)
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\nsleep 0.2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert main(["bench", "preprocess", str(video), "--size", "48", "--clip-len", "4", "--rounds", "1"]) == 0
    row = _last_json(capsys.readouterr().out)
    assert row["ffmpeg_s"] >= 0.2 and row["speedup_vs_ffmpeg"] == pytest.approx(row["ffmpeg_s"] * row["throughput"]
                                                                                / row["frames_in_file"], rel=0.05)
    args = (fake.parent / "args").read_text()
    assert "fps=4" in args and "scale=" in args and str(video) in args


def test_bench_loader_bound_reads_and_decodes_the_same_jpegs(tmp_path, capsys):
    shards = write_test_shards(tmp_path / "shards", videos=4, clips_per_video=4, clip_len=8, shard_clips=4)
    assert main(["bench", "loader", str(tmp_path / "shards"), "--workers", "2", "--batches", "3", "--warmup", "1",
                 "--batch-size", "4", "--rounds", "1", "--set", "global_size=32", "--set", "local_size=16"]) == 0
    out = capsys.readouterr().out
    row = _last_json(out)
    assert row["bench"] == "loader" and row["unit"] == "views/s" and row["workers"] == 2 and len(shards) == 4
    assert 1 <= row["frames_per_clip"] <= 8 and row["bound"] > 0 and "read + decode" in out
    assert row["ratio"] == pytest.approx(row["throughput"] / row["bound"], rel=1e-2)


def test_bench_inputs_that_do_not_exist_are_usage_errors(tmp_path, capsys):
    for bench in ("preprocess", "embed"):
        assert main(["bench", bench, str(tmp_path / "nope.mp4")]) == 2
        assert "no such file" in capsys.readouterr().err
    assert not Path(tmp_path / "nope.mp4").exists()
