"""Where ``abvid embed``'s frames come from: input units, decoding, batching, and the decoders that run it.

A *unit* is one video file or one shard (``expand_units``). Its frames are resized to short side
``size`` and centre-cropped (``center_square``), grouped into batches that never span two units
(``batched``: so a video's vectors do not depend on what else is embedded with it), and handed to
the job as events, in each unit's order:

    ("batch", unit, (rows, uint8 tensor (B, S, S, 3)))  ...  then ("done", unit, None) or ("failed", unit, why)

Two local decoders make those events (``decode_events``):

* ``workers=1``: one decoder in a background thread of this process (``prefetch``), feeding the
  encoder in the caller's thread (PyAV decoding and torch both release the GIL);
* ``workers=N>1``: N decoder processes (a torch ``DataLoader`` over ``UnitStream``), each taking the
  next unit from a shared counter, so N videos decode at once; batches cross in shared memory
  (pinned on CUDA) and arrive in completion order, each unit's batches still in order. This is
  what keeps a GPU fed on a many-core host: one video's FFmpeg threads scale poorly.

Decoders run at a lower priority (nice +DECODER_NICENESS): when they and the encoder want the
same core, the encoder goes first and the decoders fill the gaps (prefetched batches give them
slack). On the shared 2-core machine, vit_tiny at 112 px with 2 decoder processes: 103-120 ->
129-138 frames/s end to end (alternating runs; torch's two intra-op threads stall whenever a
decoder takes one of their cores). On a GPU host the encoder's thread mostly waits on the GPU,
so the decoders lose nothing.

The Ray Data pipeline (``embed_ray.py``) reuses ``unit_frames`` and ``batched`` on the cluster.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import queue
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from abvid.pipeline.errors import UsageError
from abvid.pipeline.manifest import video_id   # the shard key's video_id, so both inputs name videos alike

T = TypeVar("T")
DECODER_NICENESS = 10    # added to the decoders' nice value: see decode_events


class EmbedError(UsageError):
    """The embedding job cannot start as given (settings clash with an existing output folder, no input...): exit 2."""


class ShardError(RuntimeError):
    """A shard cannot be read (truncated tar, bad JSON, missing frame); names the file."""


@dataclass(frozen=True)
class Unit:
    kind: str          # "video" | "shard"
    path: str          # absolute path, or an http(s) shard URL
    name: str          # file stem of its part in OUT/parts (unique per path)
    origin: str        # the argument that produced it
    skip_reason: str = ""


@dataclass
class UnitResult:
    input: str
    kind: str
    name: str
    status: str        # ok | cached | failed | skipped
    frames: int = 0
    error: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------- inputs

def _is_shard_spec(spec: str) -> bool:
    """A .tar path / glob / brace pattern / URL, or a folder holding *.tar files."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return any(p.glob("*.tar"))
    return spec.endswith(".tar") or (spec.endswith("}") and ".tar" in spec)


def expand_units(specs: list[str]) -> list[Unit]:
    """Videos (pipeline/inputs.expand_inputs) first, then shards (pipeline/source.expand_shards), in order."""
    from abvid.pipeline.inputs import expand_inputs
    from abvid.pipeline.source import expand_shards

    shard_specs = [s for s in specs if _is_shard_spec(s)]
    video_specs = [s for s in specs if s not in shard_specs]
    units = [Unit("video", it.path, video_id(it.path), it.origin, it.skip_reason)
             for it in expand_inputs(video_specs)]
    seen = {u.path for u in units}
    for spec in shard_specs:
        try:
            paths = expand_shards(spec)
        except ValueError:   # a missing shard path / empty pattern: kept, so it is reported as a failed input
            units.append(Unit("shard", os.path.abspath(spec), "shard_" + video_id(spec), spec, ""))
            continue
        for path in paths:
            if "://" not in path:     # http(s) shards stream as the training loader's do (pipeline/source.py)
                path = os.path.abspath(path)
            dup = "duplicate input" if path in seen else ""
            seen.add(path)
            units.append(Unit("shard", path, "shard_" + video_id(path), spec, dup))
    return units


