"""Generate a synthetic H.264 video corpus with per-segment labels, to try abvid on data it makes itself.

    abvid toy-corpus data/toy --videos 24 --seconds 6 --size 128x96 --fps 12 --seed 0
    abvid toy-corpus data/crowd --kind crowd --videos 48 --seed 0

writes OUT/toy_0000.mp4 ... and OUT/annotations.csv (``video,start_s,end_s,label``, one row
per object segment; ``video`` is the file name relative to OUT). Same seed -> same bytes.

Two kinds of scene:

* ``shapes`` (default): one to three large objects roaming the whole frame.
* ``crowd``: three objects of distinct classes out of eight in a square frame (96x96 by
  default: the probe's centre crop keeps it all), starting in three different quadrants and
  moving fast, with colours that drift fast, appearing and disappearing in segments; so
  two distant crops of one frame see different objects. The frame's labels are the classes
  present. This is the corpus where invariance should fail, and the argument was written
  down before any result on it was seen: an invariance method (SimCLR) pulls two views of a
  clip together whatever they show; when the views are distant crops holding different
  objects, the only features that agree across them are those of the clip as a whole (hue
  palette, noise statistics, which classes co-occur), not the shape in front of the crop,
  so the gradient teaches little about object identity and the crop-level features blur
  the three objects together. Annotation bootstrapping instead asks the features of one
  crop, given *where* another crop lies, to predict that crop's annotation: what is in one
  part of the frame differs from what is in another, so the value head can only do this if
  the features keep each object apart and locate it. The prediction, written before the
  runs: AB over its base method gains more on ``crowd`` than on ``shapes``, and the
  no-action-tokens ablation (Q blind to where the target is) loses that gain.

Why the shapes look the way they do:
  * Classes are defined by SHAPE or TEXTURE only (disc, ring, square, triangle, cross,
    stripes); every object instance gets a random colour, size, spin and path, so colour
    alone predicts nothing and a random-init encoder (which mostly sees colour) probes
    badly, while one pre-trained on object crops should separate the shapes.
  * Each object's hue drifts over time (a quarter to half a turn per second). With a fixed
    colour per instance, instance discrimination (SimCLR) learned object colour -- the
    cheapest cue that tells clips apart -- and its features probed no better than random
    init on shape classes (demo probe 0.32-0.35 vs 0.30 mAP). With drifting colour, views
    of one clip taken dt frames apart agree on shape but not on colour: the temporal
    offset in the action is what teaches the invariance, as in real video.
  * One to three moving objects per video, of distinct classes, so crops of one frame
    differ in content. Object 0 is on screen for the whole video (every frame has a label);
    the others appear for a random segment of at least 1.5 s (or the whole video if shorter).
  * The background is fresh noise every frame (coarse blobs plus fine grain, new each
    frame): it carries no identity of its video, so instance discrimination cannot
    solve its task from the background and has to look at the objects.
Rendering is vectorised numpy on each object's bounding box; x264 runs single-threaded
without mbtree, with fixed settings, so the bytes are reproducible.

Exit codes: 0 written; 2 usage error (a bad --size, --fps, --seconds or --videos);
3 OUT cannot be written, or an unexpected error (a bug; the message names a log file).
"""
from __future__ import annotations

import argparse
import csv
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

CLASSES = ("disc", "ring", "square", "triangle", "cross", "stripes")
CROWD_CLASSES = CLASSES + ("star", "bar")
KINDS = ("shapes", "crowd")
DEFAULT_SIZE = {"shapes": (128, 96), "crowd": (96, 96)}


