"""Tests for pipeline/video.py: pts-based selection against an independent PyAV reference,
bad inputs, backends, closing, and every clip of ../shared/media/videos (skipped when absent).

Run: .venv/bin/python -m pytest -q tests/test_video.py
"""
from __future__ import annotations

import csv
import gc
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import make_video

from abvid.pipeline import video as V

HAS_DECORD = True
try:
    import decord  # noqa: F401
except ImportError:
    HAS_DECORD = False


# ------------------------------------------------------------ the reference

def reference_frames(path: Path, fps: float, short_side: int) -> list[tuple[int, Fraction, np.ndarray]]:
    """Plain PyAV: decode every frame, then apply the documented rule with exact arithmetic.

    Slot k at T_k = t0 + k/fps exists while T_k <= last pts; it takes the frame of nearest pts,
    the earlier one on a tie. Pixels as documented in video._convert: AREA scaling to the short
    side into 8-bit 4:2:0 YUV, then conversion to RGB.
    """
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [(Fraction(f.pts) * f.time_base, f) for f in c.decode(s)]
    frames.sort(key=lambda x: x[0])
    times = [t for t, _ in frames]
    w0, h0 = frames[0][1].width, frames[0][1].height
    scale = Fraction(short_side, min(w0, h0))
    w, h = (short_side, round(h0 * scale)) if w0 <= h0 else (round(w0 * scale), short_side)
    step = 1 / Fraction(fps).limit_denominator(1_000_000)
    out, k = [], 0
    while times[0] + k * step <= times[-1]:
        tk = times[0] + k * step
        j = min(range(len(times)), key=lambda i: (abs(times[i] - tk), times[i]))
        src = frames[j][1]
        small = src.reformat(width=w, height=h, interpolation="AREA",
                             format="yuvj420p" if src.format.name.startswith("yuvj") else "yuv420p")
        img = small.reformat(format="rgb24").to_ndarray()
        out.append((k, times[j], img))
        k += 1
    return out


@pytest.mark.parametrize("src_fps,num_frames,pts_s", [
    (30.0, 50, None),
    (25.0, 40, None),
    (12.5, 23, None),
    (2.0, 6, None),                                  # slower than the target: frames repeat
    (30.0, 0, [0.0, 0.033, 0.05, 0.2, 0.21, 0.5, 0.52, 0.53, 0.9, 1.0, 1.3, 1.31, 1.7]),  # VFR
])
def test_selection_matches_reference(tmp_path, src_fps, num_frames, pts_s):
    path = make_video(tmp_path / "v.mp4", fps=src_fps, num_frames=num_frames, pts_s=pts_s)
    ref = reference_frames(path, 4.0, 64)
    got = list(V.iter_frames(path, fps=4.0, short_side=64, backend="pyav"))
    assert [f.index for f in got] == [k for k, _, _ in ref]
    assert len(got) >= 4
    with av.open(str(path)) as c:
        src = sorted(float(f.pts * f.time_base) for f in c.decode(video=0))
    if pts_s is not None:
        assert src == pytest.approx(pts_s, abs=1e-6)          # the container kept the VFR stamps
    for f, (k, t, img) in zip(got, ref):
        assert f.pts_s == pytest.approx(float(t), abs=1e-9)
        # the chosen frame is the nearest one: within half the local frame interval of T_k
        tk = src[0] + k / 4.0
        assert abs(f.pts_s - tk) <= min(abs(x - tk) for x in src) + 1e-9
        assert f.image.dtype == np.uint8 and f.image.shape == img.shape
        np.testing.assert_array_equal(f.image, img)
        assert min(f.image.shape[:2]) == 64
    if src_fps == 30.0 and pts_s is None:                     # T_1 = 0.25 s is exactly between
        assert got[1].pts_s == pytest.approx(7 / 30)          # frames 7 and 8: the earlier wins