# ----------------------------------------------------------------------------- frames

def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3): resize the short side to ``size`` if needed, crop the centre."""
    h, w = image.shape[:2]
    if min(h, w) != size:
        from PIL import Image
        s = size / min(h, w)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
        h, w = nh, nw
    y, x = (h - size) // 2, (w - size) // 2
    return image[y:y + size, x:x + size]


def video_frames(path: str, fps: float | None, size: int, backend: str = "auto",
                 threads: int = 0) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(index row without 'row', (size, size, 3) uint8) per resampled frame of one video, streamed."""
    from abvid.pipeline.video import open_video

    vid = video_id(path)
    with open_video(path, fps=fps, short_side=size, backend=backend, threads=threads) as dec:
        for fr in dec:
            yield ({"video_id": vid, "source": path, "frame_index": fr.index, "pts_s": fr.pts_s},
                   center_square(fr.image, size))


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample of a WebDataset tar, read by the training loader's own stages.

    Strict (``tar_members(strict=True)``): a truncated archive raises, so the shard is reported
    failed, not half embedded.
    """
    from abvid.pipeline.source import group_samples, tar_members

    for sample in group_samples()(tar_members(strict=True)([path])):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def shard_frames(path: str, size: int) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Frames of every clip of one shard, in order; a frame met twice (overlapping clips) is yielded once."""
    from PIL import Image, UnidentifiedImageError

    from abvid.pipeline.loader import frames_of

    if "://" not in path and not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard file (check the path or pattern)")
    seen: set[tuple[str, int]] = set()
    try:
        for key, files in _tar_samples(path):
            if "json" not in files:
                raise ShardError(f"{path}: sample {key} has no .json; is this a shard written by `abvid preprocess`?")
            meta, members = json.loads(files["json"]), frames_of(files)
            for i, (fi, t) in enumerate(zip(meta["frame_indices"], meta["pts_s"])):
                if (meta["video_id"], fi) in seen:
                    continue
                seen.add((meta["video_id"], fi))
                if i not in members:
                    raise ShardError(f"{path}: sample {key} lacks frame {i:03d} (.jpg/.jpeg/.webp); "
                                     "re-run preprocessing")
                img = np.asarray(Image.open(io.BytesIO(members[i][1])).convert("RGB"))
                yield ({"video_id": meta["video_id"], "source": meta["source"], "frame_index": int(fi),
                        "pts_s": float(t)}, center_square(img, size))
    except (tarfile.TarError, EOFError, json.JSONDecodeError, KeyError, UnidentifiedImageError, OSError) as e:
        raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {e}); re-run preprocessing for it") from e


def batched(frames: Iterator[tuple[dict, np.ndarray]], batch_size: int) -> Iterator[tuple[list[dict], np.ndarray]]:
    """Group frames into (rows, (B, S, S, 3) uint8) batches; the last one may be smaller."""
    rows, imgs = [], []
    for row, img in frames:
        rows.append(row)
        imgs.append(img)
        if len(rows) == batch_size:
            yield rows, np.stack(imgs)
            rows, imgs = [], []
    if rows:
        yield rows, np.stack(imgs)


