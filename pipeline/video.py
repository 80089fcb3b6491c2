"""Video probing and streaming decode with pts-based resampling (docs/INTERFACES.md, issue 2 item 2).

The only module of abvid that imports PyAV (``av``) or ``decord``.

    with open_video("clip.mp4", fps=4.0, short_side=256) as dec:
        for frame in dec:            # Frame(index, pts_s, image (H, W, 3) uint8 RGB, upright)
            ...

Selection rule (pipeline/resample.py states it; tests/test_video.py reimplements it)
    Decoded frames are put in presentation order (a 4-frame reorder window sorts slightly
    unordered pts; a frame later than that is dropped and counted in ``frames_dropped``;
    a frame without pts gets previous pts + 1/source fps, 1/25 s if unknown). With t_j the
    exact pts (``pts * time_base`` as a Fraction) and t0 the first one, slot k has time
    T_k = t0 + k / fps (while T_k <= t_last) and takes the frame whose pts is nearest to
    T_k, the earlier one on a tie (:class:`~abvid.pipeline.resample.Resampler`).

PyAV backend (the fast path)
    FFmpeg frame+slice threading (``thread_type="AUTO"``: cockatoo.mp4 decodes in 0.39-0.42 s
    against 0.48-0.55 s with PyAV's default slice threading); ``threads`` is the codec's
    and swscale's thread count (0 = auto; pass 1 when running one process per core). For
    H.264/HEVC the packet pts decide before decoding which frames the rule can pick; the
    others are sent with ``skip_frame=NONREF``, so the codec skips them when nothing
    references them (:class:`~abvid.pipeline.resample.SkipPlanner`; output identical,
    tested). Only chosen frames are converted (:meth:`_PyAVDecoder._convert`, reused
    swscale contexts, AREA filter); rotation (display matrix, ``frame.rotation``) is
    applied with numpy after the resize.

Why ``auto`` prefers PyAV (the first design said decord first; docs/DESIGN.md)
    Alternating runs of ``decode_only(f)`` (every frame) and iterating ``open_video(f, 4.0, 256, backend)``
    on the shared 2-core VM (load 6-9, process CPU seconds, median of 5-9): cockatoo.mp4 (720p H.264,
    280 frames) decode-only 0.50 s, PyAV backend 0.58-0.62 s, decord backend 0.69-0.71 s; decord
    also rejects GIF and AV1 here. So ``auto`` uses PyAV and falls back to decord (its own FFmpeg
    build, which honours rotation too) per file only when PyAV decodes no frame of a stream.

Errors: a corrupt packet is skipped and counted in ``decode_errors``; a file that yields no
frame raises :class:`VideoError` naming the file and the reason. The decoder is closed when
the ``with`` block exits, also when the consumer stops iterating early.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import re
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Callable, Iterator

import numpy as np

from abvid.pipeline.resample import Resampler, SkipPlanner, output_size

BACKENDS = ("auto", "pyav", "decord")
REORDER_WINDOW = 4                     # decoded frames held to sort slightly unordered pts
MAX_DEMUX_ERRORS = 32                  # consecutive container read errors before we stop
DEFAULT_STEP = Fraction(1, 25)         # pts step for frames without pts, rate unknown
CONVERT_AHEAD = 4                      # frames converted on the helper thread ahead of the consumer
SKIP_NONREF_CODECS = ("h264", "hevc")  # codecs whose unused non-reference frames are skipped
HELPER_NICENESS = 10                   # added to the nice value of the conversion/encoding helper thread


class VideoError(RuntimeError):
    """A video could not be decoded; the message names the file and the reason."""


class _NoFrameError(VideoError):
    """PyAV found a video stream but decoded no frame of it (decord may still manage)."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int                  # display size, after rotation
    height: int
    fps: float | None           # average (else guessed) rate; None when unknown
    duration_s: float | None
    num_frames: int | None      # the container's count (absent for some formats)
    rotation: int               # degrees clockwise that decode turns frames to make them upright
    codec: str
    backend: str