@pytest.mark.parametrize("pix_fmt", ["yuv444p", "yuv422p"])
def test_non_420_sources_are_scaled_into_420(tmp_path, pix_fmt):
    """4:4:4 / 4:2:2 frames follow the documented rule too (scaled into yuv420p, then RGB)."""
    path = make_video(tmp_path / "v.mp4", fps=8, num_frames=12, pix_fmt=pix_fmt)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == pix_fmt
    ref = reference_frames(path, 4.0, 64)
    got = list(V.iter_frames(path, fps=4.0, short_side=64, backend="pyav"))
    assert len(got) == len(ref) >= 3
    for f, (_, _, img) in zip(got, ref):
        np.testing.assert_array_equal(f.image, img)


def test_encode_runs_per_chosen_image_and_repeats_share_it(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=2, num_frames=4)
    calls = []

    def encode(img):
        calls.append(img.shape)
        return img.sum()

    with V.open_video(path, fps=4, short_side=32, backend="pyav", encode=encode) as dec:
        frames = list(dec)
    assert len(calls) == 4 and len(frames) == 7                 # 4 source frames, 7 slots
    assert all(f.data == f.image.sum() for f in frames)
    assert frames[0].data is frames[1].data
    assert all(f.data is None for f in V.iter_frames(path, fps=4, short_side=32, backend="pyav"))
    calls.clear()
    with V.open_video(path, fps=4, short_side=32, backend="pyav", encode=encode, encode_if=lambda k: k >= 4) as dec:
        frames = list(dec)
    assert [f.data is not None for f in frames] == [False] * 4 + [True] * 3 and len(calls) == 2


def test_slow_source_repeats_share_one_image(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=2, num_frames=4)
    frames = list(V.iter_frames(path, fps=4, short_side=32, backend="pyav"))
    # T = 0, .25, .5, ..., 1.5: ties (.25, .75, 1.25) go to the earlier frame
    assert [f.pts_s for f in frames] == pytest.approx([0, 0, .5, .5, 1, 1, 1.5])
    assert frames[0].image is frames[1].image and frames[1].image is not frames[2].image


def test_raw_h264_without_pts_uses_the_stream_rate(tmp_path):
    """An Annex-B .h264 file has no timestamps: pts are synthesised at the guessed 25 fps."""
    from conftest import frame_pattern
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for k in range(50):
            f = av.VideoFrame.from_ndarray(frame_pattern(k, 96, 64), format="rgb24")
            f.pts = k
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with V.open_video(path, fps=4, short_side=32, backend="pyav") as dec:
        frames = list(dec)
        assert dec.frames_read == dec.frames_decoded == 50      # no pts: nothing skipped
    assert [f.pts_s for f in frames] == pytest.approx([0, .24, .48, .76, 1, 1.24, 1.48, 1.76])


def test_fps_none_keeps_every_frame(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=25, num_frames=17)
    with V.open_video(path, fps=None, short_side=None, backend="pyav") as dec:
        frames = list(dec)
        assert dec.frames_decoded == 17 and dec.decode_errors == 0
    assert [f.index for f in frames] == list(range(17))
    assert [f.pts_s for f in frames] == pytest.approx([k / 25 for k in range(17)])
    assert frames[0].image.shape == (120, 160, 3)


def test_resampler_repeats_slow_sources_and_breaks_ties_early():
    r = V.Resampler(4.0)
    picks = []
    for t in [Fraction(0), Fraction(1, 2), Fraction(5, 8), Fraction(1)]:   # a 2-4 fps source
        picks += [(k, float(tt)) for k, tt, _ in r.push(t, None)]
    # T = 0, .25 (tie between 0 and .5 -> 0), .5, .75 (nearest .625), 1.0
    assert picks == [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.625), (4, 1.0)]
    with pytest.raises(ValueError):
        V.Resampler(0.0)


def test_probe_and_info(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=25, num_frames=50, width=96, height=160)
    info = V.probe(path)
    assert (info.width, info.height, info.rotation, info.codec) == (96, 160, 0, "h264")
    assert info.fps == pytest.approx(25.0) and info.duration_s == pytest.approx(2.0, abs=0.05)
    assert info.num_frames == 50
    frames = list(V.iter_frames(path, fps=4, short_side=32))
    assert frames[0].image.shape == (53, 32, 3)   # portrait: width is the short side


