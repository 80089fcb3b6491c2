"""Contact sheet of shard clips: frames along a time axis, sampled views drawn as boxes, and the views themselves.

Used by ``abvid inspect --out sheet.png``. One block per clip:

    header   key, video, size, fps, the clip's labels
    frames   thumbnails left to right in time order (frame index and pts under each);
             every view the sampler drew for this clip is a box on the frame it uses:
             G0, G1, ... global views (warm colours), L0, ... local views (cool colours)
    views    the same views rendered and augmented exactly as the loader does
             (pipeline/views.render), i.e. what the model is fed

Views come from a ``pipeline.views.ViewSampler`` (default settings unless the caller
passes one built from a training config) and a seeded generator per clip, so a sheet
is reproducible. Drawing uses PIL only.

``batch_sheet(batch)`` draws a loader batch instead (one row per clip: its global and
local views as the model gets them, with their dt): ``abvid pretrain`` writes the first
batch's sheet to TensorBoard.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from abvid.pipeline.loader import clip_id
from abvid.pipeline.views import ViewSampler, Views, decode_frame, pixel_box, render

GLOBAL_COLOURS = [(230, 25, 75), (245, 130, 48), (255, 225, 25), (240, 50, 230)]
LOCAL_COLOURS = [(0, 130, 200), (60, 180, 75), (70, 240, 240), (145, 30, 180), (0, 128, 128), (170, 255, 195)]
BG, FG, DIM = (255, 255, 255), (20, 20, 20), (110, 110, 110)
PAD = 6


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def view_colour(i: int, n_global: int) -> tuple[int, int, int]:
    return GLOBAL_COLOURS[i % len(GLOBAL_COLOURS)] if i < n_global else LOCAL_COLOURS[(i - n_global) % len(LOCAL_COLOURS)]


def view_name(i: int, n_global: int) -> str:
    return f"G{i}" if i < n_global else f"L{i - n_global}"


def shown_frames(num_frames: int, view_frames: np.ndarray, max_frames: int) -> list[int]:
    """Frames to draw: every frame a view uses, filled up with evenly spaced ones, in time order."""
    keep = {int(t) for t in view_frames}
    for t in np.linspace(0, num_frames - 1, num=min(num_frames, max_frames)).round().astype(int):
        if len(keep) >= max(max_frames, len(set(view_frames.tolist()))):
            break
        keep.add(int(t))
    return sorted(keep)


def _thumb(img: np.ndarray, height: int) -> Image.Image:
    h, w = img.shape[:2]
    return Image.fromarray(img).resize((max(1, round(w * height / h)), height), Image.Resampling.BILINEAR)


def _clip_block(key: str, meta: dict, frames: dict[int, tuple[str, bytes]], sampler: ViewSampler, seed: int,
                thumb_h: int, max_frames: int) -> Image.Image:
    """One clip's block: header, frame strip with view boxes, rendered views."""
    font, small = _font(13), _font(11)
    K = len(frames)
    decoded = {i: decode_frame(data, ext) for i, (ext, data) in frames.items()}   # (3, H, W) uint8
    H, W = decoded[0].shape[-2:]
    views: Views = sampler.sample(np.random.default_rng([seed, clip_id(key)]), K, W, H)
    shown = shown_frames(K, views.frame_idx, max_frames)
    thumbs = {t: _thumb(decoded[t].permute(1, 2, 0).numpy(), thumb_h) for t in shown}
    g, loc, _ = render({int(t): decoded[int(t)] for t in np.unique(views.frame_idx)}, views, sampler.n_global,
                       sampler.global_size, sampler.local_size, apply_aug=True)
    crops = [Image.fromarray(v.permute(1, 2, 0).numpy()).resize((thumb_h, thumb_h), Image.Resampling.BILINEAR)
             for v in list(g) + list(loc)]

    line_h, label_h = 18, 28
    strip_w = sum(t.width for t in thumbs.values()) + PAD * (len(thumbs) - 1)
    views_w = len(crops) * (thumb_h + PAD) - PAD
    width = max(strip_w, views_w, 600) + 2 * PAD
    height = PAD + line_h + thumb_h + label_h + line_h + thumb_h + label_h + PAD
    block = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(block)
    labels = sorted({a.get("label") or a.get("text", "") for a in meta.get("annotations") or []} - {""})
    d.text((PAD, PAD), f"{key}   {W}x{H}   {meta.get('fps', '?')} fps (source {meta.get('source_fps', '?')})"
                       f"   labels: {', '.join(labels) or '-'}", fill=FG, font=font)

    # frame strip: time runs left to right; boxes of the views that use each frame
    y = PAD + line_h
    x = PAD
    pts = meta.get("pts_s") or []
    idx = meta.get("frame_indices") or []
    for t in shown:
        th = thumbs[t]
        block.paste(th, (x, y))
        s = th.height / H
        for i in np.flatnonzero(views.frame_idx == t):
            top, left, h, w = pixel_box(views.boxes[i], W, H)
            c = view_colour(int(i), sampler.n_global)
            box = (x + left * s, y + top * s, x + (left + w) * s - 1, y + (top + h) * s - 1)
            d.rectangle(box, outline=c, width=2)
            d.text((box[0] + 3, box[1] + 2), view_name(int(i), sampler.n_global), fill=c, font=small,
                   stroke_width=2, stroke_fill=(0, 0, 0))
        when = f"t={pts[t]:.2f}s" if t < len(pts) else ""
        d.text((x, y + thumb_h + 2), f"#{idx[t] if t < len(idx) else t}  {when}", fill=DIM, font=small)
        x += th.width + PAD

    # rendered views, as the model gets them (crop, resize, flip, colour, blur, solarize)
    y += thumb_h + label_h
    d.text((PAD, y), f"views fed to the model ({sampler.n_global} global {sampler.global_size}px, "
                     f"{sampler.n_local} local {sampler.local_size}px; shown at {thumb_h}px):", fill=FG, font=font)
    y += line_h
    for i, crop in enumerate(crops):
        x = PAD + i * (thumb_h + PAD)
        block.paste(crop, (x, y))
        c = view_colour(i, sampler.n_global)
        d.rectangle((x, y, x + thumb_h - 1, y + thumb_h - 1), outline=c, width=3)
        dt = int(views.frame_idx[i] - views.frame_idx[0])
        flip = " flip" if views.aug[i, 0] > 0 else ""
        d.text((x, y + thumb_h + 2), f"{view_name(i, sampler.n_global)} dt={dt:+d}{flip}", fill=c if sum(c) < 600
               else DIM, font=small)
    return block