@dataclass
class Frame:
    index: int                  # index in the resampled stream (0, 1, 2, ... at `fps`)
    pts_s: float                # source pts of the frame chosen for this slot, seconds
    image: np.ndarray           # (H, W, 3) uint8 RGB, upright, short side == short_side;
                                # repeated slots share one array: copy before writing into it
    data: Any = None            # encode(image) if open_video's encode_if held for its first slot, else None


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file (check the path)")
    if os.path.isdir(path):
        raise VideoError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")


def _av_open(path: str, threads: int):
    """Open ``path`` and its first video stream with our threading; returns (container, stream)."""
    import av

    _check_path(path)
    try:
        container = av.open(path, "r")
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video container: truncated, corrupt or "
                         f"not a video ({e})") from e
    try:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoError(f"{path}: no video stream (streams: {kinds}); audio-only or not a video")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise _NoFrameError(f"{path}: unsupported video codec (no decoder in this FFmpeg build)")
        stream.thread_type = "AUTO"    # frame threading: 20-30% faster than slice-only for H.264
        stream.codec_context.thread_count = threads
    except BaseException:
        container.close()
        raise
    return container, stream


def _demux(container, stream, errors: list[str]) -> Iterator[Any]:
    """Packets of ``stream``; a container read error is recorded and reading resumes after it."""
    import av

    consecutive = 0
    while True:
        try:
            for packet in container.demux(stream):
                consecutive = 0
                yield packet
            return
        except av.error.FFmpegError as e:
            errors.append(f"read: {e}")
            consecutive += 1
            if consecutive >= MAX_DEMUX_ERRORS:
                return


def decode_only(path: str | os.PathLike, threads: int = 0, fps: float | None = None) -> int:
    """Decode the first video stream, converting nothing; returns the frames decoded: every frame, or with
    ``fps`` what ``open_video(path, fps)`` decodes (its own packet loop and skipping): bench preprocess's bound."""
    import av

    if fps is not None:
        dec = _PyAVDecoder(os.fspath(path), fps, None, threads)
        try:
            return sum(1 for _ in itertools.chain(dec._first, dec._raw))
        finally:
            dec.close()
    container, stream = _av_open(os.fspath(path), threads)
    n = 0
    try:
        for packet in _demux(container, stream, []):
            try:
                n += len(packet.decode())
            except av.error.FFmpegError:   # skip corrupt packets, as the decoder does
                continue
    finally:
        container.close()
    return n