def test_skipping_unused_nonref_frames_changes_nothing(tmp_path, monkeypatch):
    """x264 output has non-reference B-frames: unused ones are not decoded, output identical."""
    path = make_video(tmp_path / "v.mp4", fps=30, num_frames=90)

    def run(threads):
        with V.open_video(path, fps=4, short_side=48, backend="pyav", threads=threads) as dec:
            frames = [(f.index, f.pts_s, f.image) for f in dec]
            return frames, dec.frames_read, dec.frames_decoded

    skipped, read, decoded = run(0)
    assert read == 90 and decoded < 90                    # some frames were never decoded
    single, _, _ = run(1)
    monkeypatch.setattr(V, "SKIP_NONREF_CODECS", ())
    full, read_all, decoded_all = run(0)
    assert read_all == decoded_all == 90
    for other in (single, full):
        assert [f[:2] for f in other] == [f[:2] for f in skipped]
        for a, b in zip(other, skipped):
            np.testing.assert_array_equal(a[2], b[2])


def test_skipping_with_an_edit_list(tmp_path, monkeypatch):
    """Packets before an MP4 edit list's start are decoded but never shown: the grid starts
    at the first shown frame whether or not unused frames are skipped."""
    src = make_video(tmp_path / "src.mp4", fps=25, num_frames=50)
    path = tmp_path / "edit.mp4"
    with av.open(str(src)) as i, av.open(str(path), "w") as o:    # shift pts by -5 frames
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(video=0):
            if p.dts is not None:
                shift = int(round(5 / 25 / p.time_base))
                p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, s
                o.mux(p)
    with av.open(str(path)) as c:
        assert sum(p.is_discard for p in c.demux(video=0)) == 5
    runs = []
    for codecs in (("h264",), ()):
        monkeypatch.setattr(V, "SKIP_NONREF_CODECS", codecs)
        runs.append([(f.index, f.pts_s, f.image) for f in V.iter_frames(path, 4, 32, "pyav")])
    assert [f[:2] for f in runs[0]] == [f[:2] for f in runs[1]] and runs[0][0][1] == 0.0
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a[2], b[2])


class _Pkt:
    def __init__(self, pts):
        self.pts, self.size = pts, 1


@pytest.mark.parametrize("seed", range(5))
def test_skip_planner_keeps_every_chosen_frame(seed):
    """Random VFR pts in a B-frame-like decode order: every frame the rule picks is needed."""
    rng = np.random.default_rng(seed)
    pts = np.cumsum(rng.integers(1, 60, size=200))            # presentation order, ms
    order = np.argsort(np.arange(200) + rng.uniform(0, 4, 200))   # decode order, displaced < 4
    planner = V.SkipPlanner(4.0, Fraction(1, 1000), enabled=True)
    out = [x for i in order for x in planner.push(_Pkt(int(pts[i])))] + list(planner.push(None))
    assert [p.pts for p, _ in out] == [int(pts[i]) for i in order]   # decode order kept
    needed = {p.pts for p, n in out if n}
    res = V.Resampler(4.0)
    chosen = {int(c * 1000) for t in pts for _, c, _ in res.push(Fraction(int(t), 1000), None)}
    assert chosen | {int(pts[0]), int(pts[-1])} <= needed
    assert len(needed) < 200 and planner.enabled


def test_skip_planner_turns_off_without_pts():
    planner = V.SkipPlanner(4.0, Fraction(1, 1000), enabled=True)
    out = [x for t in (0, 40, None, 120) for x in planner.push(_Pkt(t))] + list(planner.push(None))
    assert not planner.enabled and all(n for _, n in out) and len(out) == 4
    late = V.SkipPlanner(4.0, Fraction(1, 1000), enabled=True)    # a pts 30 packets late
    stamps = list(range(0, 4000, 40))
    stamps.insert(30, 20)
    out = [x for t in stamps for x in late.push(_Pkt(t))] + list(late.push(None))
    assert not late.enabled and [p.pts for p, _ in out] == stamps


