"""Tests of `abvid inspect` (tools/cmd_inspect.py) and the contact sheet (tools/contact_sheet.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from abvid.tools import cmd_inspect
from abvid.tools.contact_sheet import shown_frames
from abvid.tools.cli import main
from conftest import write_test_shards


def test_inspect_prints_stats_and_writes_a_png(tmp_path, capsys):
    write_test_shards(tmp_path / "shards", videos=3, clips_per_video=2, clip_len=8, width=96, height=64)
    (tmp_path / "shards" / "manifest.jsonl").write_text('{"status": "ok"}\n{"status": "failed"}\n')
    out = tmp_path / "sheet.png"
    assert main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--clips", "2", "--thumb", "64"]) == 0
    text = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert lines["clips"].split()[-1] == "6" and lines["videos"].split()[-1] == "3"
    assert "48" in lines["frames"] and "96x64" in lines["frame size"]
    assert "100.0% of frames, 3/3 videos" in lines["annotation coverage"]
    assert "red" in lines["labels (share of frames)"] and "ok 1" in lines["manifest"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        two = im.size
        assert two[0] >= 8 * 96 and two[1] > 2 * 2 * 64   # 8 frames wide; 2 clips x (frames + views) tall
        px = np.asarray(im)
        assert px.std() > 20                                 # not a blank canvas
    assert main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--clips", "3", "--thumb", "64"]) == 0
    with Image.open(out) as im:
        assert im.size[1] > two[1]                           # one more clip block


def test_inspect_counts_every_manifest_of_sliced_and_prefixed_runs(tmp_path, capsys):
    """preprocess --slice / --prefix write <prefix>-manifest.jsonl: inspect sums all of them."""
    from abvid.pipeline.manifest import run_files
    shards = tmp_path / "shards"
    write_test_shards(shards, videos=2, clips_per_video=1, clip_len=4)
    names = [run_files(p)[0] for p in ("shard-0-of-2", "shard-1-of-2", "extra")]
    assert names == ["shard-0-of-2-manifest.jsonl", "shard-1-of-2-manifest.jsonl", "extra-manifest.jsonl"]
    (shards / names[0]).write_text('{"status": "ok"}\n{"status": "ok"}\n')
    (shards / names[1]).write_text('{"status": "ok"}\n{"status": "failed"}\n\n')
    (shards / names[2]).write_text('{"status": "skipped"}\n{"status": "ok", "pa')    # torn last line
    (shards / "notes.jsonl").write_text('{"status": "failed"}\n')                      # not a manifest
    with pytest.warns(UserWarning, match="extra-manifest.jsonl:2"):
        assert main(["inspect", str(shards)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("manifest"))
    assert sorted(line.split("  ", 1)[1].strip().split(", ")) == ["failed 1", "ok 3", "skipped 1"]
    assert cmd_inspect.read_manifest([str(tmp_path / "elsewhere")]) is None


def test_pick_clips_prefers_distinct_videos():
    clips = [("u", f"k{v}-{c}", f"v{v}") for v in range(3) for c in range(4)]
    picked = cmd_inspect.pick_clips(clips, 3, seed=1)
    assert len({v for _, _, v in picked}) == 3
    assert cmd_inspect.pick_clips(clips, 3, seed=1) == picked
    assert len(cmd_inspect.pick_clips(clips, 50, seed=0)) == 12


def test_shown_frames_cover_every_view():
    got = shown_frames(16, np.array([3, 3, 15, 0]), 4)
    assert set(got) >= {0, 3, 15} and len(got) == 4 and got == sorted(got)
    got = shown_frames(16, np.array([1, 9, 9, 12, 13, 14]), 3)
    assert set(got) >= {1, 9, 12, 13, 14} and got == sorted(got)
    assert shown_frames(4, np.array([0]), 8) == [0, 1, 2, 3]


def test_inspect_missing_shards_is_a_usage_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_uses_config_view_settings(tmp_path, capsys):
    write_test_shards(tmp_path / "shards", videos=1, clips_per_video=1, clip_len=4)
    out = tmp_path / "s.png"
    assert main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--thumb", "48",
                 "--set", "data.n_local=0", "--set", "data.n_global=1"]) == 0
    with Image.open(out) as im:
        narrow = im.size
    assert main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--set", "data.bogus=1"]) == 2
    assert "data.bogus" in capsys.readouterr().err
    assert narrow[0] >= 4 * 48


def test_a_clip_with_a_corrupt_frame_is_left_off_the_sheet(tmp_path, capsys):
    import io
    import tarfile
    shards = write_test_shards(tmp_path / "shards", videos=2, clips_per_video=1, clip_len=4, shard_clips=1)
    with tarfile.open(shards[0]) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shards[0], "w") as tf:
        for m, data in members:
            data = b"not a jpeg" if m.name.endswith(".001.jpg") else data
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    out = tmp_path / "s.png"
    with pytest.warns(UserWarning, match="left out"):
        assert main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--clips", "2"]) == 0
    with Image.open(out) as im:
        one_block = im.size[1]
    write_test_shards(tmp_path / "ok", videos=2, clips_per_video=1, clip_len=4, shard_clips=1)
    assert main(["inspect", str(tmp_path / "ok"), "--out", str(out), "--clips", "2"]) == 0
    with Image.open(out) as im:
        assert im.size[1] > one_block


def test_inspect_warns_about_small_frames_and_fewer_clips_than_a_batch(tmp_path, capsys):
    """85x64 frames under 224 px views, 6 clips for a batch of 64: both said, the job still succeeds."""
    write_test_shards(tmp_path / "shards", videos=3, clips_per_video=2, clip_len=4, width=85, height=64)
    assert main(["inspect", str(tmp_path / "shards")]) == 0
    err = capsys.readouterr().err
    assert "warning: frames as small as 64 px" in err and "data.global_size=224" in err
    assert "warning: only 6 clips for a batch of train.batch_size=64" in err
    # settings that fit: no warning
    assert main(["inspect", str(tmp_path / "shards"), "--set", "data.global_size=64", "--set", "data.local_size=32",
                 "--set", "train.batch_size=4"]) == 0
    assert "warning" not in capsys.readouterr().err