def _lower_priority() -> None:
    """Raise this thread's nice value by HELPER_NICENESS (Linux; elsewhere PRIO_PROCESS takes a process id).
    For the decoder's helper: decoding is the critical path, the helper has CONVERT_AHEAD frames of
    slack (bench preprocess on cockatoo.mp4, back to back: 0.84-0.87 -> 0.87-0.91)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):    # not permitted: stay at the normal priority
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HELPER_NICENESS))


class _PyAVDecoder:
    backend = "pyav"

    def __init__(self, path: str, fps: float | None, short_side: int | None, threads: int,
                 encode: Callable[[np.ndarray], Any] | None = None, encode_if: Callable[[int], bool] | None = None):
        import av
        from av.video.reformatter import Interpolation, VideoReformatter

        self.path, self.closed, self._encode, self._encode_if = path, False, encode, encode_if
        self.frames_decoded = self.frames_read = self.frames_dropped = 0
        self._errors: list[str] = []
        self._resampler = Resampler(fps)
        self.container, self.stream = _av_open(path, threads)
        try:
            s = self.stream
            self._tb = s.time_base or Fraction(1, 1_000_000)
            rate = s.average_rate or s.guessed_rate
            self._step = 1 / Fraction(rate) if rate else DEFAULT_STEP
            self._planner = SkipPlanner(fps, self._tb, s.codec_context.name in SKIP_NONREF_CODECS)
            self._raw = self._decoded()
            first = next(self._raw, None)   # decode one frame now: rotation, and fail early
            if first is None:
                raise _NoFrameError(self._no_frame_reason())
            self._first: Iterator[Any] = iter([first])
            rot = (-round(first.rotation / 90) * 90) % 360      # frame.rotation is counter-clockwise
            sar = s.sample_aspect_ratio
            w = round(first.width * sar) if sar and sar > 0 else first.width   # square pixels
            h = first.height
            self._size = output_size(w, h, short_side)          # swscale target, before rotation
            self._rot_k = (-rot // 90) % 4                       # np.rot90 turns counter-clockwise
            dur = (s.duration * s.time_base if s.duration and s.time_base else
                   (cd / av.time_base if (cd := self.container.duration) else None))
            self.info = VideoInfo(path=path, width=h if rot % 180 else w, height=w if rot % 180 else h,
                                  fps=float(rate) if rate else None, duration_s=float(dur) if dur else None,
                                  num_frames=s.frames or None, rotation=rot, codec=s.codec_context.name,
                                  backend="pyav")
            # swscale contexts, reused for every frame: scale (in the source format), convert to RGB
            self._scaler, self._to_rgb = VideoReformatter(), VideoReformatter()
            self._interp = Interpolation.AREA
            self._sws_threads = threads                # 1 when the caller runs one process per core
        except BaseException:
            self.close()
            raise

    @property
    def decode_errors(self) -> int:
        return len(self._errors)

    def _no_frame_reason(self) -> str:
        why = f"; {len(self._errors)} corrupt packets, first: {self._errors[0]}" if self._errors else ""
        return f"{self.path}: no frame could be decoded (codec {self.stream.codec_context.name}{why})"

    def _decoded(self) -> Iterator[Any]:
        """av.VideoFrames in decode order; a packet the codec rejects is skipped and counted."""
        import av

        ctx, skipping = self.stream.codec_context, False
        for packet in itertools.chain(_demux(self.container, self.stream, self._errors), [None]):
            for pkt, needed in self._planner.push(packet):
                if needed == skipping:      # the codec reads skip_frame per packet
                    skipping = not needed
                    ctx.skip_frame = "NONREF" if skipping else "DEFAULT"
                self.frames_read += pkt.size > 0
                try:
                    frames = pkt.decode()
                except av.error.FFmpegError as e:
                    self._errors.append(f"packet pts={pkt.pts}: {e}")
                    self._planner.enabled = False   # damaged stream: decode all from here on
                    continue
                self.frames_decoded += len(frames)
                yield from frames

    def _ordered(self) -> Iterator[tuple[Fraction, Any]]:
        """(pts in seconds, frame) in presentation order, through a small reorder heap."""
        heap: list[tuple[Fraction, int, Any]] = []
        last_in = last_out = None
        for seq, f in enumerate(itertools.chain(self._first, self._raw, [None])):
            if f is not None:
                pts = f.pts if f.pts is not None else f.dts
                if pts is None:
                    t = Fraction(0) if last_in is None else last_in + self._step
                else:
                    t = Fraction(pts) * (f.time_base or self._tb)
                heapq.heappush(heap, (t, seq, f))
                last_in = t
            while heap and (len(heap) > REORDER_WINDOW or f is None):
                t, _, out = heapq.heappop(heap)
                if last_out is not None and t < last_out:
                    self.frames_dropped += 1
                    continue
                last_out = t
                yield t, out

    def _convert(self, f) -> np.ndarray:
        """Scale + convert one frame to (h, w, 3) RGB, upright.

        Planar YUV is scaled into 8-bit 4:2:0 (``yuvj420p`` if full-range), then converted at the small
        size: one-pass scale-to-rgb24 took 3.7 ms per 720p yuv420p frame against 1.1 ms for the two
        steps. 4:4:4 / 4:2:2 / 10-bit go to 4:2:0 too: swscale's yuv420p -> rgb24 is SIMD (0.04 ms at
        455x256, 0.35 from 4:4:4; cockatoo.mp4 0.85 vs 1.16 ms per frame), and JPEG/WebP store 4:2:0.
        """
        w, h, th = *self._size, self._sws_threads
        name = f.format.name
        if name.startswith("yuv"):
            fmt = "yuvj420p" if name.startswith("yuvj") else "yuv420p"
            f = self._scaler.reformat(f, width=w, height=h, format=fmt, interpolation=self._interp, threads=th)
            img = self._to_rgb.reformat(f, format="rgb24", threads=th).to_ndarray()
        else:   # palette / RGB / grey sources: one pass
            img = self._to_rgb.reformat(f, width=w, height=h, format="rgb24", interpolation=self._interp,
                                        threads=th).to_ndarray()
        return np.ascontiguousarray(np.rot90(img, self._rot_k)) if self._rot_k else img

    def _convert_encode(self, f, encode: bool) -> tuple[np.ndarray, Any]:
        img = self._convert(f)
        return img, (self._encode(img) if encode else None)

    def __iter__(self) -> Iterator[Frame]:
        # Conversion (swscale releases the GIL) and the caller's ``encode`` (OpenCV releases it too) run
        # on one low-priority helper thread, CONVERT_AHEAD frames behind the decoder: serial, conversion
        # took 23% of the wall time of cockatoo.mp4 at 4 fps / 256 px; encoding on a second helper
        # cost 3% more wall time (one more hand-off per frame).
        pending: deque = deque()                 # (index, pts, Future[(image, data)]) in output order
        last, fut = None, None
        with ThreadPoolExecutor(max_workers=1, initializer=_lower_priority) as pool:
            for t, f in self._ordered():
                for k, tk, chosen in self._resampler.push(t, f):
                    if chosen is not last:   # a repeated slot (source slower than fps) shares the image
                        encode = self._encode is not None and (self._encode_if is None or self._encode_if(k))
                        last, fut = chosen, pool.submit(self._convert_encode, chosen, encode)
                    pending.append((k, tk, fut))
                while len(pending) > CONVERT_AHEAD:
                    k, tk, done = pending.popleft()
                    yield Frame(k, float(tk), *done.result())
            while pending:
                k, tk, done = pending.popleft()
                yield Frame(k, float(tk), *done.result())

    def close(self) -> None:
        self.closed = True
        self.container.close()


class _DecordDecoder:
    """decord: all timestamps up front, then a sequential walk with ``skip_frames`` / ``next``."""

    backend = "decord"

    def __init__(self, path: str, fps: float | None, short_side: int | None, threads: int,
                 encode: Callable[[np.ndarray], Any] | None = None, encode_if: Callable[[int], bool] | None = None):
        import decord

        self.path, self.closed, self._encode, self._encode_if = path, False, encode, encode_if
        self.frames_decoded = self.frames_read = self.frames_dropped = self.decode_errors = 0
        try:   # codec, time base and rotation, which decord does not report: PyAV, one frame
            hdr = _PyAVDecoder(path, None, None, threads)
            info, tb = hdr.info, hdr._tb
            hdr.close()
        except _NoFrameError:
            info, tb = None, None
        try:
            if info is None:
                vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
                h, w = vr.next().shape[:2]
                info = VideoInfo(path, w, h, vr.get_avg_fps() or None, None, len(vr), 0, "unknown", "")
                del vr
            self._size = output_size(info.width, info.height, short_side)
            # decord turns frames upright itself, then scales to exactly (width, height)
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), width=self._size[0],
                                          height=self._size[1], num_threads=threads)
            n = len(self._vr)
            ts = self._vr.get_frame_timestamp(range(n))[:, 0] if n else []
        except (decord.DECORDError, RuntimeError) as e:   # also RuntimeError("Error reading ...")
            if isinstance(e, VideoError):
                raise
            msg = re.sub(r"^\[[\d:]+\] \S+: ", "", str(e).strip().splitlines()[0])
            raise VideoError(f"{path}: decord cannot decode it ({msg})") from e
        if n == 0:
            raise VideoError(f"{path}: decord found no frame")
        self.info = replace(info, num_frames=n, backend="decord")
        # decord's float32 seconds, snapped back to the time base so ties break as in PyAV
        times = [Fraction(round(float(x) / tb)) * tb if tb else Fraction(float(x)) for x in ts]
        if any(b < a for a, b in zip(times, times[1:])):
            raise VideoError(f"{path}: decord reports unordered timestamps (use backend pyav)")
        res = Resampler(fps)
        self._plan = [c for j, t in enumerate(times) for c in res.push(t, j)]  # (slot, pts, index)

    def __iter__(self) -> Iterator[Frame]:
        import decord

        pos, last_j, img, data = 0, -1, None, None
        for k, tk, j in self._plan:
            if j != last_j:
                try:
                    if j > pos:
                        self._vr.skip_frames(j - pos)
                    img = self._vr.next().asnumpy()      # (h, w, 3) uint8
                except (decord.DECORDError, RuntimeError):
                    self.decode_errors += 1              # decord cannot resume after an error
                    return
                self.frames_decoded = self.frames_read = pos = j + 1
                last_j = j
                if img.shape != (self._size[1], self._size[0], 3):
                    raise VideoError(f"{self.path}: decord returned a {img.shape} frame, expected "
                                     f"{(self._size[1], self._size[0], 3)} (use backend pyav)")
                wanted = self._encode is not None and (self._encode_if is None or self._encode_if(k))
                data = self._encode(img) if wanted else None
            yield Frame(k, float(tk), img, data)   # repeated slots share the image

    def close(self) -> None:
        self.closed = True
        self._vr = None   # decord frees its demuxer and decoder with the reader


def _open(path: str, fps: float | None, short_side: int | None, backend: str, threads: int,
          encode: Callable[[np.ndarray], Any] | None = None, encode_if: Callable[[int], bool] | None = None):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1 or None, got {short_side}")
    if backend == "decord":
        return _DecordDecoder(path, fps, short_side, threads, encode, encode_if)
    try:
        return _PyAVDecoder(path, fps, short_side, threads, encode, encode_if)
    except _NoFrameError as e:
        if backend == "pyav":
            raise
        try:
            import decord  # noqa: F401
        except ImportError:
            raise e from None
        try:
            return _DecordDecoder(path, fps, short_side, threads, encode, encode_if)
        except VideoError as e2:
            raise VideoError(f"{e} [decord fallback: {e2}]") from e


@contextlib.contextmanager
def open_video(path: str | os.PathLike, fps: float | None = 4.0, short_side: int | None = 256,
               backend: str = "auto", threads: int = 0, encode: Callable[[np.ndarray], Any] | None = None,
               encode_if: Callable[[int], bool] | None = None) -> Iterator[Any]:
    """Streaming decoder; iterate it for :class:`Frame` objects. Closed when the block exits.

    Attributes: ``info`` (VideoInfo), ``frames_decoded`` (frames the codec produced),
    ``frames_read`` (source frames read, decoded or skipped as unused: use it for source
    frames/s), ``decode_errors``, ``frames_dropped``, ``backend``, ``closed``.
    ``fps=None`` keeps every frame; ``short_side=None`` keeps the source size.
    ``encode`` (e.g. image -> JPEG bytes) runs on the decoder's helper thread into ``Frame.data`` for
    each image whose first slot passes ``encode_if(index)`` (default: all); repeats share it.
    """
    dec = _open(os.fspath(path), fps, short_side, backend, threads, encode, encode_if)
    try:
        yield dec
    finally:
        dec.close()


def iter_frames(path: str | os.PathLike, fps: float | None, short_side: int | None,
                backend: str = "auto", threads: int = 0) -> Iterator[Frame]:
    """Frames of ``path`` (see :func:`open_video`); closing the generator closes the decoder."""
    with open_video(path, fps, short_side, backend, threads) as dec:
        yield from dec


def probe(path: str | os.PathLike, backend: str = "auto") -> VideoInfo:
    """Display size (after rotation), rate, duration, frame count, rotation, codec (decodes one frame)."""
    with open_video(path, None, None, backend, threads=1) as dec:
        return dec.info
