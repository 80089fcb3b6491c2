"""Fault injection for preprocess tests: a decode hook and broken media.

``hook(path)`` is passed as ``PreprocessConfig.decode_hook = "_faults:hook"`` (or the
hidden CLI flag ``--decode-hook``); it runs in the worker before a video is opened.
A marker file beside the video picks the fault, so a test can turn it off again:
``<video>.crash`` -> the worker kills itself with SIGSEGV (a crashing decoder);
``<video>.hang``  -> it sleeps forever (a hanging decoder);
``<video>.calls`` -> it appends a line, to count how often a video was decoded;
``<video>.lose``  -> it SIGKILLs the Ray worker it runs under (``ABVID_WORKER_PID``, set by
                     pipeline/ray_preprocess.py): a lost worker or node, every time;
``<video>.lose-once`` -> the same once (the marker is removed first), so the retry succeeds.
"""
from __future__ import annotations

import os
import signal
import time
from fractions import Fraction
from pathlib import Path


def hook(path: str) -> None:
    if os.path.exists(path + ".calls"):
        with open(path + ".calls", "a") as f:
            f.write("decoded\n")
    if os.path.exists(path + ".crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if os.path.exists(path + ".hang"):
        time.sleep(3600)
    if os.path.exists(path + ".lose-once"):
        os.unlink(path + ".lose-once")
        _lose_worker()
    if os.path.exists(path + ".lose"):
        _lose_worker()


def _lose_worker() -> None:
    pid = os.environ.get("ABVID_WORKER_PID")
    if not pid:
        raise RuntimeError("a .lose marker needs the Ray executor (ABVID_WORKER_PID is not set)")
    os.kill(int(pid), signal.SIGKILL)
    os._exit(1)      # the worker is gone; so is this child


def make_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """An .mp4 holding one AAC audio stream and no video."""
    import av
    import numpy as np

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        n = 1024
        for i in range(int(seconds * 16000 / n)):
            samples = (np.sin(np.arange(i * n, (i + 1) * n) / 10.0) * 0.3).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * n
            frame.time_base = Fraction(1, 16000)
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return path


def truncate(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """A copy of ``src`` cut to ``fraction`` of its bytes (an interrupted download)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)
