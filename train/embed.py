"""Per-frame embeddings of videos or shards: ``embeddings.npy`` (N, D) + ``index.csv``, resumable.

    abvid embed --checkpoint encoder.safetensors videos/ --out emb/ --fps 4 --size 224

Inputs are video files, folders, globs and list files (expanded by
pipeline/inputs.py, decoded by pipeline/video.py: streaming, so memory stays
flat in video length) or shards (``.tar`` files, or folders holding them;
frames from each clip's JPEGs, labelled by the clip JSON's ``frame_indices`` /
``pts_s``). Every frame is resized to short side ``size`` and centre-cropped to
``size x size`` (the DINO evaluation transform, without the 256->224 margin).

Work units and resume: one unit is one video file or one shard. A unit's
embeddings go to ``OUT/parts/<name>.f32`` (raw float32 rows) and
``<name>.csv``, written under temp names and renamed; ``<name>.done.json``
is written last and marks the unit complete. A rerun skips complete units
(a killed run loses at most the units in flight) and, as ``abvid preprocess`` does, units
that failed before (``<name>.failed.json``, reported ``failed`` with the earlier reason)
unless ``retry_failed``.
``OUT/parts/settings.json`` pins the encoder fingerprint, fps and size: a
rerun with other settings into the same folder is refused (use --overwrite),
and so is a second run while one holds the folder's lock (``OUT/parts/.lock``).
At the end the parts of the current inputs are merged, in input order, into
``embeddings.npy`` (float32 or float16; ``np.lib.format.open_memmap`` on a
temp name, then rename) and ``index.csv`` (``row,video_id,source,frame_index,
pts_s``), plus ``embeddings.parquet`` when pyarrow is installed.
``report.jsonl`` has one row per input: status ok | cached | failed | skipped.

Throughput: decoding runs in a background thread feeding a bounded queue while
the encoder runs in the caller's thread (PyAV decoding and torch matmuls both
release the GIL), so the job approaches the slower of the two
(``abvid bench embed`` measures it). Batches never span two units, so a
video's vectors do not depend on what else is embedded with it. On CUDA the
encoder runs under bf16 autocast; on CPU in float32.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn

from abvid.pipeline.preprocess import video_id   # the shard key's video_id, so both inputs name videos alike
from abvid.train.embed_store import PartWriter, StoreError, done_part, failed_part, merge_parts, write_text

T = TypeVar("T")


class EmbedError(RuntimeError):
    """The embedding job cannot run (settings clash with an existing output folder, no input...)."""


class ShardError(RuntimeError):
    """A shard cannot be read (truncated tar, bad JSON, missing frame); names the file."""


@dataclass(frozen=True)
class Unit:
    kind: str          # "video" | "shard"
    path: str          # absolute path
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
            if "://" in path:
                raise EmbedError(f"shard {path}: embed reads local shards only; copy it locally first")
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

    if not os.path.isfile(path):
        raise ShardError(f"{path}: no such shard file (check the path or pattern)")
    seen: set[tuple[str, int]] = set()
    try:
        for key, files in _tar_samples(path):
            if "json" not in files:
                raise ShardError(f"{path}: sample {key} has no .json; is this a shard written by `abvid preprocess`?")
            meta = json.loads(files["json"])
            for i, (fi, t) in enumerate(zip(meta["frame_indices"], meta["pts_s"])):
                if (meta["video_id"], fi) in seen:
                    continue
                seen.add((meta["video_id"], fi))
                data = files.get(f"{i:03d}.jpg") or files.get(f"{i:03d}.webp")
                if data is None:
                    raise ShardError(f"{path}: sample {key} lacks frame {i:03d} (.jpg/.webp); re-run preprocessing")
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
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


def prefetch(it: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``it`` in a background thread; items pass through a queue of ``depth``. Errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
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
        frames = (video_frames(unit.path, fps, size, backend, threads) if unit.kind == "video"
                  else shard_frames(unit.path, size))
        try:
            for rows, pixels in batched(frames, batch_size):
                x = torch.from_numpy(pixels)
                yield "batch", unit, (rows, x.pin_memory() if pin_memory else x)
        except (VideoError, ShardError) as e:
            yield "failed", unit, str(e)
            continue
        yield "done", unit, None


# ----------------------------------------------------------------------------- model

def encode(encoder: nn.Module, pixels: torch.Tensor, device: torch.device) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, D) numpy; bf16 autocast on CUDA."""
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)       # (B, 3, S, S) uint8
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z = encoder.embed(x)
    return z.float().cpu().numpy()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Identifies the weights, not the file: sha1 over each tensor's name, shape, sum and ~4k strided values.

    Cheap for any model size (no full copy to the host), and any retraining changes it.
    """
    h = hashlib.sha1()
    with torch.no_grad():
        for k, v in encoder.state_dict().items():
            flat = v.detach().reshape(-1).float()
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(f"{k}{tuple(v.shape)}{float(flat.double().sum())!r}".encode())
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the job

def _lock(work: Path):
    """Exclusive lock on the work folder (released by the OS even on SIGKILL); two runs cannot share an --out."""
    import fcntl

    f = open(work / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise EmbedError(f"{work.parent}: another `abvid embed` run is writing here; wait for it or use "
                         "another --out") from None
    return f


def _prepare_work(out: Path, settings: dict, overwrite: bool) -> Path:
    work = out / "parts"
    if overwrite and work.exists():
        for p in work.iterdir():
            if p.name != ".lock":
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    sfile = work / "settings.json"
    if sfile.exists():
        old = json.loads(sfile.read_text())
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise EmbedError(f"{out} holds embeddings made with other settings {diff} (old, new); "
                             "pass a new --out, or --overwrite to start over")
    else:
        write_text(sfile, json.dumps(settings, sort_keys=True) + "\n")
    return work


def embed_inputs(inputs: list[str], out: str | Path, encoder: nn.Module, *, fps: float | None = 4.0, size: int = 224,
                 batch_size: int = 64, device: str | torch.device = "cpu", dtype: str = "float32",
                 backend: str = "auto", threads: int = 0, prefetch_batches: int = 4, overwrite: bool = False,
                 retry_failed: bool = False, progress: bool = True, on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
    """Embed every frame of ``inputs`` into ``out``; returns one result per input unit (in input order)."""
    if dtype not in ("float32", "float16"):
        raise EmbedError(f"dtype must be float32 or float16, got '{dtype}'")
    out, device = Path(out), torch.device(device)
    units = expand_units(inputs)
    if not units:
        raise EmbedError(f"no input found in {inputs}; pass video files, folders, list files or shards")
    encoder = encoder.to(device).eval()
    settings = {"encoder": encoder_fingerprint(encoder), "fps": fps, "size": size}
    (out / "parts").mkdir(parents=True, exist_ok=True)
    with _lock(out / "parts"):
        return _run(units, out, _prepare_work(out, settings, overwrite), encoder, fps=fps, size=size,
                    batch_size=batch_size, device=device, dtype=dtype, backend=backend, threads=threads,
                    prefetch_batches=prefetch_batches, retry_failed=retry_failed, progress=progress,
                    on_result=on_result)


def _run(units: list[Unit], out: Path, work: Path, encoder: nn.Module, *, fps: float | None, size: int,
         batch_size: int, device: torch.device, dtype: str, backend: str, threads: int, prefetch_batches: int,
         retry_failed: bool, progress: bool, on_result: Callable[[UnitResult], None] | None) -> list[UnitResult]:
    """The job body of ``embed_inputs``, run under the folder lock."""
    results: list[UnitResult | None] = [None] * len(units)
    position = {id(u): i for i, u in enumerate(units)}   # duplicates share a path, so key by object
    todo = []
    for i, u in enumerate(units):
        if u.skip_reason:
            results[i] = UnitResult(u.origin, u.kind, u.name, "skipped", error=u.skip_reason)
        elif (d := done_part(work, u.name)) is not None:
            results[i] = UnitResult(u.path, u.kind, u.name, "cached", frames=d["rows"])
        elif not retry_failed and (why := failed_part(work, u.name)) is not None:
            results[i] = UnitResult(u.path, u.kind, u.name, "failed",
                                    error=f"{why} [failed in an earlier run; --retry-failed tries again]")
        else:
            todo.append(u)
    from tqdm import tqdm
    bar = tqdm(total=len(units), initial=len(units) - len(todo), unit="input", disable=not progress,
               desc="embed", dynamic_ncols=True)
    writers: dict[str, PartWriter] = {}
    started: dict[str, float] = {}
    frames, t0 = 0, time.perf_counter()
    events = prefetch(unit_events(todo, fps=fps, size=size, batch_size=batch_size, backend=backend,
                                  threads=threads, pin_memory=device.type == "cuda"), prefetch_batches)
    try:
        for kind, unit, payload in events:
            started.setdefault(unit.path, time.perf_counter())
            if kind == "batch":
                rows, pixels = payload
                w = writers.get(unit.path) or writers.setdefault(unit.path, PartWriter(work, unit.name, unit.path))
                w.append(encode(encoder, pixels, device), rows)
                frames += len(rows)
                bar.set_postfix(frames=frames, fps=f"{frames / (time.perf_counter() - t0):.1f}")
                continue
            w = writers.pop(unit.path, None) or PartWriter(work, unit.name, unit.path)
            seconds = time.perf_counter() - started[unit.path]
            if kind == "done":
                w.commit()
                res = UnitResult(unit.path, unit.kind, unit.name, "ok", frames=len(w.rows), seconds=seconds)
            else:
                w.fail(str(payload))
                res = UnitResult(unit.path, unit.kind, unit.name, "failed", error=str(payload), seconds=seconds)
            results[position[id(unit)]] = res
            if on_result is not None:
                on_result(res)
            bar.update(1)
    finally:
        events.close()   # stops the decode thread now, also on an error or Ctrl-C
        bar.close()
        for w in writers.values():   # interrupted mid-unit: its temp file goes, done parts stay
            w.abort()
    ordered = [r for r in results if r is not None]
    write_text(out / "report.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in ordered))
    names = [r.name for r in ordered if r.status in ("ok", "cached")]
    if names:
        try:
            merge_parts(out, work, names, dtype)
        except StoreError as e:
            raise EmbedError(str(e)) from e
    else:   # outputs always describe the current inputs: no stale file of an earlier run stays beside the report
        for stale in ("embeddings.npy", "index.csv", "embeddings.parquet"):
            (out / stale).unlink(missing_ok=True)
    return ordered