def prefetch(it: Iterator[T], depth: int, lower_priority: bool = False) -> Iterator[T]:
    """Run ``it`` in a background thread; items pass through a queue of ``depth``. Errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        if lower_priority:
            _lower_priority()
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, end))
        except BaseException as e:  # handed to the consumer, which re-raises it  # noqa: BLE001
            q.put((False, e))

    thread = threading.Thread(target=work, name="abvid-embed-decode", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():   # drain so a blocked put() sees the stop flag
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def unit_events(units: list[Unit], *, fps: float | None, size: int, batch_size: int, backend: str = "auto",
                threads: int = 0, pin_memory: bool = False) -> Iterator[tuple[str, Unit, Any]]:
    """("batch", unit, (rows, uint8 tensor (B, S, S, 3))), then ("done", unit, None) or ("failed", unit, why)."""
    from abvid.pipeline.video import VideoError

    for unit in units:
        frames = unit_frames(unit, fps, size, backend, threads)
        try:
            for rows, pixels in batched(frames, batch_size):
                x = torch.from_numpy(pixels)
                yield "batch", unit, (rows, x.pin_memory() if pin_memory else x)
        except (VideoError, ShardError) as e:
            yield "failed", unit, str(e)
            continue
        yield "done", unit, None


def unit_frames(unit: Unit, fps: float | None, size: int, backend: str = "auto",
                threads: int = 0) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """The frames of one unit (video or shard), streamed."""
    return video_frames(unit.path, fps, size, backend, threads) if unit.kind == "video" else shard_frames(unit.path, size)


class UnitStream(IterableDataset):
    """The decoder processes of ``workers=N``: each takes the next unit index from a shared counter.

    Yields ``{"i": unit index, "kind": "batch" | "done" | "failed", "rows", "pixels", "why"}``.
    """

    def __init__(self, units: list[Unit], counter, *, fps: float | None, size: int, batch_size: int,
                 backend: str, threads: int):
        self.units, self.counter = units, counter
        self.fps, self.size, self.batch_size, self.backend, self.threads = fps, size, batch_size, backend, threads

    def _next(self) -> int:
        with self.counter.get_lock():
            i = self.counter.value
            self.counter.value += 1
        return i

    def __iter__(self) -> Iterator[dict]:
        from abvid.pipeline.video import VideoError

        torch.set_num_threads(1)
        _lower_priority()
        empty = torch.empty(0, dtype=torch.uint8)
        while (i := self._next()) < len(self.units):
            frames = unit_frames(self.units[i], self.fps, self.size, self.backend, self.threads)
            try:
                for rows, pixels in batched(frames, self.batch_size):
                    yield {"i": i, "kind": "batch", "rows": rows, "pixels": torch.from_numpy(pixels), "why": ""}
            except (VideoError, ShardError) as e:
                yield {"i": i, "kind": "failed", "rows": [], "pixels": empty, "why": str(e)}
                continue
            yield {"i": i, "kind": "done", "rows": [], "pixels": empty, "why": ""}


def _lower_priority() -> None:
    """Raise the calling thread's nice value by DECODER_NICENESS (Linux; a no-op where not permitted)."""
    if sys.platform.startswith("linux") and DECODER_NICENESS:
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + DECODER_NICENESS))


def decode_events(units: list[Unit], *, workers: int, fps: float | None, size: int, batch_size: int,
                  backend: str = "auto", threads: int = 0, pin_memory: bool = False,
                  prefetch_batches: int = 4) -> Iterator[tuple[str, Unit, Any]]:
    """The events of ``units`` from ``workers`` decoders (1: a thread here; N > 1: N processes)."""
    if workers <= 1:
        yield from prefetch(unit_events(units, fps=fps, size=size, batch_size=batch_size, backend=backend,
                                        threads=threads, pin_memory=pin_memory), prefetch_batches,
                            lower_priority=True)
        return
    n = min(workers, len(units))
    if n == 0:
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    stream = UnitStream(units, ctx.Value("q", 0), fps=fps, size=size, batch_size=batch_size, backend=backend,
                        threads=threads or max(1, (os.cpu_count() or 1) // n))
    loader = DataLoader(stream, batch_size=None, num_workers=n, pin_memory=pin_memory, in_order=False,
                        prefetch_factor=max(2, prefetch_batches // n), multiprocessing_context=ctx)
    it = iter(loader)
    try:
        for ev in it:
            unit = units[int(ev["i"])]
            if ev["kind"] == "batch":
                yield "batch", unit, (ev["rows"], ev["pixels"])
            else:
                yield ev["kind"], unit, (ev["why"] or None)
    finally:
        del it   # shuts the decoder processes down, also when the consumer stops early