def draw_sheet(clips: list[tuple[str, dict, dict[int, tuple[str, bytes]]]], *, title: str,
               sampler: ViewSampler | None = None, seed: int = 0, thumb_h: int = 96,
               max_frames: int = 8) -> Image.Image:
    """clips: (key, clip JSON, {frame number: (ext, bytes)}) -> one RGB image, blocks stacked vertically."""
    sampler = sampler or ViewSampler()
    blocks = []
    for k, m, f in clips:
        try:
            blocks.append(_clip_block(k, m, f, sampler, seed, thumb_h, max_frames))
        except (RuntimeError, ValueError, KeyError) as e:   # a corrupt JPEG or clip JSON: leave the clip out
            warnings.warn(f"contact sheet: clip {k} left out ({type(e).__name__}: {e})")
    if not blocks:
        raise ValueError("no clip could be drawn (every chosen clip has corrupt frames or metadata)")
    width = max([b.width for b in blocks] + [600])
    head, foot = 26, 40
    sheet = Image.new("RGB", (width, head + sum(b.height for b in blocks) + foot), BG)
    d = ImageDraw.Draw(sheet)
    d.text((PAD, PAD), title, fill=FG, font=_font(15))
    y = head
    for b in blocks:
        d.line((0, y, width, y), fill=(200, 200, 200), width=1)
        sheet.paste(b, (0, y))
        y += b.height
    d.text((PAD, y + 4), "time runs left to right -> ; boxes: views drawn by pipeline.views.ViewSampler "
                         f"(seed {seed}); G = global, L = local; dt = frames from view G0",
           fill=DIM, font=_font(12))
    return sheet


def batch_sheet(batch: dict, max_clips: int = 8, cell: int = 96) -> Image.Image:
    """A loader batch (docs/INTERFACES.md) -> one row per clip of its views at ``cell`` px, labelled G/L and dt."""
    g = batch["global"][:max_clips].detach().cpu()                      # (B, ng, 3, G, G) uint8
    loc = batch.get("local")
    loc = loc[:max_clips].detach().cpu() if loc is not None else g[:, :0]
    ng, n = g.shape[1], g.shape[1] + loc.shape[1]
    frame_idx = batch["frame_idx"][:max_clips].cpu().numpy()
    keys = list(batch.get("key") or [])
    small, label_h = _font(11), 16
    row_h = label_h + cell + label_h
    width = max(PAD + n * (cell + PAD), 400)
    sheet = Image.new("RGB", (width, 24 + row_h * g.shape[0]), BG)
    d = ImageDraw.Draw(sheet)
    d.text((PAD, 4), f"first batch: {g.shape[0]} of {batch['global'].shape[0]} clips; {ng} global "
                     f"{g.shape[-1]}px + {loc.shape[1]} local {loc.shape[-1]}px views; dt = frames from G0",
           fill=FG, font=_font(13))
    for b in range(g.shape[0]):
        y = 24 + b * row_h
        d.text((PAD, y + 2), keys[b] if b < len(keys) else f"clip {b}", fill=DIM, font=small)
        views = list(g[b]) + list(loc[b])
        for i, v in enumerate(views):
            x = PAD + i * (cell + PAD)
            img = Image.fromarray(v.to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
            sheet.paste(img.resize((cell, cell), Image.Resampling.BILINEAR), (x, y + label_h))
            c = view_colour(i, ng)
            d.rectangle((x, y + label_h, x + cell - 1, y + label_h + cell - 1), outline=c, width=2)
            dt = int(frame_idx[b, i] - frame_idx[b, 0])
            d.text((x, y + label_h + cell + 2), f"{view_name(i, ng)} dt={dt:+d}", fill=DIM, font=small)
    return sheet
