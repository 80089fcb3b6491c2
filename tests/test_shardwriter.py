"""pipeline/shardwriter.py: deterministic tar members, atomic shards, the commit log and recovery."""
from __future__ import annotations

import json
import tarfile

import pytest

from abvid.pipeline.manifest import Manifest
from abvid.pipeline.shardwriter import ShardWriter, SpoolWriter, recover, tar_member


def _spool(path, key: str, n: int = 2) -> str:
    with SpoolWriter(path) as s:
        for i in range(n):
            s.add(f"{key}.{i:03d}.jpg", f"{key}-{i}".encode() * 100)
        s.add(f"{key}.json", json.dumps({"key": key}).encode())
    return str(path)


def _row(path: str, clips: int = 1) -> dict:
    return {"path": path, "status": "ok", "clips": clips}


def test_tar_member_is_deterministic_and_handles_long_names(tmp_path):
    assert tar_member("a-000000.000.jpg", b"x") == tar_member("a-000000.000.jpg", b"x")
    long_key = "v" * 150 + "-000000"
    with SpoolWriter(tmp_path / "s") as s:
        s.add(f"{long_key}.json", b"{}")
    data = (tmp_path / "s").read_bytes() + b"\0" * 1024
    (tmp_path / "t.tar").write_bytes(data)
    assert tarfile.open(tmp_path / "t.tar").getnames() == [f"{long_key}.json"]


def test_shards_hold_whole_videos_and_are_read_by_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    m = Manifest(tmp_path / "manifest.jsonl")
    w = ShardWriter(tmp_path, "shard", m, max_clips=3)
    for v in range(4):  # 2 clips per video: shards close after 2 videos (4 >= 3 clips)
        spool = _spool(tmp_path / f"{v}.spool", f"vid{v}-000000")
        _spool(tmp_path / f"{v}b.spool", f"vid{v}-000001")
        with open(spool, "ab") as f:
            f.write((tmp_path / f"{v}b.spool").read_bytes())
        w.append(spool, 2, _row(f"/v{v}.mp4", 2))
    assert w.completed == ["shard-000000.tar", "shard-000001.tar"]  # closed at 4 >= 3 clips, twice
    w.close()
    assert w.completed == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.commit"))
    rows = m.load()
    assert rows["/v0.mp4"]["shards"] == ["shard-000000.tar"] and rows["/v3.mp4"]["shards"] == ["shard-000001.tar"]
    names = tarfile.open(tmp_path / "shard-000000.tar").getnames()
    assert names[:3] == ["vid0-000000.000.jpg", "vid0-000000.001.jpg", "vid0-000000.json"]
    samples = list(wds.WebDataset([str(tmp_path / n) for n in w.completed], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"vid{v}-00000{c}" for v in range(4) for c in range(2)]
    assert samples[0]["001.jpg"] == b"vid0-000000-1" * 100


def test_recover_replays_a_commit_left_between_rename_and_manifest(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    w = ShardWriter(tmp_path, "shard", m, max_clips=100)
    w.append(_spool(tmp_path / "a.spool", "a-000000"), 1, _row("/a.mp4"))
    w.close()
    # Simulate a kill after the rename of shard 1 but before its manifest rows were appended.
    w2 = ShardWriter(tmp_path, "shard", Manifest(tmp_path / "other.jsonl"), next_index=1, max_clips=100)
    w2.append(_spool(tmp_path / "b.spool", "b-000000"), 1, _row("/b.mp4"))
    w2.close()
    (tmp_path / "shard-000001.tar.commit").write_text(json.dumps({**_row("/b.mp4"), "shards": ["shard-000001.tar"]}))
    (tmp_path / "shard-000002.tar.tmp").write_bytes(b"partial")          # kill while writing shard 2
    with open(m.path, "a") as f:
        f.write('{"path": "/torn.mp4", "stat')                              # kill during a manifest write
    with pytest.warns(UserWarning, match="torn manifest row"):
        rows, next_index = recover(tmp_path, "shard", m)
    assert set(rows) == {"/a.mp4", "/b.mp4"} and next_index == 2
    assert not (tmp_path / "shard-000002.tar.tmp").exists()
    assert not (tmp_path / "shard-000001.tar.commit").exists()


def test_recover_moves_orphans_aside_and_drops_ok_rows_without_shards(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    w = ShardWriter(tmp_path, "shard", m, max_clips=1)
    w.append(_spool(tmp_path / "a.spool", "a-000000"), 1, _row("/a.mp4"))
    w.append(_spool(tmp_path / "b.spool", "b-000000"), 1, _row("/b.mp4"))
    (tmp_path / "shard-000000.tar").unlink()                              # user deleted a shard
    m.append([_row("/c.mp4") | {"status": "failed", "shards": []}])
    (tmp_path / "shard-000007.tar").write_bytes(b"")                      # shard no row refers to
    (tmp_path / "other-000000.tar").write_bytes(b"")                      # another prefix: untouched
    with pytest.warns(UserWarning):
        rows, next_index = recover(tmp_path, "shard", m)
    assert set(rows) == {"/b.mp4", "/c.mp4"} and next_index == 2
    assert (tmp_path / "shard-000007.tar.orphan").exists() and (tmp_path / "other-000000.tar").exists()


def test_skipped_row_never_hides_the_real_row(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    m.append([_row("/a.mp4"), {"path": "/a.mp4", "status": "skipped"}])
    assert m.load()["/a.mp4"]["status"] == "ok"


def test_recover_touches_only_its_own_prefix(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    for name in ("shard-0-of-2-000000.tar.tmp", "shard-0-of-2-000001.tar.commit", "shardx-000000.tar.tmp"):
        (tmp_path / name).write_bytes(b"in progress by another run")
    (tmp_path / "shard-000003.tar.tmp").write_bytes(b"ours")
    rows, next_index = recover(tmp_path, "shard", m)
    assert (rows, next_index) == ({}, 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "manifest.jsonl") == [
        "shard-0-of-2-000000.tar.tmp", "shard-0-of-2-000001.tar.commit", "shardx-000000.tar.tmp"]


def test_shard_bytes_limit_closes_between_videos(tmp_path):
    m = Manifest(tmp_path / "manifest.jsonl")
    w = ShardWriter(tmp_path, "s", m, max_bytes=10000)
    for v in range(5):   # each spool is 7 kB (3 x 2 kB frames + 1 kB json): a shard closes after 2 videos
        w.append(_spool(tmp_path / f"{v}.spool", f"v{v}-000000", n=3), 1, _row(f"/v{v}.mp4"))
    w.close()
    shard_of = {r["path"]: r["shards"][0] for r in m.load().values()}
    assert [shard_of[f"/v{v}.mp4"] for v in range(5)] == ["s-000000.tar"] * 2 + ["s-000001.tar"] * 2 + ["s-000002.tar"]
    for name in w.completed:   # no video split over shards; each shard is a valid tar
        assert tarfile.open(tmp_path / name).getnames()