# ------------------------------------------------------------ bad inputs

def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(8):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for p in s.encode(fr):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such file"), ("zero", "empty file"), ("text", "not a readable video"),
    ("audio", "no video stream"), ("dir", "directory")])
@pytest.mark.parametrize("backend", ["auto", "pyav"] + (["decord"] if HAS_DECORD else []))
def test_bad_inputs_raise_video_error_naming_the_file(tmp_path, kind, reason, backend):
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "audio":
        _audio_only(path)
    elif kind == "dir":
        path.mkdir()
    with pytest.raises(V.VideoError) as e:
        with V.open_video(path, fps=4, short_side=32, backend=backend) as dec:
            list(dec)
    assert str(path) in str(e.value) and reason in str(e.value)
    with pytest.raises(V.VideoError):
        V.probe(path, backend=backend)


def test_corrupt_packet_is_skipped_and_counted(tmp_path):
    """Overwrite the middle of one mid-stream packet: the decoder skips or conceals it and goes on."""
    path = make_video(tmp_path / "v.mp4", fps=25, num_frames=50)
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size and p.pos is not None]
    data = bytearray(path.read_bytes())
    pos, size = packets[25]
    data[pos:pos + size] = bytes([0xFF]) * size        # garbage in place of packet 25
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with V.open_video(bad, fps=None, short_side=32, backend="pyav") as dec:
        frames = list(dec)
        assert dec.decode_errors >= 1 and dec.frames_decoded == len(frames)
    assert 40 <= len(frames) <= 49       # frames after the bad packet still come out
    assert V.decode_only(bad) == len(frames)


# ------------------------------------------------------------ backends, closing

