"""View sampler (frames, boxes, aug params), decoding, rendering and the batched augmentation."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from abvid.pipeline.actions import AUG_DIM, AUG_FIELDS
from abvid.pipeline.views import (ViewSampler, Views, augment_view, decode_frame, pixel_box, render,
                                  render_into)
from conftest import frame_pattern

A = {f: i for i, f in enumerate(AUG_FIELDS)}


def _rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng([7, i])


def test_sample_shapes_ranges_and_determinism():
    vs = ViewSampler()
    v = vs.sample(_rng(), num_frames=16, width=455, height=256)
    assert v.boxes.shape == (6, 4) and v.boxes.dtype == np.float32
    assert v.frame_idx.shape == (6,) and v.frame_idx.dtype == np.int64
    assert v.aug.shape == (6, AUG_DIM) and v.aug.dtype == np.float32
    w = vs.sample(_rng(), num_frames=16, width=455, height=256)
    assert all(np.array_equal(a, b) for a, b in zip((v.boxes, v.frame_idx, v.aug), (w.boxes, w.frame_idx, w.aug)))


def test_boxes_follow_scale_and_aspect():
    vs = ViewSampler(n_global=2, n_local=4)
    W, H = 455, 256
    for i in range(200):
        b = vs.sample_boxes(_rng(i), W, H)
        y0, x0, h, w = b.T
        assert np.all(y0 >= 0) and np.all(x0 >= 0) and np.all(y0 + h <= 1 + 1e-6) and np.all(x0 + w <= 1 + 1e-6)
        area, aspect = h * w, (w * W) / (h * H)
        assert np.all(aspect >= 3 / 4 - 1e-4) and np.all(aspect <= 4 / 3 + 1e-4)
        assert np.all(area[:2] >= 0.32 - 1e-6) and np.all(area[2:] <= 0.32 + 1e-6) and np.all(area[2:] >= 0.05 - 1e-6)


@pytest.mark.parametrize("kw", [dict(p_dt0=1.0, max_dt=8), dict(p_dt0=0.3, max_dt=0)])
def test_dt_zero_puts_every_view_on_one_frame(kw):
    vs = ViewSampler(**kw)
    anchors = set()
    for i in range(100):
        f = vs.sample_frames(_rng(i), 16)
        assert np.all(f == f[0])
        anchors.add(int(f[0]))
    assert len(anchors) > 8                      # the anchor itself still moves through the clip


def test_forward_and_symmetric_offsets():
    fwd, sym = ViewSampler(max_dt=3, p_dt0=0.0, dt_mode="forward"), ViewSampler(max_dt=3, p_dt0=0.0)
    seen_fwd, seen_sym = set(), set()
    for i in range(300):
        f = fwd.sample_frames(_rng(i), 10)
        dt = f - f[0]
        assert dt[0] == 0 and np.all((dt[1:] >= 1) & (dt[1:] <= 3)) and f.max() <= 9
        seen_fwd |= set(dt[1:].tolist())
        g = sym.sample_frames(_rng(i), 10)
        dt = g - g[0]
        assert np.all((np.abs(dt[1:]) >= 1) & (np.abs(dt[1:]) <= 3)) and g.min() >= 0 and g.max() <= 9
        seen_sym |= set(dt[1:].tolist())
    assert seen_fwd == {1, 2, 3} and seen_sym == {-3, -2, -1, 1, 2, 3}
    assert np.all(ViewSampler(max_dt=5, p_dt0=0.0).sample_frames(_rng(), 1) == 0)     # one-frame clip


def test_next_views_follow_the_view_rules_and_leave_the_views_unchanged():
    """A' targets: drawn after the views from the same generator (the views are those of sample alone),
    sized global or local, on the anchor or within max_dt of it, with the same augmentation rules."""
    vs = ViewSampler(max_dt=3, p_dt0=0.25)
    W, H = 455, 256
    kinds, dts = set(), set()
    for i in range(100):
        rng = _rng(i)
        v = vs.sample(rng, 12, W, H)
        nxt = vs.sample_next(rng, int(v.frame_idx[0]), 12, W, H, count=5)
        alone = vs.sample(_rng(i), 12, W, H)
        assert all(np.array_equal(a, b) for a, b in zip((v.boxes, v.frame_idx, v.aug),
                                                          (alone.boxes, alone.frame_idx, alone.aug)))
        assert nxt.boxes.shape == (5, 4) and nxt.frame_idx.shape == (5,) and nxt.aug.shape == (5, AUG_DIM)
        dt = nxt.frame_idx - v.frame_idx[0]
        assert np.all(np.abs(dt) <= 3) and nxt.frame_idx.min() >= 0 and nxt.frame_idx.max() <= 11
        dts |= set(dt.tolist())
        area = nxt.boxes[:, 2] * nxt.boxes[:, 3]
        kinds |= {"global" if a >= 0.32 - 1e-6 else "local" for a in area}
        assert np.all((area >= 0.05 - 1e-6) & (area <= 1 + 1e-6))
        again = ViewSampler(max_dt=3, p_dt0=0.25)
        rng2 = _rng(i)
        again.sample(rng2, 12, W, H)
        assert np.array_equal(again.sample_next(rng2, int(v.frame_idx[0]), 12, W, H, 5).boxes, nxt.boxes)
    assert kinds == {"global", "local"} and 0 in dts and {-3, 3} <= dts
    assert ViewSampler(max_dt=4).max_abs_dt() == 8 and ViewSampler(max_dt=4, dt_mode="forward").max_abs_dt() == 4


def test_aug_params_zero_when_disabled_and_in_range_otherwise():
    off = ViewSampler(flip_p=0, jitter_p=0, grey_p=0, blur_p=0, solarize_p=0)
    assert not off.sample_aug(_rng()).any()
    on = ViewSampler(flip_p=1, jitter_p=1, grey_p=1, blur_p=1, solarize_p=1)
    a = np.concatenate([on.sample_aug(_rng(i)) for i in range(50)])
    for name, bound in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.2), ("hue", 0.1)):
        assert np.all(np.abs(a[:, A[name]]) <= bound) and a[:, A[name]].std() > bound / 4
    assert np.all(a[:, [A["flip"], A["grey"], A["solarize"]]] == 1)
    assert np.all((a[:, A["blur_sigma"]] >= 0.1) & (a[:, A["blur_sigma"]] <= 2.0))


def _jpeg(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def test_decode_jpeg_and_webp_and_bad_bytes():
    img = frame_pattern(3, 80, 48)
    for fmt, suffix in (("JPEG", "jpg"), ("WEBP", "webp")):
        x = decode_frame(_jpeg(img, fmt), suffix)
        assert x.shape == (3, 48, 80) and x.dtype == torch.uint8
        assert (x.permute(1, 2, 0).float() - torch.from_numpy(img).float()).abs().mean() < 6
    with pytest.raises(RuntimeError):
        decode_frame(b"\xff\xd8 not a jpeg at all", "jpg")


def test_decode_falls_back_to_opencv_without_torchvision_decoders(monkeypatch):
    import abvid.pipeline.views as views_mod
    img = frame_pattern(3, 80, 48)
    with_tv = {s: decode_frame(_jpeg(img, f), s) for f, s in (("JPEG", "jpg"), ("WEBP", "webp"))}
    monkeypatch.setattr(views_mod, "decode_jpeg", None)
    for fmt, suffix in (("JPEG", "jpg"), ("WEBP", "webp")):
        x = decode_frame(_jpeg(img, fmt), suffix)
        assert x.shape == (3, 48, 80) and x.dtype == torch.uint8 and x.permute(1, 2, 0).is_contiguous()
        assert (x.int() - with_tv[suffix].int()).abs().max() <= (0 if suffix == "jpg" else 2)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_frame(b"\xff\xd8 not a jpeg at all", "jpg")


def _views(boxes, frames, aug=None) -> Views:
    n = len(boxes)
    return Views(np.asarray(boxes, np.float32), np.asarray(frames, np.int64),
                 np.zeros((n, AUG_DIM), np.float32) if aug is None else np.asarray(aug, np.float32))


def test_render_crops_the_right_frame_and_flips():
    frames = {k: torch.from_numpy(frame_pattern(k, 64, 48)).permute(2, 0, 1).contiguous() for k in (0, 5)}
    aug = np.zeros((3, AUG_DIM), np.float32)
    aug[1, A["flip"]] = 1
    v = _views([[0, 0, 1, 1], [0.25, 0.5, 0.5, 0.25], [0.25, 0.5, 0.5, 0.25]], [5, 0, 0], aug)
    g, loc, snapped = render(frames, v, n_global=1, global_size=32, local_size=16)
    assert g.shape == (1, 3, 32, 32) and loc.shape == (2, 3, 16, 16) and g.dtype == loc.dtype == torch.uint8
    full = torch.nn.functional.interpolate(frames[5][None].float(), size=(32, 32), mode="bilinear",
                                           align_corners=False)[0]              # <= 2x: plain bilinear
    assert (g[0].float() - full).abs().max() <= 1
    assert torch.equal(loc[0], loc[1].flip(-1))
    np.testing.assert_allclose(snapped[1], [12 / 48, 32 / 64, 24 / 48, 16 / 64])
    assert pixel_box(np.array([0.99, 0.99, 0.5, 0.5]), 64, 48) == (24, 32, 24, 32)   # kept inside the frame


def _aug(**fields) -> np.ndarray:
    a = np.zeros(AUG_DIM, np.float32)
    for k, v in fields.items():
        a[A[k]] = v
    return a


def _augmented(x: np.ndarray, **fields) -> np.ndarray:
    """augment_view on a copy of an (S, S, 3) uint8 view."""
    return augment_view(x.copy(), _aug(**fields))


def test_augment_view_identity_grey_solarize_brightness_contrast():
    x = frame_pattern(2, 40, 40)
    assert np.array_equal(_augmented(x), x)
    g = _augmented(x, grey=1)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(_augmented(x, solarize=1), np.where(x >= 128, 255 - x, x))
    b = _augmented(x, brightness=0.25)
    assert np.abs(b.astype(float) - np.clip(x * 1.25, 0, 255)).max() <= 1
    assert _augmented(x, contrast=-1.0).astype(float).std() < 1.0       # factor 0: flat mean grey


def test_augment_view_hue_keeps_greys_and_blur_smooths():
    grey = np.full((16, 16, 3), 100, np.uint8)
    assert np.array_equal(_augmented(grey, hue=0.3, saturation=0.5), grey)
    rgb = frame_pattern(1, 32, 32)
    assert np.abs(_augmented(rgb, hue=0.5).astype(float) - rgb).mean() > 5
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    soft, softer = _augmented(noise, blur_sigma=0.5).astype(float), _augmented(noise, blur_sigma=2.0).astype(float)
    assert softer.std() < soft.std() < noise.std() and abs(softer.mean() - noise.mean()) < 2
    assert np.array_equal(_augmented(grey, blur_sigma=1.5), grey)


def test_augment_view_maps_white_with_brightness_only():
    white = np.full((4, 4, 3), 200, np.uint8)
    assert np.array_equal(_augmented(white, saturation=0.2, hue=0.05, grey=1), white)
    assert abs(_augmented(white, brightness=-0.5).astype(float).mean() - 100) <= 1


class _Rendered(IterableDataset):
    """Sampler + render + augment alone inside DataLoader workers."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        vs = ViewSampler(global_size=32, local_size=16)
        frames = {k: torch.from_numpy(frame_pattern(k, 64, 48)).permute(2, 0, 1).contiguous() for k in range(8)}
        for i in range(info.id, 6, info.num_workers):
            v = vs.sample(_rng(i), 8, 64, 48)
            g, loc, boxes = render(frames, v, vs.n_global, vs.global_size, vs.local_size)
            yield {"i": i, "global": g, "local": loc, "frame_idx": torch.from_numpy(v.frame_idx)}


