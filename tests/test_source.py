"""Shard sources: expansion, pipe: policy, split by rank/worker, tar reading, grouping, shuffle, bad tars."""
from __future__ import annotations

import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from abvid.pipeline.source import (SampleSkipped, check_split, epoch_shards, expand_shards, group_samples,
                                   shuffle, tar_members)
from conftest import serve_folder, write_test_shards


def test_expand_file_folder_brace_glob_and_lists(test_shards):
    folder = test_shards[0].parent
    names = [str(p) for p in test_shards]
    (folder / "shard-000009.tar.tmp").write_bytes(b"incomplete")        # an interrupted write: ignored
    assert expand_shards(str(folder)) == names
    assert expand_shards(names[1]) == [names[1]]
    assert expand_shards(str(folder / "shard-{000000..000002}.tar")) == names
    assert expand_shards(str(folder / "shard-00000[12].tar")) == names[1:]
    assert expand_shards(f"{names[2]}::{names[0]}") == [names[2], names[0]]
    assert expand_shards([names[1], str(folder)]) == [names[1]] + names


def test_expand_errors_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        expand_shards(str(tmp_path / "missing-{0..1}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar files"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no shards given"):
        expand_shards("")
    with pytest.raises(ValueError, match="unsupported URL scheme.*pipe:"):
        expand_shards("s3://bucket/shard-0.tar")


def test_http_urls_are_kept():
    urls = expand_shards("https://example.org/data/shard-{000..002}.tar")
    assert urls == [f"https://example.org/data/shard-{i:03d}.tar" for i in range(3)]


def test_pipe_rejected_unless_allowed(test_shards):
    url = f"pipe:cat {test_shards[0]}"
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_shards(url)
    with pytest.raises(ValueError, match="allow_pipe"):
        list(tar_members()([url]))
    assert expand_shards(url, allow_pipe=True) == [url]
    direct = [m["name"] for m in tar_members()([str(test_shards[0])])]
    piped = [m["name"] for m in tar_members(allow_pipe=True)([url])]
    assert piped == direct and len(direct) == 4 * 9                      # 4 clips x (json + 8 frames)


def test_check_split_error_names_counts():
    check_split(4, 2, 2)
    with pytest.raises(ValueError, match="3 shard.*2 rank.*2 worker.*= 4 readers"):
        check_split(3, 2, 2)


def test_epoch_split_is_disjoint_and_covering_and_reshuffled():
    urls = [f"s{i}" for i in range(11)]
    kw = dict(seed=0, world_size=2, num_workers=3, resampled=False, shuffle=True)
    parts = [epoch_shards(urls, epoch=0, rank=r, worker=w, **kw) for r in range(2) for w in range(3)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(urls) and all(parts)
    again = [epoch_shards(urls, epoch=0, rank=r, worker=w, **kw) for r in range(2) for w in range(3)]
    assert again == parts                                                  # pure function
    nxt = [epoch_shards(urls, epoch=1, rank=r, worker=w, **kw) for r in range(2) for w in range(3)]
    assert nxt != parts
    fixed = epoch_shards(urls, epoch=5, seed=0, rank=0, worker=0, world_size=1, num_workers=0,
                         resampled=False, shuffle=False)
    assert fixed == urls


def test_resampled_draws_with_replacement_from_all():
    urls = [f"s{i}" for i in range(4)]
    draws = [epoch_shards(urls, epoch=e, seed=1, rank=0, worker=0, world_size=1, num_workers=8,
                          resampled=True, shuffle=True) for e in range(40)]
    assert all(len(d) == 1 for d in draws)                                 # ceil(4 / 8) per epoch
    assert {d[0] for d in draws} == set(urls)


def test_members_grouped_into_samples(test_shards):
    samples = list(group_samples()(tar_members()(map(str, test_shards))))
    assert len(samples) == 12
    s = samples[0]
    assert s["__key__"] == "vid000_deadbeef-000000" and s["__url__"] == str(test_shards[0])
    assert sorted(k for k in s if not k.startswith("__")) == [f"{i:03d}.jpg" for i in range(8)] + ["json"]
    assert isinstance(s["000.jpg"], bytes) and s["000.jpg"][:2] == b"\xff\xd8"   # raw JPEG, not decoded


def test_shuffle_is_a_deterministic_permutation():
    data = [{"i": i} for i in range(50)]
    out = [s["i"] for s in shuffle(8, np.random.default_rng(3))(iter(data))]
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == [s["i"] for s in shuffle(8, np.random.default_rng(3))(iter(data))]
    assert [s["i"] for s in shuffle(0, np.random.default_rng(3))(iter(data))] == list(range(50))


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_tar_warns_with_shard_and_keeps_earlier_samples(tmp_path, where):
    shards = write_test_shards(tmp_path / "s", videos=2, clips_per_video=2, shard_clips=4)
    good = tmp_path / "good.tar"
    shutil.copy(shards[0], good)
    with tarfile.open(good) as tar:
        m = tar.getmember("vid001_deadbeef-000000.003.jpg")               # inside the third clip
    cut = m.offset_data + 10 if where == "data" else m.offset + 100
    shards[0].write_bytes(good.read_bytes()[:cut])
    with pytest.warns(SampleSkipped, match=f"shard {shards[0]}.*tar stream broken.*rest of the shard skipped"):
        samples = list(group_samples()(tar_members()([str(shards[0])])))
    assert [s["__key__"] for s in samples] == ["vid000_deadbeef-000000", "vid000_deadbeef-000001",
                                               "vid001_deadbeef-000000"]
    assert "json" not in samples[2] and "002.jpg" in samples[2]             # partial clip: the loader skips it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(group_samples()(tar_members()([str(good)])))) == 4


class _KeysOfWorker(IterableDataset):
    """Source stages alone inside DataLoader workers: each worker reads its split of the shards."""

    def __init__(self, urls):
        self.urls = urls

    def __iter__(self):
        info = get_worker_info()
        mine = epoch_shards(self.urls, epoch=0, seed=0, rank=0, world_size=1, worker=info.id,
                            num_workers=info.num_workers, resampled=False, shuffle=True)
        stream = shuffle(3, np.random.default_rng(info.id))(group_samples()(tar_members()(mine)))
        for s in stream:
            yield {"key": s["__key__"], "worker": info.id, "n": torch.tensor(len(s))}


def test_source_stages_in_two_worker_dataloader(test_shards):
    dl = DataLoader(_KeysOfWorker([str(p) for p in test_shards]), batch_size=2, num_workers=2)
    rows = [(k, w) for b in dl for k, w in zip(b["key"], b["worker"].tolist())]
    keys = [k for k, _ in rows]
    assert sorted(keys) == sorted(f"vid{v:03d}_deadbeef-{c:06d}" for v in range(4) for c in range(3))
    assert {w for _, w in rows} == {0, 1}


@pytest.fixture
def http_shards(test_shards):
    """(base URL of a local http server over the test shards, its handler class)."""
    with serve_folder(test_shards[0].parent) as served:
        yield served


def test_http_shards_stream_without_an_external_binary(http_shards, monkeypatch):
    base, _ = http_shards
    monkeypatch.setenv("PATH", "/nonexistent")          # no curl: the standard library streams the shards
    urls = expand_shards(f"{base}/shard-{{000000..000002}}.tar")
    keys = [s["__key__"] for s in group_samples()(tar_members()(urls))]
    assert len(urls) == 3 and sorted(keys) == sorted(f"vid{v:03d}_deadbeef-{c:06d}" for v in range(4) for c in range(3))
    missing = f"{base}/shard-000009.tar"                 # a 404 fails at once, naming the status
    with pytest.warns(SampleSkipped, match=f"shard {missing}: tar stream broken at the start "
                                           r"\(OSError: HTTP 404 .* for " + missing):
        assert list(tar_members()([missing])) == []
    with pytest.raises(tarfile.ReadError, match="HTTP 404"):
        list(tar_members(strict=True)([missing]))


def test_http_shard_open_retries_on_503_then_reads(http_shards, monkeypatch):
    import abvid.pipeline.source as source
    base, handler = http_shards
    monkeypatch.setattr(source, "HTTP_BACKOFF_S", 0.0)
    handler.fail_first = source.HTTP_OPEN_ATTEMPTS - 1
    members = list(tar_members(strict=True)([f"{base}/shard-000000.tar"]))
    assert members and handler.requests == source.HTTP_OPEN_ATTEMPTS       # every try but the last got a 503
    handler.requests, handler.fail_first = 0, source.HTTP_OPEN_ATTEMPTS     # one more 503 than tries: give up
    with pytest.raises(tarfile.ReadError, match=f"cannot open {base}/shard-000000.tar after "
                                                f"{source.HTTP_OPEN_ATTEMPTS} tries: HTTP 503"):
        list(tar_members(strict=True)([f"{base}/shard-000000.tar"]))
    assert handler.requests == source.HTTP_OPEN_ATTEMPTS


def test_http_shard_resumes_a_dropped_connection_with_a_range_request(http_shards, test_shards):
    base, handler = http_shards
    url = f"{base}/shard-000000.tar"
    local = list(tar_members(strict=True)([str(test_shards[0])]))
    handler.cut_first = 2                                # the first body and the first resume both drop halfway
    got = list(tar_members(strict=True)([url]))
    assert [(m["name"], m["data"]) for m in got] == [(m["name"], m["data"]) for m in local]   # every byte, once
    size = test_shards[0].stat().st_size
    assert handler.seen_ranges == [None, f"bytes={size // 2}-", f"bytes={size // 2 + (size - size // 2) // 2}-"]


def test_http_shard_that_cannot_resume_is_reported_not_truncated(http_shards):
    base, handler = http_shards
    url = f"{base}/shard-000000.tar"
    handler.ranges, handler.cut_first = False, 1         # the server answers a Range request with the whole file
    with pytest.raises(tarfile.ReadError, match="the server does not resume it"):
        list(tar_members(strict=True)([url]))
    handler.requests = 0
    with pytest.warns(SampleSkipped, match="rest of the shard skipped"):
        members = list(tar_members()([url]))
    assert members                                       # what came before the drop is kept, as for a local file


def test_skiplog_counts_logs_once_per_shard_and_fault_and_stops_past_the_fraction():
    from abvid.pipeline.errors import JobError
    from abvid.pipeline.source import MIN_BAD_TO_STOP, SkipLog
    log = SkipLog(max_fraction=0.2)
    for _ in range(100):
        log.read()
    with pytest.warns(SampleSkipped) as rec:
        for i in range(5):
            log("a.tar", f"k{i}", f"frame does not decode (RuntimeError: {i})")   # one message for all five
        log("a.tar", "k9", "bad clip metadata (KeyError: 'pts_s')")               # another fault: its own line
        log("b.tar", "k0", "frame does not decode (RuntimeError: x)")             # another shard: its own line
    assert [str(r.message).split(":")[0] for r in rec] == ["skipping shard a.tar, key k0"] * 1 + [
        "skipping shard a.tar, key k9", "skipping shard b.tar, key k0"]
    assert log.take() == 7 and log.take() == 0 and log.skipped == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSkipped)
        for i in range(13):                     # 20 of 100: not more than the fraction
            log("c.tar", None, "tar stream broken")
        assert log.samples == 113 and log.skipped == 20
        with pytest.raises(JobError, match=r"23 of the 113 samples .*data.max_bad_fraction=0.2.*abvid inspect"):
            for _ in range(3):
                log("c.tar", "k", "bad clip metadata (KeyError)")
    # a few bad samples among the first read do not stop a run
    early = SkipLog(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSkipped)
        for _ in range(MIN_BAD_TO_STOP - 1):
            early("a.tar", "k", "frame does not decode")
    with pytest.raises(Exception, match="max_bad_fraction must be in"):
        SkipLog(1.5)
