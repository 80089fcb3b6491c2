"""The transition loader: batch contract, exact resume, one-pass rank split, error policy, still-image mode."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import webdataset as wds

import abvid.pipeline.loader as loader_mod
from abvid.pipeline.actions import AUG_DIM, pairwise_actions
from abvid.pipeline.loader import DataConfig, build_dataset, build_loader, clip_id, collate
from abvid.pipeline.source import SampleSkipped
from abvid.pipeline.views import ViewSampler
from abvid.pipeline.config import merge
from conftest import write_test_shards

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated", "ignore::DeprecationWarning")

ALL_KEYS = sorted(f"vid{v:03d}_deadbeef-{c:06d}" for v in range(4) for c in range(3))


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), workers=2, global_size=32, local_size=16, shuffle_buffer=5, seed=3)
    return DataConfig(**{**base, **kw})


def _take(loader, k: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(k)]


def test_config_fields_match_view_sampler_and_merge():
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert {f.name for f in dataclasses.fields(ViewSampler)} <= names
    cfg = merge(DataConfig(), {"shards": ["/a.tar", "/b.tar"], "p_dt0": 1, "global_scale": [0.5, 1.0]})
    assert cfg.shards == ("/a.tar", "/b.tar") and cfg.p_dt0 == 1.0 and cfg.view_sampler().global_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="local_scale must be a .low, high. pair"):
        dataclasses.replace(cfg, local_scale=(0.3,)).view_sampler()


def test_pin_memory_defaults_to_cuda_availability(test_shards):
    assert DataConfig().pin_memory is None and merge(DataConfig(), {"pin_memory": False}).pin_memory is False
    for pin, expected in ((None, torch.cuda.is_available()), (True, True), (False, False)):
        assert build_loader(_cfg(test_shards[0].parent, workers=0, pin_memory=pin), batch_size=2).pin_memory is expected


def test_batch_follows_the_contract(test_shards):
    cfg = _cfg(test_shards[0].parent, workers=0)
    b = next(iter(build_loader(cfg, batch_size=4)))
    B, n = 4, 6
    assert b["global"].shape == (B, 2, 3, 32, 32) and b["global"].dtype == torch.uint8
    assert b["local"].shape == (B, 4, 3, 16, 16) and b["local"].dtype == torch.uint8
    assert b["global"].permute(0, 1, 3, 4, 2).is_contiguous()           # channels-last in memory
    assert torch.equal(b["global"].contiguous(), b["global"])
    assert b["boxes"].shape == (B, n, 4) and b["boxes"].dtype == torch.float32
    assert b["frame_idx"].shape == (B, n) and b["frame_idx"].dtype == torch.int64
    assert b["time_s"].shape == (B, n) and b["time_s"].dtype == torch.float32
    assert b["aug"].shape == (B, n, AUG_DIM) and b["aug"].dtype == torch.float32
    assert b["clip_id"].shape == (B,) and b["clip_id"].dtype == torch.int64
    assert len(b["key"]) == len(b["labels"]) == B
    for i, key in enumerate(b["key"]):
        v, c = int(key[3:6]), int(key[-6:])
        # write_test_shards: pts_s = (c * clip_len + frame) / fps; label alternates red / blue by video
        assert torch.allclose(b["time_s"][i], (c * 8 + b["frame_idx"][i]).float() / 4.0)
        assert b["labels"][i] == [("red", "blue")[v % 2]]
        assert b["clip_id"][i] == clip_id(key)
    assert pairwise_actions(b["boxes"], b["frame_idx"], b["aug"]).shape == (B, n, n, 5 + AUG_DIM)


def test_two_worker_loader_and_no_local_views(test_shards):
    cfg = _cfg(test_shards[0].parent, n_local=0)
    batches = _take(build_loader(cfg, batch_size=3), 4)
    assert batches[0]["local"].shape == (3, 0, 3, 16, 16) and batches[0]["boxes"].shape == (3, 2, 4)
    g = batches[0]["global"]          # written by a worker straight into shared memory, (B, n, S, S, 3) underneath
    assert g.is_shared() and g.permute(0, 1, 3, 4, 2).is_contiguous()
    assert {k for b in batches for k in b["key"]} <= set(ALL_KEYS)


def test_worker_batches_equal_in_process_batches(test_shards):
    """Views rendered by a worker into shared memory == the same views rendered in the main process."""
    a = _take(build_loader(_cfg(test_shards[0].parent, workers=0), batch_size=3), 4)
    b = _take(build_loader(_cfg(test_shards[0].parent, workers=1), batch_size=3), 4)
    assert b[0]["global"].is_shared() and not a[0]["global"].is_shared()
    _assert_same_batches(a, b, pixels=4)


def test_still_image_mode_uses_one_frame_per_clip(test_shards):
    b = next(iter(build_loader(_cfg(test_shards[0].parent, workers=0, p_dt0=1.0), batch_size=6)))
    assert torch.all(b["frame_idx"] == b["frame_idx"][:, :1])
    assert torch.all(b["time_s"] == b["time_s"][:, :1])
    assert pairwise_actions(b["boxes"], b["frame_idx"], b["aug"])[..., 4].abs().sum() == 0     # dt = 0


def _assert_same_batches(xs: list[dict], ys: list[dict], pixels: int) -> None:
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert x["key"] == y["key"], f"batch {i}"
        assert x.keys() == y.keys()
        for name in ("boxes", "frame_idx", "time_s", "aug", "clip_id", "next_boxes", "next_frame_idx", "next_aug"):
            if name in x:
                assert torch.equal(x[name], y[name]), f"batch {i} field {name}"
        assert x["labels"] == y["labels"]
        if i < pixels:
            assert torch.equal(x["global"], y["global"]) and torch.equal(x["local"], y["local"])


@pytest.mark.parametrize("resampled", [True, False])
def test_exact_resume_with_two_workers(tmp_path, resampled):
    write_test_shards(tmp_path / "s", videos=4, clips_per_video=3, shard_clips=2)     # 6 shards
    cfg = _cfg(tmp_path / "s", resampled=resampled)
    k, m = 5, 7                                   # 3 clips a batch: crosses the epoch end of each worker
    full = _take(build_loader(cfg, batch_size=3, next_views=2), k + m)    # with bootstrapping's fresh views
    assert full[0]["next_boxes"].shape == (3, 2, 4) and full[0]["next_aug"].shape == (3, 2, AUG_DIM)
    first = build_loader(cfg, batch_size=3, next_views=2)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    del it, first
    resumed = build_loader(cfg, batch_size=3, next_views=2)
    resumed.load_state_dict(state)
    tail = _take(resumed, m)
    _assert_same_batches(full[:k], head, pixels=1)
    _assert_same_batches(full[k:], tail, pixels=2)


def test_resume_replay_decodes_no_frame(test_shards, monkeypatch):
    cfg = _cfg(test_shards[0].parent, workers=0)
    full = _take(build_loader(cfg, batch_size=2), 5)
    first = build_loader(cfg, batch_size=2)
    _take(first, 3)
    state = first.state_dict()
    calls = []
    real = loader_mod.decode_frame
    monkeypatch.setattr(loader_mod, "decode_frame", lambda data, suffix: calls.append(1) or real(data, suffix))
    resumed = build_loader(cfg, batch_size=2)
    resumed.load_state_dict(state)
    tail = _take(resumed, 2)
    _assert_same_batches(full[3:], tail, pixels=2)
    used = sum(len(set(f.tolist())) for b in tail for f in b["frame_idx"])
    assert len(calls) == used                     # only the frames of the 4 clips delivered were decoded


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_with_other_worker_count_is_an_error(test_shards, workers):
    first = build_loader(_cfg(test_shards[0].parent), batch_size=2)
    _take(first, 2)
    other = build_loader(_cfg(test_shards[0].parent, workers=workers), batch_size=2)
    with pytest.raises(ValueError, match=f"saved with 2 workers, this loader has {workers}.*data.workers=2"):
        other.load_state_dict(first.state_dict())
    single = build_loader(_cfg(test_shards[0].parent, workers=0), batch_size=2)
    _take(single, 1)
    with pytest.raises(ValueError, match="saved with 0 workers, this loader has 2"):
        build_loader(_cfg(test_shards[0].parent), batch_size=2).load_state_dict(single.state_dict())


def test_one_pass_two_ranks_disjoint_and_complete(tmp_path):
    write_test_shards(tmp_path / "s", videos=4, clips_per_video=3, shard_clips=3)             # 4 shards
    cfg = _cfg(tmp_path / "s", workers=2)
    seen = []
    for rank in range(2):
        keys = [k for b in build_loader(cfg, batch_size=2, rank=rank, world_size=2, one_pass=True) for k in b["key"]]
        assert len(keys) == len(set(keys)) and keys
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert sorted(seen[0] | seen[1]) == ALL_KEYS


def test_one_pass_needs_a_shard_per_reader(test_shards):
    cfg = _cfg(test_shards[0].parent, workers=2)                       # 3 shards
    with pytest.raises(ValueError, match="3 shard.*2 rank.*2 worker"):
        build_loader(cfg, batch_size=2, rank=0, world_size=2, one_pass=True)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        build_loader(cfg, batch_size=2, rank=2, world_size=2)
    build_loader(cfg, batch_size=2, rank=0, world_size=2)               # resampled training: any count works


def test_pipe_shards_need_allow_pipe(test_shards):
    spec = f"pipe:cat {test_shards[0]}"
    with pytest.raises(ValueError, match="allow_pipe"):
        build_loader(_cfg(spec, workers=0), batch_size=2)
    b = next(iter(build_loader(_cfg(spec, workers=0, allow_pipe=True), batch_size=4)))
    assert len(b["key"]) == 4


def test_bad_jpeg_and_bad_json_are_skipped_with_shard_and_key(tmp_path):
    shards = write_test_shards(tmp_path / "s", videos=1, clips_per_video=2, shard_clips=2)
    bad = tmp_path / "s" / "shard-000001.tar"
    meta = {"pts_s": [0.0, 0.25], "width": 96, "height": 64, "annotations": []}
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "badjpeg-000000", "json": json.dumps(meta).encode(),
                 "000.jpg": b"\xff\xd8garbage", "001.jpg": b"\xff\xd8garbage"})
        w.write({"__key__": "badjson-000000", "json": b"{not json", "000.jpg": shards[0].read_bytes()[:10]})
    cfg = _cfg(tmp_path / "s", workers=0, shuffle=False, p_dt0=1.0)
    ds = build_dataset(cfg, one_pass=True)
    with pytest.warns(SampleSkipped) as rec:
        samples = list(ds)
    keys = [s["key"] for s in samples]
    assert keys == ["vid000_deadbeef-000000", "vid000_deadbeef-000001"]
    msgs = [str(r.message) for r in rec if r.category is SampleSkipped]
    assert any(f"shard {bad}, key badjpeg-000000" in m and "does not decode" in m for m in msgs)
    assert any(f"shard {bad}, key badjson-000000" in m and "bad clip metadata" in m for m in msgs)
    assert collate(samples)["global"].shape == (2, 2, 3, 32, 32)


def test_dataset_state_roundtrip_in_process(test_shards):
    cfg = _cfg(test_shards[0].parent, workers=0)
    ds = build_dataset(cfg)
    it = iter(ds)
    first = [next(it)["key"] for _ in range(14)]                        # past one epoch (12 clips drawn)
    state = ds.state_dict()
    rest = [next(it)["key"] for _ in range(3)]
    again = build_dataset(cfg)
    again.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSkipped)
        assert [s["key"] for s, _ in zip(again, range(3))] == rest
    assert state["epoch"] >= 1 and len(first) == 14


def test_aug_outside_loader_matches_aug_inside(test_shards):
    from abvid.train.pretrain import augment_on_device
    kw = dict(workers=0, jitter_p=1.0, grey_p=0.3, blur_p=0.5, solarize_p=0.3)
    inside = next(iter(build_loader(_cfg(test_shards[0].parent, **kw), batch_size=4)))
    outside = next(iter(build_loader(_cfg(test_shards[0].parent, aug_in_loader=False, **kw), batch_size=4)))
    assert inside["key"] == outside["key"] and torch.equal(inside["aug"], outside["aug"])
    assert not torch.equal(inside["global"], outside["global"])          # the loader did augment
    done = augment_on_device(outside, max_blur_sigma=2.0)                # what the loop does on the device
    assert (done["global"].int() - inside["global"].int()).abs().max() <= 1
    assert (done["local"].int() - inside["local"].int()).abs().max() <= 1


def test_malformed_annotation_is_skipped_with_key(tmp_path):
    write_test_shards(tmp_path / "s", videos=1, clips_per_video=1, shard_clips=1)
    bad = tmp_path / "s" / "shard-000001.tar"
    meta = {"pts_s": [0.0], "width": 8, "height": 8, "annotations": [{"label": "cat"}]}   # no start_s / end_s
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "noann-000000", "json": json.dumps(meta).encode(), "000.jpg": b"\xff\xd8"})
    ds = build_dataset(_cfg(tmp_path / "s", workers=0, shuffle=False), one_pass=True)
    with pytest.warns(SampleSkipped, match=f"shard {bad}, key noann-000000: bad clip metadata .KeyError"):
        assert [s["key"] for s in ds] == ["vid000_deadbeef-000000"]


def test_view_decode_render_stages_alone(test_shards):
    import numpy as np
    from abvid.pipeline.loader import decode_frames, render_views, sample_views
    from abvid.pipeline.source import group_samples, tar_members
    vs = ViewSampler(global_size=32, local_size=16)
    raw = [dict(s, __pos__=i) for i, s in enumerate(group_samples()(tar_members()([str(test_shards[0])])))]
    sampled = list(sample_views(vs, lambda pos: np.random.default_rng(pos))(iter(raw)))
    assert len(sampled) == 4 and isinstance(sampled[0]["__frames__"][0][1], bytes)   # still raw bytes
    assert sampled[0]["__labels__"] == ["red"] and len(sampled[0]["__times__"]) == 6
    decoded = list(decode_frames()(iter(sampled)))
    used = set(sampled[0]["__views__"].frame_idx.tolist())
    assert set(decoded[0]["__frames__"]) == used                                         # only the frames used
    assert decoded[0]["__frames__"][min(used)].shape == (3, 64, 96)
    out = list(render_views(vs, apply_aug=True)(iter(decoded)))
    assert out[0]["global"].shape == (2, 3, 32, 32) and out[0]["local"].shape == (4, 3, 16, 16)
    assert out[0]["clip_id"] == clip_id(out[0]["key"])


def test_resume_is_exact_over_bad_samples_and_batches_count_them(tmp_path):
    """Skipped samples count as consumed: a resumed stream continues exactly, over shards with bad clips."""
    shards = write_test_shards(tmp_path / "s", videos=3, clips_per_video=2, shard_clips=2)
    meta = {"pts_s": [0.0], "width": 96, "height": 64, "annotations": []}
    with wds.TarWriter(str(tmp_path / "s" / "shard-000009.tar")) as w:
        w.write({"__key__": "badjpeg-000000", "json": json.dumps(meta).encode(), "000.jpg": b"not a jpeg"})
        w.write({"__key__": "nopts-000000", "json": json.dumps({"width": 96}).encode(),
                 "000.jpg": shards[0].read_bytes()[:10]})
    cfg = _cfg(tmp_path / "s", workers=0, resampled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSkipped)
        full = _take(build_loader(cfg, batch_size=2), 8)
        loader = build_loader(cfg, batch_size=2)
        it = iter(loader)
        head = [next(it) for _ in range(3)]
        state = loader.state_dict()
        again = build_loader(cfg, batch_size=2)
        again.load_state_dict(state)
        tail = _take(again, 5)
    assert [b["key"] for b in head + tail] == [b["key"] for b in full]
    assert all(torch.equal(a["global"], b["global"]) for a, b in zip(head + tail, full))
    assert sum(b["data_skipped"] for b in full) >= 2 * 2          # both bad clips, in each of 2+ epochs (6 good)
