"""One video -> its clips, as tar members in a spool file: the per-video function every executor runs.

``process_video(task, cfg, threads)`` runs in an isolated worker process (``isolation.IsolatedPool``,
started by ``preprocess.py`` here or by ``ray_preprocess.py`` on a Ray worker): it decodes
``task["path"]`` (``video.open_video``: pts resampling, resize), encodes the frames of each clip
(JPEG/WebP, on the decoder's helper thread), writes ``<key>.NNN.jpg`` and ``<key>.json`` members to
``task["spool"]`` and returns the video's manifest fields. Nothing here depends on the executor,
so both write the same keys and bytes. A video with fewer frames than one clip ends ``skipped``
(reason ``too short``); a decode error ends ``failed`` with the reason; nothing escapes.
"""
from __future__ import annotations

import functools
import importlib
import io
import json
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from abvid.pipeline.annotations import overlapping
from abvid.pipeline.errors import UsageError
from abvid.pipeline.manifest import TOO_SHORT
from abvid.pipeline.shardwriter import SpoolWriter

if TYPE_CHECKING:
    from abvid.pipeline.preprocess import PreprocessConfig


def encode_image(img, fmt: str, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG (OpenCV) / WebP (PIL) bytes.

    JPEG: OpenCV and PIL both call libjpeg-turbo with 4:2:0 chroma and the same tables (decoded
    pixels identical here), but OpenCV takes the array as it is: 0.19 vs 0.26 ms per 455x256 frame
    (PIL first copies it into its own 4-byte-per-pixel image).
    """
    if fmt == "jpg":
        import cv2

        ok, data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for a {img.shape} frame")
        return data.tobytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="WEBP", quality=quality, lossless=quality == 100,
                              method=0 if quality < 100 else 1)
    return buf.getvalue()


def process_video(task: dict, cfg: "PreprocessConfig", threads: int) -> dict:
    """Decode ``task["path"]``, write its clips to ``task["spool"]``; returns manifest fields (runs in a worker)."""
    from abvid.pipeline.video import VideoError, open_video

    path, vid, spool, annotations = task["path"], task["video_id"], task["spool"], task["annotations"]
    t_start = time.perf_counter()
    row: dict = {"frames": 0, "clips": 0, "tail_frames": 0, "decode_errors": 0, "source_frames": 0}
    try:
        if cfg.decode_hook:
            resolve_hook(cfg.decode_hook)(path)
        # JPEG/WebP encoding runs on the decoder's helper thread, right after each frame's conversion
        # (OpenCV and PIL release the GIL), overlapping the decoder, for slots in a clip (not in the gaps
        # of a clip_stride > clip_len); a repeated slot shares its bytes. The rare frame first shown in
        # a gap and repeated into a clip is encoded here.
        encode = functools.partial(encode_image, fmt=cfg.format, quality=cfg.quality)
        in_clip = (lambda k: k % cfg.stride < cfg.clip_len) if cfg.stride > cfg.clip_len else None
        with open_video(path, fps=cfg.fps, short_side=cfg.size, backend=cfg.backend, threads=threads,
                        encode=encode, encode_if=in_clip) as dec, SpoolWriter(spool) as out:
            info = dec.info
            window: deque = deque()          # (index, pts_s, bytes) of frames of the next clip(s)
            clip, frames = 0, 0
            last_img, last_data = None, None
            for fr in dec:
                frames += 1
                if fr.index < clip * cfg.stride:     # in a gap between clips (stride > clip_len)
                    continue
                data = fr.data
                if data is None:
                    if fr.image is not last_img:
                        last_img, last_data = fr.image, encode(fr.image)
                    data = last_data
                window.append((fr.index, fr.pts_s, data))
                if fr.index == clip * cfg.stride + cfg.clip_len - 1:
                    frames_of_clip = list(window)[-cfg.clip_len:]
                    _write_clip(out, vid, clip, frames_of_clip, info, fr.image.shape, annotations, path, cfg)
                    clip += 1
                    while window and window[0][0] < clip * cfg.stride:
                        window.popleft()
            covered = (clip - 1) * cfg.stride + cfg.clip_len if clip else 0
            row.update(frames=frames, clips=clip, tail_frames=max(0, frames - covered),
                       decode_errors=dec.decode_errors, source_frames=dec.frames_decoded, backend=dec.backend)
        if clip:
            row.update(status="ok", error="")
        else:
            rate = f"{cfg.fps:g} fps" if cfg.fps else "the source rate"
            row.update(status="skipped", reason=TOO_SHORT,
                       error=f"{path}: {frames} frames at {rate}, fewer than one clip of {cfg.clip_len} "
                             f"(lower --clip-len or raise --fps to use it)")
    except VideoError as e:
        row.update(status="failed", error=str(e), reason="decode error")
    except Exception as e:  # noqa: BLE001 - the isolation boundary: any failure fails this video only
        row.update(status="failed", error=f"{path}: {type(e).__name__}: {e}", reason=f"error ({type(e).__name__})")
    row["seconds"] = round(time.perf_counter() - t_start, 3)
    row["peak_rss_mb"] = peak_rss_mb()
    row["node"] = socket.gethostname()
    return row


def resolve_hook(spec: str):
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"decode_hook {spec!r}: {e}; it must name an importable module:function") from e


def _write_clip(out: SpoolWriter, vid: str, clip: int, frames: list, info, shape, annotations, path, cfg) -> None:
    key = f"{vid}-{clip:06d}"
    pts = [round(p, 6) for _, p, _ in frames]
    step = 1 / cfg.fps if cfg.fps else (1 / info.fps if info.fps else 0.0)  # the last frame's slot length
    span_end = pts[-1] + step
    meta = {"video_id": vid, "source": os.path.abspath(path), "clip_index": clip, "source_fps": info.fps,
            "fps": cfg.fps, "frame_indices": [i for i, _, _ in frames], "pts_s": pts,
            "width": int(shape[1]), "height": int(shape[0]), "rotation": info.rotation, "codec": info.codec,
            "annotations": [a.to_json() for a in overlapping(annotations, pts[0], span_end)]}
    for n, (_, _, data) in enumerate(frames):
        out.add(f"{key}.{n:03d}.{cfg.format}", data)
    out.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) from /proc; 0 where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
