"""Views decoded and rendered on the training device from JPEG bytes (``data.decode_on=device``).

The CPU path (views.render_into in the loader workers) decodes each JPEG with libjpeg-turbo and
renders crops with OpenCV. Here the workers only sample the view parameters and read the JPEG
headers; the batch carries the bytes, and the training device decodes them in one batched call
(``torchvision.io.decode_jpeg(list, device="cuda")``: nvJPEG) and renders every view of a size
group at once, following OpenCV's arithmetic step by step so both paths give the same pixels up to
rounding (tests/test_gpu_views.py; on CPU the same code runs on libjpeg's output for the test):

* **crop + resize + flip** as two matrix products per view, ``out = Ay @ frame @ Ax^T``, where
  ``Ay`` (S, H) and ``Ax`` (S, W) hold the interpolation weights of the view's pixel box: OpenCV's
  rule of views.render_into, bilinear (``INTER_LINEAR``: half-pixel centres, edge pixels of the crop
  replicated) when the crop is at most 2x the output size, area averaging (``INTER_AREA``) beyond;
  a flip reverses the rows of ``Ax``. Rounded to integers, as OpenCV's uint8 output is.
* **colour** (brightness, contrast, saturation, hue, grey) as one 3x3 matrix and an offset per view
  (the same composition as views._colour_matrices; contrast blends towards the mean grey of the
  resized view), rounded; **blur** as ``B @ x @ B^T`` with the view's Gaussian kernel folded with
  reflect-101 borders into an (S, S) matrix (identity when the view has none), rounded;
  **solarize** where flagged.

Nothing here reads a tensor value on the host: which views are flipped, blurred or solarized is
data on the device, so the renderer never waits for the GPU (the frame sizes it pads to are known
from the decoded tensors' shapes). Matrix products run in fp32 (TF32 when the loop enables it on
CUDA: at most a level of difference).

Loader side (:func:`read_headers`, :func:`jpeg_batches`): the workers snap each box to the pixel
grid of its frame, whose size they read from the JPEG header (no decoding), and yield the batch of
docs/INTERFACES.md with the pixel tensors replaced by ``batch["jpeg"]``:

    {"data": uint8 (total bytes,)    the used frames' JPEG files, concatenated (shared memory)
     "offsets": int64 (F + 1,)       frame f is data[offsets[f]:offsets[f + 1]]
     "frame_of_view": int64 (B, n)   which of the F frames each view crops
     "pixel_boxes": int64 (B, n, 4)  top, left, h, w of each crop in its frame's pixels}

Every other field is the pixel path's (``loader._row``), so fields other code adds there travel
along unchanged. :class:`DeviceRenderer` replaces ``jpeg`` with ``global`` / ``local`` uint8
views, channels-last in memory, on the device.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from abvid.pipeline.actions import AUG_FIELDS
from abvid.pipeline.source import SkipPolicy, Stage, warn_skip
from abvid.pipeline.views import GREY_WEIGHTS, ViewConfig, Views, _YIQ, _YIQ_INV, pixel_box

_A = {name: i for i, name in enumerate(AUG_FIELDS)}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_SUFFIXES = ("jpg", "jpeg")


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame header, without decoding; ValueError if there is none."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file (no SOI marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:                                 # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):           # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF and i + 9 <= n:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + length
    raise ValueError("JPEG without a start-of-frame header")


def read_headers(on_skip: SkipPolicy = warn_skip) -> Stage:
    """Stage (replaces decode_frames in bytes mode): "__sizes__" = {frame: (H, W)} of the frames the views use.

    A clip whose frame header is unreadable is skipped through ``on_skip`` (the loader's SkipLog: counted in
    ``data_skipped``, stops the run past ``data.max_bad_fraction``), as decode_frames does on the CPU path."""
    from abvid.pipeline.errors import UsageError

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            try:
                sizes = {}
                for t in np.unique(s["__views__"].frame_idx).tolist():
                    ext, data = s["__frames__"][t]
                    if ext not in JPEG_SUFFIXES:
                        raise UsageError(f"data.decode_on=device decodes JPEG frames only; shard {s['__url__']} holds "
                                         f".{ext} frames: use data.decode_on=workers")
                    sizes[t] = jpeg_size(data)
            except ValueError as e:
                if isinstance(e, UsageError):
                    raise
                on_skip(s["__url__"], s["__key__"], f"frame header unreadable ({e})")
                continue
            s["__sizes__"] = sizes
            yield s
    return stage


def jpeg_batches(batch_size: int, row: Callable[[dict, np.ndarray], dict],
                 stack_rows: Callable[[list[dict]], dict]) -> Stage:
    """Stage: clips with headers read -> bytes-mode batches (module docstring); ``row``/``stack_rows`` are the
    loader's, so the per-clip fields are exactly the pixel path's. A finite stream ends with a short batch."""
    from abvid.pipeline.loader import pixel_buffer

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        samples = iter(samples)
        while True:
            rows, blobs, fov, pboxes = [], [], [], []
            for s in itertools.islice(samples, batch_size):
                views: Views = s["__views__"]
                index: dict[int, int] = {}
                snapped = np.empty_like(views.boxes)
                pb = np.empty((len(views.boxes), 4), np.int64)
                f = np.empty(len(views.boxes), np.int64)
                for i, t in enumerate(views.frame_idx.tolist()):
                    if t not in index:
                        index[t] = len(blobs)
                        blobs.append(s["__frames__"][t][1])
                    H, W = s["__sizes__"][t]
                    top, left, h, w = pixel_box(views.boxes[i], W, H)
                    snapped[i], pb[i], f[i] = (top / H, left / W, h / H, w / W), (top, left, h, w), index[t]
                rows.append(row(s, snapped))
                fov.append(f)
                pboxes.append(pb)
            if rows:
                offsets = np.cumsum([0] + [len(b) for b in blobs])
                data = pixel_buffer((int(offsets[-1]),))
                data.numpy()[:] = np.frombuffer(b"".join(blobs), np.uint8)
                yield {**stack_rows(rows),
                       "jpeg": {"data": data, "offsets": torch.from_numpy(offsets.astype(np.int64)),
                                "frame_of_view": torch.from_numpy(np.stack(fov)),
                                "pixel_boxes": torch.from_numpy(np.stack(pboxes))}}
            if len(rows) < batch_size:
                return
    return stage


# ---- device side --------------------------------------------------------------------------------

def decode(jpeg: dict, device: torch.device) -> list[torch.Tensor]:
    """The batch's frames as (3, H, W) uint8 RGB on ``device``: one batched decode (nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    off = jpeg["offsets"].tolist()                          # a CPU tensor: no device sync
    data = jpeg["data"]
    blobs = [data[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    return [out] if torch.is_tensor(out) else list(out)


def _stack(frames: list[torch.Tensor]) -> torch.Tensor:
    """Frames of possibly different sizes -> (F, 3, Hmax, Wmax), zero-padded at the bottom / right."""
    if all(f.shape == frames[0].shape for f in frames):
        return torch.stack(frames)
    H, W = max(f.shape[1] for f in frames), max(f.shape[2] for f in frames)
    out = frames[0].new_zeros((len(frames), 3, H, W))
    for i, f in enumerate(frames):
        out[i, :, :f.shape[1], :f.shape[2]] = f
    return out


def axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int, area: torch.Tensor,
                 area_up: torch.Tensor) -> torch.Tensor:
    """(V, size, extent) resize weights along one axis: output j of the crop [start, start + length).

    OpenCV's three cases (imgproc/resize.cpp): ``area`` = INTER_AREA shrinking both axes (box filter,
    weights = overlap / scale); ``area_up`` = INTER_AREA enlarging some axis (linear with OpenCV's area
    offsets); otherwise INTER_LINEAR (src = (j + 0.5) * scale - 0.5). Linear positions are clamped into
    the crop, which replicates its edge pixels as OpenCV does when it resizes the crop array.
    """
    dev = start.device
    start, length = start.double()[:, None, None], length.double()[:, None, None]       # (V, 1, 1)
    scale = length / size
    j = torch.arange(size, device=dev, dtype=torch.float64)[None, :, None]              # (1, S, 1)
    i = torch.arange(extent, device=dev, dtype=torch.float64)[None, None, :]            # (1, 1, E)
    src = (j + 0.5) * scale - 0.5
    sx = torch.floor(j * scale)
    fx = (j + 1) - (sx + 1) / scale
    fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
    src = torch.where(area_up[:, None, None], sx + fx, src)
    pos = start + torch.minimum(src.clamp(min=0), length - 1)
    linear = (1 - (pos - i).abs()).clamp(min=0)
    lo, hi = start + j * scale, start + (j + 1) * scale
    box = (torch.minimum(i + 1, hi) - torch.maximum(i, lo)).clamp(min=0) / scale
    return torch.where(area[:, None, None], box, linear).float()


def crop_resize(frames: torch.Tensor, frame_of_view: torch.Tensor, pixel_boxes: torch.Tensor, flip: torch.Tensor,
                size: int, chunk: int = 64) -> torch.Tensor:
    """Crop, resize and flip V views: frames (F, 3, H, W) uint8, frame_of_view (V,), pixel_boxes (V, 4) =
    top, left, h, w, flip (V,) bool -> (V, 3, size, size) float holding integers (OpenCV rounds to uint8)."""
    top, left, h, w = pixel_boxes.unbind(-1)
    use_area = (h > 2 * size) | (w > 2 * size)               # views.render_into's rule
    shrink = (h >= size) & (w >= size)
    area, area_up = use_area & shrink, use_area & ~shrink
    H, W = frames.shape[-2:]
    out = []
    for c in range(0, len(frame_of_view), chunk):           # bounds the memory of weights and gathered frames
        s = slice(c, c + chunk)
        ay = axis_weights(top[s], h[s], size, H, area[s], area_up[s])                    # (v, S, H)
        ax = axis_weights(left[s], w[s], size, W, area[s], area_up[s])                   # (v, S, W)
        ax = torch.where(flip[s, None, None], ax.flip(1), ax)
        f = frames.index_select(0, frame_of_view[s]).float()                             # (v, 3, H, W)
        out.append(ay[:, None] @ f @ ax[:, None].transpose(-1, -2))                      # (v, 3, S, S)
    return torch.cat(out).round_().clamp_(0, 255)


def colour_matrices(aug: torch.Tensor) -> torch.Tensor:
    """(V, AUG_DIM) -> (V, 3, 3): views._colour_matrices in torch, on the device (no host round trip)."""
    a = aug.double()
    dev = a.device
    eye = torch.eye(3, device=dev, dtype=a.dtype)
    w = GREY_WEIGHTS.to(dev, a.dtype)
    ones_w = torch.ones(3, 1, device=dev, dtype=a.dtype) @ w[None]
    bc = ((1 + a[:, _A["brightness"]]) * (1 + a[:, _A["contrast"]]))[:, None, None]
    s = (1 + a[:, _A["saturation"]])[:, None, None]
    sat = s * eye + (1 - s) * ones_w
    th = 2 * math.pi * a[:, _A["hue"]]
    rot = torch.zeros(len(a), 3, 3, device=dev, dtype=a.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = th.cos(), -th.sin(), th.sin(), th.cos()
    yiq, yiq_inv = (torch.as_tensor(m, device=dev, dtype=a.dtype) for m in (_YIQ, _YIQ_INV))
    g = a[:, _A["grey"]][:, None, None]
    grey = g * ones_w + (1 - g) * eye
    return (grey @ (yiq_inv @ rot @ yiq) @ sat * bc).float()


def blur_matrices(sigma: torch.Tensor, size: int, max_sigma: float) -> torch.Tensor:
    """(V,) Gaussian sigmas -> (V, S, S) matrices of a 1-D blur with reflect-101 borders (OpenCV's
    ``sepFilter2D`` with ``getGaussianKernel(2r + 1, sigma)``, r = ceil(3 sigma) capped at S - 1); the
    identity where sigma is 0. ``max_sigma`` bounds the radius of the shared kernel support."""
    dev = sigma.device
    K = max(1, min(math.ceil(3 * max_sigma), size - 1))
    k = torch.arange(-K, K + 1, device=dev, dtype=torch.float32)                       # (2K + 1,)
    s = sigma.float()[:, None]
    r = torch.ceil(3 * s).clamp(1, size - 1)
    wts = torch.exp(-0.5 * (k / s.clamp(min=1e-6)) ** 2) * (k.abs() <= r)
    wts = wts / wts.sum(-1, keepdim=True)
    wts = torch.where(s > 0, wts, (k == 0).float().expand_as(wts))                     # (V, 2K + 1)
    o = torch.arange(size, device=dev)
    src = o[None, :] + k.long()[:, None]                                                # (2K + 1, S)
    src = src.abs()
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)                        # reflect-101
    shift = torch.zeros(2 * K + 1, size, size, device=dev)
    shift.scatter_add_(2, src[:, :, None], torch.ones(2 * K + 1, size, 1, device=dev))  # (2K+1, S_out, S_in)
    return torch.einsum("vk,kos->vos", wts, shift)


def augment(x: torch.Tensor, aug: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Colour, blur, solarize of views x (V, 3, S, S) float holding integers, per aug (V, AUG_DIM), as
    views.augment_view does on the CPU (rounding after each step); returns float holding integers."""
    V, _, S, _ = x.shape
    a = aug.float()
    b, c = 1 + a[:, _A["brightness"]], 1 + a[:, _A["contrast"]]                          # factors
    mean_grey = x.mean(dim=(2, 3)) @ GREY_WEIGHTS.to(x.device)                         # (V,)
    offset = ((1 - c) * b * mean_grey)[:, None, None]     # contrast blends towards the brightened mean grey
    y = (colour_matrices(a) @ x.flatten(2) + offset).view_as(x).round_().clamp_(0, 255)
    blur = blur_matrices(a[:, _A["blur_sigma"]], S, max_sigma)[:, None]                # (V, 1, S, S)
    y = (blur @ y @ blur.transpose(-1, -2)).round_().clamp_(0, 255)
    sol = (a[:, _A["solarize"]] != 0)[:, None, None, None]
    return torch.where(sol & (y >= 128), 255 - y, y)


def to_channels_last(x: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """(B * n, 3, S, S) float -> uint8 (B, n, 3, S, S) whose memory is (B, n, S, S, 3) (the loader's layout)."""
    S = x.shape[-1]
    out = torch.empty((B, n, S, S, 3), dtype=torch.uint8, device=x.device)
    out.view(B * n, S, S, 3).copy_(x.permute(0, 2, 3, 1))
    return out.permute(0, 1, 4, 2, 3)


class DeviceRenderer:
    """``on_device`` transform of the training loop: bytes-mode batch -> the pixel batch, on ``device``."""

    def __init__(self, n_global: int, global_size: int, local_size: int, apply_aug: bool, max_blur_sigma: float,
                 device: torch.device):
        self.n_global, self.global_size, self.local_size = n_global, global_size, local_size
        self.apply_aug, self.max_blur_sigma, self.device = apply_aug, max_blur_sigma, torch.device(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        jpeg = batch["jpeg"]
        frames = _stack(decode(jpeg, self.device))
        fov = jpeg["frame_of_view"].to(self.device, non_blocking=True)
        pboxes = jpeg["pixel_boxes"].to(self.device, non_blocking=True)
        aug = batch["aug"].to(self.device, non_blocking=True)
        B, n = fov.shape
        out = {k: v for k, v in batch.items() if k != "jpeg"}
        for key, lo, hi, size in (("global", 0, self.n_global, self.global_size),
                                  ("local", self.n_global, n, self.local_size)):
            a = aug[:, lo:hi].reshape(-1, aug.shape[-1])
            x = crop_resize(frames, fov[:, lo:hi].reshape(-1), pboxes[:, lo:hi].reshape(-1, 4),
                            a[:, _A["flip"]] > 0, size)
            if self.apply_aug and len(a):
                x = augment(x, a, self.max_blur_sigma)
            out[key] = to_channels_last(x, B, hi - lo)
        return out


def build_renderer(cfg: ViewConfig, device: torch.device) -> DeviceRenderer:
    """The renderer for a loader's view settings (``DataConfig`` is a ViewConfig). It always augments: with the
    bytes on the device there is no CPU step to leave augmentation to, whatever ``aug_in_loader`` says."""
    return DeviceRenderer(cfg.n_global, cfg.global_size, cfg.local_size, True, max(cfg.blur_sigma), device)
