"""Views of a clip: sample (frame, box, augmentation) per view, then render them from decoded frames.

docs/METHOD.md section 1: a view is one frame ``t`` of a clip, cropped to box ``b``
and augmented with ``g``. ``ViewSampler.sample`` draws the parameters of all ``n``
views of a clip (globals first, then locals) from a numpy Generator, cheaply and
without pixels, so the loader can replay it on resume without decoding.
``render_into`` then crops/resizes/flips the decoded frames and applies the
colour/grey/blur/solarize part per view with OpenCV, writing into the caller's
(S, S, 3) slots; ``pipeline/gpu_views.augment`` is the same augmentation as one
batched torch function (for a training loop that augments or renders on the GPU).

Time: view 0 sits on the *anchor* frame (uniform over the clip); every other view
has dt = 0 with probability ``p_dt0``, else dt uniform in 1..m (``forward``) or in
-m..m without 0 (``symmetric``), m = min(max_dt, clip length - 1), cut to the clip.
``p_dt0 = 1`` or ``max_dt = 0`` puts all views on one frame: the still-image method.

Boxes: torchvision RandomResizedCrop rule (area fraction from ``*_scale``, aspect
w/h in pixels log-uniform in ``aspect``, 10 tries, then the largest centred box),
normalised (y0, x0, h, w). ``render`` snaps each box to the pixel grid of the
decoded frame and returns the snapped box, so boxes describe exactly the pixels used.

Augmentation parameters, per view in ``AUG_FIELDS`` order; every field is 0 for an
unaugmented view:
    flip        1 = mirrored left-right (applied in render, with the crop)
    brightness, contrast, saturation   factor - 1 (torchvision's factors), applied in this fixed order
    hue         rotation of the chroma plane in turns, in [-hue, hue] (YIQ rotation; a close
                relative of torchvision's HSV hue shift that is linear, so the whole colour jitter
                plus greyscale is one 3x3 matrix and an offset per view)
    grey        1 = converted to greyscale (ITU-R 601 weights, 3 channels)
    blur_sigma  Gaussian blur sigma in output pixels (0 = none)
    solarize    1 = pixels >= 128 inverted
Colour steps are composed before a single clamp (torchvision clamps after each).

Decoding (``decode_frame``): torchvision.io.decode_jpeg vs PIL on a 455x256 q90 textured
frame, one thread, this 2-core shared machine: 0.45 ms vs 0.55 ms (decode + array), so
torchvision is kept (WebP goes through torchvision.io.decode_webp). Its (3, H, W) result is a
view of interleaved (H, W, 3) memory, which is what OpenCV works on: no transpose anywhere.
torchvision's image decoders are deprecated since 0.29 (torchcodec replaces them); if they go,
``decode_frame`` uses OpenCV's (identical pixels, 0.37 vs 0.35 ms per frame; PIL 0.43).

Rendering on the CPU (``render_into``: OpenCV, per view, in place, into the caller's (S, S, 3)
slots) vs the previous all-torch path (antialiased ``F.interpolate``, then ``augment`` on the
stack), per clip of 2 x 224 + 4 x 96 views from real 455x256 q90 JPEGs, one core, best of 9:
crop/resize/flip 0.31 vs 0.47 ms, with augmentation 0.62 vs 1.6-1.7 ms. The pieces, per 224 px
view: bilinear resize 0.05 ms (torch antialiased 0.10-0.13, OpenCV INTER_AREA 0.36 at 300 ->
224 px, hence area only beyond 2x), colour matrix 0.01 ms (``cv2.transform``), blur 0.06 / 0.11
ms at sigma 1 / 2 (``sepFilter2D`` with a float kernel; GaussianBlur's bit-exact 8-bit path
0.12 / 0.25, the old torch shift-and-add 0.24 / 0.40), solarize 0.04 ms (LUT). With it the
loader went from 0.48 to 0.66 of the decode-only bound (``abvid bench loader``, README).
Augmenting on the GPU (``data.aug_in_loader=false``, ``data.decode_on=device``) is
``pipeline/gpu_views.augment``: the same parameters, agreeing with ``augment_view`` within a
level or two (tests/test_gpu_views.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
try:    # deprecated since torchvision 0.29 (torchcodec replaces them): OpenCV takes over when they go
    from torchvision.io import ImageReadMode, decode_jpeg, decode_webp
except ImportError:                                         # pragma: no cover - depends on the install
    ImageReadMode = decode_jpeg = decode_webp = None

from abvid.pipeline.actions import AUG_DIM, AUG_FIELDS

FRAME_SUFFIXES = ("jpg", "jpeg", "webp")
_A = {name: i for i, name in enumerate(AUG_FIELDS)}
GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])
_GREY_W64 = np.array([0.299, 0.587, 0.114])
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])   # RGB -> YIQ
_YIQ_INV = np.linalg.inv(_YIQ)


@dataclass(frozen=True)
class Views:
    """Parameters of the n views of one clip (globals first)."""
    boxes: np.ndarray        # (n, 4) float32: y0, x0, h, w normalised to the frame
    frame_idx: np.ndarray    # (n,) int64: index into the clip's frames
    aug: np.ndarray          # (n, AUG_DIM) float32, AUG_FIELDS order


@dataclass(frozen=True)
class ViewConfig:
    """View settings: counts, sizes, boxes, time offsets, augmentation strengths.

    Shared by ``ViewSampler`` (which draws views from them) and ``loader.DataConfig``
    (which exposes them as ``data.*`` config keys), so the two cannot drift apart.
    """
    n_global: int = 2
    global_size: int = 224
    n_local: int = 4
    local_size: int = 96
    global_scale: tuple[float, ...] = (0.32, 1.0)
    local_scale: tuple[float, ...] = (0.05, 0.32)
    aspect: tuple[float, ...] = (3 / 4, 4 / 3)
    max_dt: int = 8
    p_dt0: float = 0.5
    dt_mode: Literal["forward", "symmetric"] = "symmetric"
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grey_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, ...] = (0.1, 2.0)
    solarize_p: float = 0.2

    @property
    def n(self) -> int:
        return self.n_global + self.n_local

    def __post_init__(self) -> None:
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.dt_mode not in ("forward", "symmetric"):
            raise ValueError(f"dt_mode must be 'forward' or 'symmetric', got {self.dt_mode!r}")
        for name in ("global_scale", "local_scale", "aspect", "blur_sigma"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {lo_hi}")
        if not 0.0 <= self.p_dt0 <= 1.0 or self.max_dt < 0:
            raise ValueError(f"need 0 <= p_dt0 <= 1 and max_dt >= 0, got {self.p_dt0}, {self.max_dt}")


@dataclass(frozen=True)
class ViewSampler(ViewConfig):
    """Draws view parameters from its ``ViewConfig`` settings."""

    def sample_frames(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """(n,) int64 frame index per view; view 0 on the anchor."""
        m = min(self.max_dt, num_frames - 1)
        dt0 = rng.random(self.n) < self.p_dt0
        dt0[0] = True
        u = rng.random(self.n)                                   # one draw per view, used below
        anchor = int(rng.integers(0, num_frames - m)) if self.dt_mode == "forward" else int(rng.integers(0, num_frames))
        return np.where(dt0, 0, self._offsets(u, anchor, num_frames)).astype(np.int64) + anchor

    def _offsets(self, u: np.ndarray, anchor: int, num_frames: int) -> np.ndarray:
        """Nonzero time offsets from the anchor for uniform draws u: 1..m (forward) or -m..m without 0
        (symmetric), m = min(max_dt, num_frames - 1), cut to the clip; all 0 when the clip allows none."""
        m = min(self.max_dt, num_frames - 1)
        if m == 0:
            return np.zeros(len(u), np.int64)
        if self.dt_mode == "forward":
            return 1 + np.floor(u * m).astype(np.int64)          # 1..m (the anchor leaves room for m)
        lo, hi = max(-m, -anchor), min(m, num_frames - 1 - anchor)
        count = hi - lo                                          # nonzero values in [lo, hi]
        if count == 0:
            return np.zeros(len(u), np.int64)
        k = np.floor(u * count).astype(np.int64)                 # 0..count-1
        return lo + k + (lo + k >= 0)                            # skip 0

    def max_abs_dt(self) -> int:
        """The largest |dt| between two views this sampler can produce (the action's dt range)."""
        return self.max_dt * (2 if self.dt_mode == "symmetric" else 1)

    def sample_boxes(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """(n, 4) float32 boxes (y0, x0, h, w) normalised; RandomResizedCrop rule, vectorised over 10 tries."""
        scale = np.array([self.global_scale] * self.n_global + [self.local_scale] * self.n_local)  # (n, 2)
        return self._boxes(rng, scale, width, height)

    def _boxes(self, rng: np.random.Generator, scale: np.ndarray, width: int, height: int) -> np.ndarray:
        """One box per row of ``scale`` (k, 2): the (low, high) area fraction of that box."""
        k, tries = len(scale), 10
        area = rng.uniform(scale[:, :1], scale[:, 1:], size=(k, tries)) * (width * height)
        ratio = np.exp(rng.uniform(math.log(self.aspect[0]), math.log(self.aspect[1]), size=(k, tries)))
        w = np.sqrt(area * ratio)                                # pixels
        h = np.sqrt(area / ratio)
        ok = (w <= width) & (h <= height)
        pick = np.argmax(ok, axis=1)                             # first valid try (0 when none)
        rows = np.arange(k)
        w, h, any_ok = w[rows, pick], h[rows, pick], ok.any(axis=1)
        # Fallback: the largest centred box with the aspect clamped into range.
        frame_ratio = width / height
        fr = min(max(frame_ratio, self.aspect[0]), self.aspect[1])
        fw, fh = (height * fr, height) if frame_ratio > fr else (width, width / fr)
        w, h = np.where(any_ok, w, fw), np.where(any_ok, h, fh)
        u = rng.random((k, 2))
        x0 = np.where(any_ok, u[:, 0] * (width - w), (width - w) / 2)
        y0 = np.where(any_ok, u[:, 1] * (height - h), (height - h) / 2)
        return np.stack([y0 / height, x0 / width, h / height, w / width], axis=1).astype(np.float32)

    def sample_aug(self, rng: np.random.Generator, count: int | None = None) -> np.ndarray:
        """(count, AUG_DIM) float32 augmentation parameters (see module docstring); count defaults to n."""
        n = self.n if count is None else count
        u = rng.random((n, 6))                                   # flip, jitter, grey, blur, solarize, sigma
        j = rng.uniform(-1.0, 1.0, size=(n, 4))                  # brightness, contrast, saturation, hue
        aug = np.zeros((n, AUG_DIM), dtype=np.float32)
        aug[:, _A["flip"]] = u[:, 0] < self.flip_p
        jit = (u[:, 1] < self.jitter_p)[:, None]
        strength = np.array([self.brightness, self.contrast, self.saturation, self.hue])
        cols = [_A["brightness"], _A["contrast"], _A["saturation"], _A["hue"]]
        aug[:, cols] = np.where(jit, j * strength, 0.0)
        aug[:, _A["grey"]] = u[:, 2] < self.grey_p
        lo, hi = self.blur_sigma
        aug[:, _A["blur_sigma"]] = np.where(u[:, 3] < self.blur_p, lo + u[:, 5] * (hi - lo), 0.0)
        aug[:, _A["solarize"]] = u[:, 4] < self.solarize_p
        return aug

    def sample(self, rng: np.random.Generator, num_frames: int, width: int, height: int) -> Views:
        """All view parameters of one clip; a pure function of the generator's state."""
        if num_frames < 1:
            raise ValueError("a clip needs at least one frame")
        frame_idx = self.sample_frames(rng, num_frames)
        boxes = self.sample_boxes(rng, width, height)
        return Views(boxes=boxes, frame_idx=frame_idx, aug=self.sample_aug(rng))

    def sample_next(self, rng: np.random.Generator, anchor: int, num_frames: int, width: int, height: int,
                    count: int) -> Views:
        """``count`` fresh views of the same clip, never rendered: the targets of the next actions A'.

        Drawn by the rules that make the clip's own views (docs/METHOD.md: A' is a sample of the action
        distribution): each is global-sized with probability n_global / n, else local-sized; its frame
        is the anchor or a time offset from it with the same p_dt0 and dt rule; its box and augmentation
        follow the same rules. Call after ``sample`` on the same generator (the views stay unchanged).
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        is_global = rng.random(count) < self.n_global / self.n
        dt0 = rng.random(count) < self.p_dt0
        dt = np.where(dt0, 0, self._offsets(rng.random(count), anchor, num_frames))
        scale = np.where(is_global[:, None], np.array(self.global_scale), np.array(self.local_scale)).reshape(count, 2)
        boxes = self._boxes(rng, scale, width, height)
        return Views(boxes=boxes, frame_idx=(anchor + dt).astype(np.int64), aug=self.sample_aug(rng, count))


def decode_frame(data: bytes, suffix: str = "jpg") -> torch.Tensor:
    """JPEG/WebP bytes -> (3, H, W) uint8 RGB tensor (a view of (H, W, 3) memory); raises RuntimeError /
    ValueError on corrupt data. torchvision's decoders when present, else OpenCV's (same libjpeg-turbo,
    identical pixels; 0.35 vs 0.37 ms per 455x256 q90 frame here)."""
    if decode_jpeg is None:
        return _decode_cv2(data)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if suffix.endswith("webp"):
        return decode_webp(buf, mode=ImageReadMode.RGB)
    return decode_jpeg(buf, mode=ImageReadMode.RGB)


def _decode_cv2(data: bytes) -> torch.Tensor:
    cv2 = _cv2()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"not a decodable image ({len(data)} bytes)")
    return torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised (y0, x0, h, w) -> integer (top, left, h, w) inside a width x height frame."""
    h = min(max(1, round(float(box[2]) * height)), height)
    w = min(max(1, round(float(box[3]) * width)), width)
    top = min(max(0, round(float(box[0]) * height)), height - h)
    left = min(max(0, round(float(box[1]) * width)), width - w)
    return top, left, h, w


_FLIP, _BLUR, _SOLARIZE = _A["flip"], _A["blur_sigma"], _A["solarize"]
_COLOUR_COLS = [_A["brightness"], _A["contrast"], _A["saturation"], _A["hue"], _A["grey"]]
_SOLARIZE_LUT = np.array([v if v < 128 else 255 - v for v in range(256)], dtype=np.uint8)


def _cv2():
    """OpenCV, imported on first render (it costs ~0.1 s; commands that never render skip it)."""
    import cv2
    return cv2


def hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 tensor or (H, W, 3) array -> C-contiguous (H, W, 3) uint8 array.

    No copy for ``decode_frame``'s tensors: torchvision's decoders return (3, H, W) views of
    interleaved (H, W, 3) memory.
    """
    if torch.is_tensor(img):
        img = img.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(img)


def render_into(frames: dict[int, torch.Tensor | np.ndarray], views: Views, out_global: np.ndarray,
                out_local: np.ndarray, apply_aug: bool = True) -> np.ndarray:
    """Crop, resize, flip (and augment unless apply_aug=False) every view of a clip into HWC arrays.

    frames: frame index -> (3, H, W) uint8 tensor or (H, W, 3) array. out_global (n_global, G, G, 3)
    and out_local (n_local, L, L, 3) are uint8 arrays written in place (e.g. slots of a batch buffer).
    Returns the boxes snapped to the pixel grid, (n, 4) float32.

    Resize: bilinear (OpenCV INTER_LINEAR, half-pixel centres, == torch's align_corners=False) when
    the crop is at most 2x the output size in both sides, else area averaging (INTER_AREA), which
    anti-aliases large reductions; at <= 2x every source pixel still reaches the output. Measured per
    clip here (2 x 224 + 4 x 96 views, one core): torch antialiased interpolate 0.36 ms, this 0.17 ms.
    Augmentation: ``augment_view`` per view, in place.
    """
    cv2 = _cv2()
    if not (out_global.flags.c_contiguous and out_local.flags.c_contiguous):
        # OpenCV would write a fresh array instead of into a strided dst, silently leaving the slot as it was
        raise ValueError("render_into needs C-contiguous (n, S, S, 3) output arrays")
    a = views.aug
    n_global = len(out_global)
    mats = _colour_matrices(a) if apply_aug else None
    snapped = np.empty_like(views.boxes)
    arrays: dict[int, np.ndarray] = {}
    for i in range(len(a)):
        t = int(views.frame_idx[i])
        img = arrays.get(t)
        if img is None:
            img = arrays[t] = hwc(frames[t])
        H, W = img.shape[:2]
        top, left, h, w = pixel_box(views.boxes[i], W, H)
        snapped[i] = (top / H, left / W, h / H, w / W)
        dst = out_global[i] if i < n_global else out_local[i - n_global]
        S = dst.shape[0]
        crop = img[top:top + h, left:left + w]
        flip = a[i, _FLIP] > 0
        if (h, w) != (S, S):
            interp = cv2.INTER_AREA if h > 2 * S or w > 2 * S else cv2.INTER_LINEAR
            if flip:
                crop = cv2.resize(crop, (S, S), interpolation=interp)
            else:
                cv2.resize(crop, (S, S), dst=dst, interpolation=interp)
        if flip:
            cv2.flip(crop, 1, dst=dst)
        elif (h, w) == (S, S):
            np.copyto(dst, crop)
        if apply_aug:
            augment_view(dst, a[i], mats[i])
    return snapped


def augment_view(x: np.ndarray, a: np.ndarray, mat: np.ndarray | None = None) -> np.ndarray:
    """Colour jitter + grey, blur, solarize of one (S, S, 3) uint8 view, in place (CPU, OpenCV); returns x.

    a: the view's (AUG_DIM,) parameters; mat: its colour matrix (computed here when None).
    Same parameters and order as ``gpu_views.augment`` (the batched torch version, for GPUs), which
    also rounds after each step.
    Per 224 px view, one core: colour 0.01 ms, blur 0.06 / 0.11 ms at sigma 1 / 2, solarize 0.04 ms.
    """
    cv2 = _cv2()
    if a[_COLOUR_COLS].any():
        m = np.empty((3, 4), np.float32)
        m[:, :3] = _colour_matrices(a[None])[0] if mat is None else mat
        c = 1 + float(a[_A["contrast"]])
        # contrast blends towards the mean grey of the brightness-adjusted view (a scalar)
        m[:, 3] = (1 - c) * (1 + float(a[_A["brightness"]])) * float(np.dot(cv2.mean(x)[:3], _GREY_W64))
        cv2.transform(x, m, dst=x)
    sigma = float(a[_BLUR])
    if sigma > 0:
        # separable float kernel: 2x faster here than GaussianBlur's bit-exact 8-bit path (0.06 vs 0.12 ms)
        r = max(1, min(math.ceil(3 * sigma), min(x.shape[:2]) - 1))
        k = cv2.getGaussianKernel(2 * r + 1, sigma, cv2.CV_32F)
        cv2.sepFilter2D(x, -1, k, k, dst=x, borderType=cv2.BORDER_REFLECT_101)
    if a[_SOLARIZE] != 0:
        cv2.LUT(x, _SOLARIZE_LUT, dst=x)
    return x


def render(frames: dict[int, torch.Tensor | np.ndarray], views: Views, n_global: int, global_size: int,
           local_size: int, apply_aug: bool = True) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``render_into`` fresh arrays: global (n_global, 3, G, G) and local (n_local, 3, L, L) uint8 tensors
    (channels-last in memory: (n, S, S, 3) arrays seen as (n, 3, S, S)) and the snapped boxes."""
    n_local = len(views.boxes) - n_global
    g = np.empty((n_global, global_size, global_size, 3), np.uint8)
    loc = np.empty((n_local, local_size, local_size, 3), np.uint8)
    snapped = render_into(frames, views, g, loc, apply_aug)
    return torch.from_numpy(g).permute(0, 3, 1, 2), torch.from_numpy(loc).permute(0, 3, 1, 2), snapped


def _colour_matrices(a: np.ndarray) -> np.ndarray:
    """(N, AUG_DIM) numpy -> (N, 3, 3) float32: brightness*contrast, saturation, hue and grey (no offset).

    Built in numpy float64: for these 3x3 matrices numpy's per-call cost is a fraction of torch's.
    """
    a = a.astype(np.float64)
    eye = np.eye(3)[None]
    ones_w = np.ones((3, 1)) @ _GREY_W64[None]                                           # (3, 3): 1 w^T
    bc = ((1 + a[:, _A["brightness"]]) * (1 + a[:, _A["contrast"]]))[:, None, None]
    s = (1 + a[:, _A["saturation"]])[:, None, None]
    sat = s * eye + (1 - s) * ones_w                                                     # (N, 3, 3)
    th = 2 * np.pi * a[:, _A["hue"]]
    rot = np.zeros((len(a), 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = np.cos(th), -np.sin(th), np.sin(th), np.cos(th)
    hue = _YIQ_INV @ rot @ _YIQ                                                          # keeps grey axis fixed
    g = a[:, _A["grey"]][:, None, None]
    grey = g * ones_w + (1 - g) * eye
    return (grey @ hue @ sat * bc).astype(np.float32)