def test_view_stages_in_two_worker_dataloader():
    rows = list(DataLoader(_Rendered(), batch_size=2, num_workers=2))
    assert sorted(i for b in rows for i in b["i"].tolist()) == list(range(6))
    assert rows[0]["global"].shape == (2, 2, 3, 32, 32) and rows[0]["local"].shape == (2, 4, 3, 16, 16)


def test_render_resize_rule_bilinear_up_to_2x_area_beyond():
    """Up to 2x reduction (and any enlargement): bilinear with half-pixel centres; beyond: area mean."""
    F = torch.nn.functional
    frames = {k: torch.from_numpy(frame_pattern(k, 455, 256)).permute(2, 0, 1).contiguous() for k in range(4)}
    vs = ViewSampler(flip_p=0.5)
    checked = 0
    for i in range(10):
        v = vs.sample(_rng(i), 4, 455, 256)
        g, loc, _ = render(frames, v, vs.n_global, vs.global_size, vs.local_size, apply_aug=False)
        for j, (box, t) in enumerate(zip(v.boxes, v.frame_idx)):
            size = vs.global_size if j < vs.n_global else vs.local_size
            top, left, h, w = pixel_box(box, 455, 256)
            if max(h, w) > 2 * size:
                continue
            crop = frames[int(t)][None, :, top:top + h, left:left + w].float()
            ref = F.interpolate(crop, size=[size, size], mode="bilinear", align_corners=False)[0]
            ref = ref.flip(-1) if v.aug[j, A["flip"]] > 0 else ref
            assert ((g[j] if j < vs.n_global else loc[j - vs.n_global]).float() - ref).abs().max() <= 1
            checked += 1
    assert checked >= 40
    big = _views([[0, 0, 192 / 256, 192 / 455]], [1])                    # 192 x 192 px -> 48 px: 4x, area
    g, _, _ = render(frames, big, 1, 48, 16)
    block_mean = frames[1][:, :192, :192].double().view(3, 48, 4, 48, 4).mean((2, 4))
    assert (g[0].double() - block_mean).abs().max() <= 1
    with pytest.raises(ValueError, match="C-contiguous"):                  # a strided slot would stay unwritten
        render_into(frames, big, np.empty((1, 48, 48, 3), np.uint8).transpose(0, 2, 1, 3), np.empty((0, 16, 16, 3),
                                                                                                    np.uint8))
    same = _views([[0, 0, 1, 1]], [0])                                   # crop already at the output size
    g, _, _ = render({0: frames[0][:, :32, :32].contiguous()}, same, 1, 32, 16)
    assert torch.equal(g[0], frames[0][:, :32, :32])