def _shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a class in object coordinates (u, v) scaled so the object spans [-1, 1]."""
    r2 = u * u + v * v
    if cls == "disc":
        return r2 <= 1.0
    if cls == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    if cls in ("square", "stripes"):
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == "triangle":   # apex up, vertices (0,-1), (+-0.87, 0.5); image v grows downwards
        return (v <= 0.5) & (np.sqrt(3.0) * np.abs(u) - v <= 1.0)
    if cls == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if cls == "star":       # five points
        return np.sqrt(r2) <= 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u))
    if cls == "bar":        # a 3:1 rectangle (it spins, so its orientation says nothing)
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.32)
    raise ValueError(f"unknown class {cls!r}; known: {CROWD_CLASSES}")


def _hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """RGB of hue ``h`` (turns), saturation and value in [0, 1]; shape (3,) float in [0, 255]."""
    h = h % 1.0
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _segment(rng: np.random.Generator, n_frames: int, min_len: int, whole: bool) -> tuple[int, int]:
    """Frames [f0, f1) an object is on screen: the whole video, or a random stretch of at least min_len."""
    if whole:
        return 0, n_frames
    length = int(rng.integers(min_len, n_frames + 1))
    f0 = int(rng.integers(0, n_frames - length + 1))
    return f0, f0 + length


def _plan_objects(rng: np.random.Generator, n_frames: int, fps: float, w: int, h: int) -> list[dict]:
    """1-3 objects of distinct classes with colour, size, path, spin and frame segment."""
    n_obj = int(rng.integers(1, 4))
    classes = rng.choice(len(CLASSES), size=n_obj, replace=False)
    min_len = min(n_frames, max(1, round(1.5 * fps)))
    objs = []
    for i, c in enumerate(classes):
        f0, f1 = _segment(rng, n_frames, min_len, whole=i == 0)
        radius = rng.uniform(0.14, 0.25) * min(w, h)
        speed = rng.uniform(0.15, 0.5) * min(w, h)                  # pixels per second
        heading = rng.uniform(0, 2 * np.pi)
        # Saturated, bright colour whose hue drifts (0.25-0.5 turns/s either way): colour changes over
        # time while shape persists, so neither colour nor a single frame identifies an instance.
        hue, sat, val = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)
        hue_rate = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.5) / fps   # turns per frame
        objs.append(dict(cls=CLASSES[int(c)], hue=hue, sat=sat, val=val, hue_rate=hue_rate,
                         colour=_hsv_colour(hue, sat, val), radius=radius,
                         pos=np.array([rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)]),
                         vel=speed * np.array([np.cos(heading), np.sin(heading)]) / fps,
                         angle=rng.uniform(0, 2 * np.pi), spin=rng.uniform(-1.5, 1.5) / fps,
                         stripes=rng.uniform(2.5, 4.0), f0=f0, f1=f1, bounds=(0.0, float(w), 0.0, float(h))))
    return objs


def _plan_crowd(rng: np.random.Generator, n_frames: int, fps: float, w: int, h: int) -> list[dict]:
    """Three objects of distinct classes out of eight, starting in three of the four quadrants, each on
    screen for a segment of at least 1.5 s (one of them, at random, for the whole video).

    Found on the validation corpora (seeds 100/101): with objects kept in their quadrants and the
    shapes corpus's slow colour drift, SimCLR beat random init by only 2-5 k-NN mAP points (the layout
    and the colours identify a clip without its shapes; a supervised tiny ViT reached 53 mAP there, so
    the frames were learnable); objects that roam the whole frame at 0.3-0.6 frame sides per second
    with hues drifting 0.5-1 turn per second left shape as the cue that lasts: +7 to +11.
    """
    classes = rng.choice(len(CROWD_CLASSES), size=3, replace=False)
    cells = rng.choice(4, size=3, replace=False)
    always = int(rng.integers(0, 3))
    min_len = min(n_frames, max(1, round(1.5 * fps)))
    objs = []
    for i, (cell, c) in enumerate(zip(cells, classes)):
        x_lo, y_lo = (cell % 2) * w / 2, (cell // 2) * h / 2
        x_hi, y_hi = x_lo + w / 2, y_lo + h / 2
        radius = rng.uniform(0.36, 0.44) * min(w, h) / 2                # 18-22% of the frame's side
        f0, f1 = _segment(rng, n_frames, min_len, whole=i == always)
        speed = rng.uniform(0.3, 0.6) * min(w, h)
        heading = rng.uniform(0, 2 * np.pi)
        hue, sat, val = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)
        hue_rate = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) / fps
        objs.append(dict(cls=CROWD_CLASSES[int(c)], hue=hue, sat=sat, val=val, hue_rate=hue_rate,
                         colour=_hsv_colour(hue, sat, val), radius=radius,
                         pos=np.array([rng.uniform(x_lo + radius, x_hi - radius),
                                       rng.uniform(y_lo + radius, y_hi - radius)]),
                         vel=speed * np.array([np.cos(heading), np.sin(heading)]) / fps,
                         angle=rng.uniform(0, 2 * np.pi), spin=rng.uniform(-1.5, 1.5) / fps,
                         stripes=rng.uniform(2.5, 4.0), f0=f0, f1=f1, bounds=(0.0, float(w), 0.0, float(h))))
    return objs


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Fresh noise: coarse 8x8-pixel greyish blobs plus fine grain, (h, w, 3) float.

    Blobs are grey with a mild tint, so the saturated objects stand out by shape, not by luck.
    """
    cells = ((h + 7) // 8, (w + 7) // 8)
    coarse = rng.uniform(50, 190, size=cells + (1,)) + rng.normal(0, 15, size=cells + (3,))
    img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
    return img + rng.normal(0, 12, size=(h, w, 3))


def _draw(img: np.ndarray, o: dict) -> None:
    """Paint object ``o`` (at its current pose) into ``img`` (h, w, 3) in place."""
    h, w = img.shape[:2]
    r = o["radius"]
    x0, x1 = max(0, int(o["pos"][0] - r) - 1), min(w, int(o["pos"][0] + r) + 2)
    y0, y1 = max(0, int(o["pos"][1] - r) - 1), min(h, int(o["pos"][1] + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]                                # (bh, bw) pixel centres
    dx, dy = (xx + 0.5 - o["pos"][0]) / r, (yy + 0.5 - o["pos"][1]) / r
    ca, sa = np.cos(o["angle"]), np.sin(o["angle"])
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy                   # rotate into object frame
    mask = _shape_mask(o["cls"], u, v)
    colour = np.broadcast_to(o["colour"], mask.shape + (3,)).copy()
    if o["cls"] == "stripes":   # texture class: dark bands across a square
        dark = np.sin(u * np.pi * o["stripes"]) < 0
        colour[dark] *= 0.15
    region = img[y0:y1, x0:x1]
    region[mask] = colour[mask]


def _step(o: dict) -> None:
    """Advance one frame: move, bounce off the borders of the object's region, spin."""
    o["pos"] = o["pos"] + o["vel"]
    x_lo, x_hi, y_lo, y_hi = o["bounds"]
    for axis, (lo, hi) in ((0, (x_lo, x_hi)), (1, (y_lo, y_hi))):
        if not lo + o["radius"] <= o["pos"][axis] <= hi - o["radius"]:
            o["vel"][axis] = -o["vel"][axis]
            o["pos"][axis] = np.clip(o["pos"][axis], lo + o["radius"], hi - o["radius"])
    o["angle"] += o["spin"]
    o["hue"] += o["hue_rate"]
    o["colour"] = _hsv_colour(o["hue"], o["sat"], o["val"])


def _write_video(path: Path, seed: int, index: int, seconds: float, w: int, h: int,
                 fps: float, kind: str = "shapes") -> list[tuple[float, float, str]]:
    import av

    rng = np.random.default_rng([seed, index])
    n_frames = max(1, round(seconds * fps))
    objs = (_plan_crowd if kind == "crowd" else _plan_objects)(rng, n_frames, fps, w, h)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w", format="mp4") as out:
        # Reproducible bytes: one x264 thread, and no macroblock-tree rate control (mbtree made
        # the first rc-lookahead frames differ between identical runs at 64x48).
        stream = out.add_stream("libx264", rate=rate, options={
            "crf": "23", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for k in range(n_frames):
            img = _background(rng, w, h)
            for o in objs:
                if o["f0"] <= k < o["f1"]:
                    _draw(img, o)
                _step(o)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = k
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return [(o["f0"] / fps, o["f1"] / fps, o["cls"]) for o in objs]


def make_toy_corpus(out: str | Path, videos: int = 24, seconds: float = 6.0,
                    size: tuple[int, int] | None = None, fps: float = 12.0, seed: int = 0,
                    kind: str = "shapes") -> list[Path]:
    """Write ``videos`` clips of scene ``kind`` and ``annotations.csv`` into ``out``; returns the video paths.

    ``size`` (width, height) defaults to 128x96 for ``shapes`` and 96x96 for ``crowd``.
    """
    w, h = size or DEFAULT_SIZE.get(kind, (128, 96))
    if videos < 1 or seconds <= 0 or fps <= 0 or w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f"need videos >= 1, seconds > 0, fps > 0 and even width, height >= 16; "
                         f"got videos={videos}, seconds={seconds}, fps={fps}, size={w}x{h}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(videos):
        path = out / f"toy_{i:04d}.mp4"
        for start, end, label in _write_video(path, seed, i, seconds, w, h, fps, kind):
            rows.append((path.name, f"{start:.3f}", f"{end:.3f}", label))
        paths.append(path)
    tmp = out / "annotations.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("video", "start_s", "end_s", "label"))
        writer.writerows(rows)
    tmp.replace(out / "annotations.csv")
    return paths


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 128x96, got {text!r}") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"--size needs even width and height >= 16, got {text!r}")
    return w, h


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (created); videos + annotations.csv")
    parser.add_argument("--videos", type=_positive(int), default=24, help="number of videos")
    parser.add_argument("--seconds", type=_positive(float), default=6.0, help="length of each video")
    parser.add_argument("--size", type=_size, default=None,
                        help="frame size WxH (even numbers); default 128x96 for shapes, 96x96 for crowd")
    parser.add_argument("--fps", type=_positive(float), default=12.0, help="frame rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files")
    parser.add_argument("--kind", choices=KINDS, default="shapes",
                        help="shapes: 1-3 large objects roaming the frame; crowd: 3 smaller, faster objects of 8 "
                             "classes at different places, so distant crops see different objects")


def main(args: argparse.Namespace) -> int:
    try:
        paths = make_toy_corpus(args.out, args.videos, args.seconds, args.size, args.fps, args.seed, args.kind)
    except ValueError as e:     # exit codes as in tools/cli.py: 2 usage, 3 job failed
        print(f"abvid toy-corpus: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"abvid toy-corpus: cannot write {args.out}: {e}", file=sys.stderr)
        return 3
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} videos ({total / 1e6:.1f} MB) and {Path(args.out) / 'annotations.csv'}; "
          f"classes: {', '.join(CROWD_CLASSES if args.kind == 'crowd' else CLASSES)}")
    return 0