@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_backends_agree_on_plain_h264(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=30, num_frames=60)
    runs = {b: list(V.iter_frames(path, fps=4, short_side=64, backend=b)) for b in ("pyav", "decord", "auto")}
    for b in ("decord", "auto"):
        assert [f.index for f in runs[b]] == [f.index for f in runs["pyav"]]
        assert [f.pts_s for f in runs[b]] == pytest.approx([f.pts_s for f in runs["pyav"]], abs=1e-6)
        for a, c in zip(runs["pyav"], runs[b]):
            assert a.image.shape == c.image.shape
            assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() < 6   # resize filters differ
    with V.open_video(path, backend="auto") as dec:
        assert dec.backend == "pyav"


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_falls_back_to_decord_when_pyav_decodes_nothing(tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4", fps=25, num_frames=25)

    def no_frame(path, *args):
        raise V._NoFrameError(f"{path}: simulated: PyAV decoded no frame")

    monkeypatch.setattr(V, "_PyAVDecoder", no_frame)
    with V.open_video(path, fps=4, short_side=32, backend="auto") as dec:
        frames = list(dec)
        assert dec.backend == "decord" and dec.info.codec == "unknown"
    assert [f.index for f in frames] == [0, 1, 2, 3] and frames[0].image.shape == (32, 43, 3)
    with pytest.raises(V.VideoError, match="simulated"):
        V.probe(path, backend="pyav")


def test_decoder_closed_when_consumer_stops_early(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=30, num_frames=30)
    backends = ["pyav", "decord"] if HAS_DECORD else ["pyav"]
    for backend in backends:
        with V.open_video(path, fps=4, short_side=32, backend=backend) as dec:
            next(iter(dec))
            assert not dec.closed
        assert dec.closed
    gen = V.iter_frames(path, fps=4, short_side=32, backend="pyav")
    next(gen)
    dec = gen.gi_frame.f_locals["dec"]   # the decoder inside the wrapper's with block
    assert not dec.closed
    gen.close()                          # generator close -> with block exits -> decoder closed
    assert dec.closed
    for _ in range(200):                 # no leak of open files / decoders when breaking early
        for _f in V.iter_frames(path, fps=4, short_side=32, backend="pyav"):
            break
    gc.collect()
    open_fds = len(list(Path("/proc/self/fd").iterdir())) if Path("/proc/self/fd").exists() else 0
    assert open_fds < 200


def test_decode_only_counts_every_frame(tmp_path):
    path = make_video(tmp_path / "v.mp4", fps=30, num_frames=37)
    assert V.decode_only(path) == 37 == V.decode_only(path, threads=1)


# ------------------------------------------------------------ ../shared/media

def _manifest(root: Path) -> list[dict]:
    with open(root / "MANIFEST.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_every_shared_clip_decodes(shared_media):
    """Every clip in MANIFEST.tsv probes and yields >= 1 upright frame at fps 4, short side 64.

    corrupted.mp4 (PyAV: InvalidDataError after 28 frames) yields its good frames with
    ``decode_errors > 0``: the bad packet is skipped and decoding continues.
    Long clips (> 20 s) are read at 1 fps to keep the test short; memory stays flat anyway.
    """
    rows = _manifest(shared_media)
    assert len(rows) >= 40
    failures = []
    for row in rows:
        path = shared_media / row["file"]
        duration = float(row["duration_s"])
        fps = 1.0 if duration > 20 else 4.0
        try:
            info = V.probe(path)
            with V.open_video(path, fps=fps, short_side=64) as dec:
                frames = list(dec)
                errors = dec.decode_errors
        except V.VideoError as e:
            failures.append(f"{row['file']}: {e}")
            continue
        w, h = (int(x) for x in row["resolution"].split("x"))
        n = len(frames)
        expect = math.floor(duration * fps)
        if not (n >= 1 and abs(n - expect) <= max(2, 0.1 * expect)):
            failures.append(f"{row['file']}: {n} frames, expected about {expect}")
        if any(min(f.image.shape[:2]) != 64 for f in frames):
            failures.append(f"{row['file']}: short side is not 64")
        name = Path(row["file"]).name
        if name in ("video_90.mov", "video_270.mov"):
            assert info.rotation in (90, 270) and (info.width, info.height) == (h, w), row["file"]
            assert frames[0].image.shape[0] > frames[0].image.shape[1], f"{name} should be portrait"
        elif name in ("video_0.mov", "video_180.mov"):
            assert info.rotation == int(name[6:-4]) and frames[0].image.shape[0] < frames[0].image.shape[1]
        if name == "corrupted.mp4":
            assert errors > 0 and n > 0
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
@pytest.mark.parametrize("rot", [90, 180, 270])
def test_rotation_agrees_with_decord(shared_media, rot):
    """decord applies rotation its own way: both backends must give the same upright picture."""
    path = shared_media / "decord" / "edge_cases" / f"video_{rot}.mov"
    a = next(V.iter_frames(path, fps=4, short_side=64, backend="pyav")).image
    b = next(V.iter_frames(path, fps=4, short_side=64, backend="decord")).image
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
    # and a wrong rotation would be far off
    assert np.abs(np.rot90(a, 2).astype(int) - b.astype(int)).mean() > 20


def test_conversion_helper_runs_below_the_decoder_priority(tmp_path):
    """Linux: the helper thread's nice value is raised by HELPER_NICENESS, the caller's untouched.
    Elsewhere threads have no nice value of their own and the helper runs as it is."""
    import threading
    linux = sys.platform.startswith("linux")
    path = make_video(tmp_path / "v.mp4", fps=8, num_frames=8)
    seen = set()

    def encode(img):     # runs on the helper thread, after the conversion
        tid = threading.get_native_id()
        seen.add((tid, os.getpriority(os.PRIO_PROCESS, tid) if linux else None))
        return b""

    base = os.getpriority(os.PRIO_PROCESS, 0)
    with V.open_video(path, fps=4, short_side=32, backend="pyav", encode=encode) as dec:
        assert len(list(dec)) >= 3
    (tid, nice), = seen                                         # one helper thread for the whole video
    assert tid != threading.get_native_id()
    assert nice == (min(19, base + V.HELPER_NICENESS) if linux else None)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base           # the caller's own priority is untouched
