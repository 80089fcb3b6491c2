"""Shared test fixtures: synthetic videos, synthetic shards, a local shard server, ../shared/media, GPU skipping.

Helpers that several test modules need live here; a fixture used by one module
stays in that module.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import socket
import threading
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDIA = ROOT.parent / "shared" / "media" / "videos"


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA runtime: treat as no GPU
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_media() -> Path:
    """../shared/media/videos (real clips with MANIFEST.tsv); skips when absent."""
    if not (SHARED_MEDIA / "MANIFEST.tsv").exists():
        pytest.skip(f"{SHARED_MEDIA} is absent")
    return SHARED_MEDIA


def frame_pattern(k: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A frame that differs visibly with k (a moving bright square on a gradient), uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                    np.full_like(x, (seed * 37) % 256)], -1).astype(np.uint8)
    s = max(4, min(width, height) // 5)
    cx = (k * 7) % max(width - s, 1)
    cy = (k * 3) % max(height - s, 1)
    img[cy:cy + s, cx:cx + s] = 255
    return img


def make_video(path: str | Path, *, fps: float = 30.0, num_frames: int = 30, width: int = 160,
               height: int = 120, codec: str = "libx264", pts_s: list[float] | None = None,
               seed: int = 0, pix_fmt: str = "yuv420p") -> Path:
    """Encode a small test video with PyAV. ``pts_s`` gives explicit (e.g. variable-rate) timestamps."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if pts_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k in range(num_frames if pts_s is None else len(pts_s)):
            frame = av.VideoFrame.from_ndarray(frame_pattern(k, width, height, seed), format="rgb24")
            if pts_s is not None:
                frame.pts = int(round(pts_s[k] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_test_shards(out_dir: str | Path, *, videos: int = 4, clips_per_video: int = 3, clip_len: int = 8,
                      width: int = 96, height: int = 64, fps: float = 4.0, shard_clips: int = 4,
                      labels: tuple[str, ...] = ("red", "blue")) -> list[Path]:
    """Shards in the preprocess output format (docs/INTERFACES.md), built directly (no decoding)."""
    import webdataset as wds
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for v in range(videos):
        for c in range(clips_per_video):
            key = f"vid{v:03d}_deadbeef-{c:06d}"
            frame_indices = [c * clip_len + i for i in range(clip_len)]
            meta = {"video_id": f"vid{v:03d}_deadbeef", "source": f"/data/vid{v:03d}.mp4", "clip_index": c,
                    "source_fps": 30.0, "fps": fps, "frame_indices": frame_indices,
                    "pts_s": [i / fps for i in frame_indices], "width": width, "height": height,
                    "rotation": 0, "codec": "h264",
                    "annotations": [{"start_s": 0.0, "end_s": 1e6, "label": labels[v % len(labels)]}]}
            sample = {"__key__": key, "json": json.dumps(meta).encode()}
            for i, fi in enumerate(frame_indices):
                buf = io.BytesIO()
                Image.fromarray(frame_pattern(fi, width, height, seed=v)).save(buf, format="JPEG", quality=90)
                sample[f"{i:03d}.jpg"] = buf.getvalue()
            samples.append(sample)
    paths = []
    for s in range(0, len(samples), shard_clips):
        p = out_dir / f"shard-{s // shard_clips:06d}.tar"
        with wds.TarWriter(str(p)) as w:
            for sample in samples[s:s + shard_clips]:
                w.write(sample)
        paths.append(p)
    return paths


@pytest.fixture
def test_shards(tmp_path) -> list[Path]:
    return write_test_shards(tmp_path / "shards")


class ShardServer(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, with Range requests (``ranges``); the first ``fail_first`` requests get ``fail_status``,
    and the first ``cut_first`` bodies stop halfway (the connection drops after half the promised bytes)."""
    fail_first, fail_status, cut_first, ranges, requests = 0, 503, 0, True, 0
    seen_ranges: list

    def do_GET(self) -> None:
        cls = type(self)
        cls.requests += 1
        if cls.requests <= cls.fail_first:
            self.send_error(cls.fail_status)
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        start = 0
        asked = self.headers.get("Range")
        cls.seen_ranges.append(asked)
        if asked and cls.ranges:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.requests <= cls.fail_first + cls.cut_first:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: str | Path) -> Iterator[tuple[str, type]]:
    """(base URL, handler class) of a local http server over ``folder`` (``ShardServer``: set its class
    attributes to make it fail, cut bodies or ignore ranges); shut down on exit."""
    handler = type("Handler", (ShardServer,), {"seen_ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()
