"""Per-frame embeddings of videos or shards: ``embeddings.npy`` (N, D) + ``index.csv`` (+ parquet), resumable.

    abvid embed --checkpoint encoder.safetensors videos/ --out emb/ --fps 4 --size 224 [--workers 8]

Inputs are video files, folders, globs and list files (expanded by
pipeline/inputs.py, decoded by pipeline/video.py: streaming, so memory stays
flat in video length) or shards (``.tar`` files, or folders holding them;
frames from each clip's JPEGs, labelled by the clip JSON's ``frame_indices`` /
``pts_s``). Every frame is resized to short side ``size`` and centre-cropped to
``size x size`` (the DINO evaluation transform, without the 256->224 margin).
Units, frames and decoders: ``embed_sources.py``.

Vectors (``pool``): ``cls`` the CLS token after the final norm (``encoder.embed``), ``mean``
the mean of the patch tokens after the final norm, ``cls+mean`` both concatenated (2D);
``normalize`` scales each row to unit L2 norm (cosine similarity = dot product).

Executors: ``local`` decodes with ``workers`` decoders (1: a thread of this process; N: N
processes) feeding one encoder here; ``ray`` (``embed_ray.py``) is a Ray Data pipeline: decoding
in CPU tasks across the cluster, the encoder in actors (one GPU each on CUDA). Either way the
rows reach this process per unit, in each unit's order, and are written here.

Work units and resume: one unit is one video file or one shard. A unit's
embeddings go to ``OUT/parts/<name>.f32`` (raw float32 rows) and
``<name>.csv``, written under temp names and renamed; ``<name>.done.json``
is written last and marks the unit complete. A rerun skips complete units
(a killed run loses at most the units in flight) and, as ``abvid preprocess`` does, units
that failed before (``<name>.failed.json``, reported ``failed`` with the earlier reason)
unless ``retry_failed``.
``OUT/parts/settings.json`` pins the encoder fingerprint, fps, size (and pool/normalize when
not the defaults): a rerun with other settings into the same folder is refused (use --overwrite),
and so is a second run while one holds the folder's lock (``OUT/parts/.lock``).
At the end the parts of the current inputs are merged, in input order, into
``embeddings.npy`` (float32 or float16; ``np.lib.format.open_memmap`` on a
temp name, then rename), ``index.csv`` (``row,video_id,source,frame_index,
pts_s``) and ``embeddings.parquet``; with ``faiss`` also ``embeddings.faiss``
(``embed_store.write_faiss``). ``report.jsonl`` has one row per input: status
ok | cached | failed | skipped.

Throughput: decoders run beside the encoder (threads or processes), so the job approaches the
slower of the two (``abvid bench embed`` measures it). Batches never span two units, so a
video's vectors do not depend on what else is embedded with it. On CUDA the
encoder runs under bf16 autocast; on CPU in float32.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from abvid.pipeline.errors import JobError, UsageError
from abvid.train.embed_sources import (EmbedError, ShardError, Unit, UnitResult, batched,  # noqa: F401 (re-exported)
                                       center_square, decode_events, expand_units, prefetch, shard_frames,
                                       unit_events, video_frames)
from abvid.train.embed_store import PartWriter, StoreError, done_part, failed_part, merge_parts, write_faiss, write_text

POOLS = ("cls", "mean", "cls+mean")
EXECUTORS = ("local", "ray")


# ----------------------------------------------------------------------------- model

def encode(encoder: nn.Module, pixels: torch.Tensor, device: torch.device, pool: str = "cls",
           normalize: bool = False) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, D) numpy (2D for ``cls+mean``); bf16 autocast on CUDA."""
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)       # (B, 3, S, S) uint8
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if pool == "cls":
            z = encoder.embed(x)
        else:
            tokens = encoder.forward_features(x)                        # (B, 1 + N, D), after the final norm
            mean = tokens[:, 1:].mean(1)
            z = mean if pool == "mean" else torch.cat([tokens[:, 0], mean], -1)
        z = z.float()
        if normalize:
            z = torch.nn.functional.normalize(z, dim=-1)
    return z.cpu().numpy()


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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device that is not there is a ``UsageError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
        if device.index is not None and device.index >= n:
            raise UsageError(f"--device {name}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1}); pick one of those")
    return device


def check_size(encoder: nn.Module, size: int) -> None:
    """The encoder takes ``size x size`` only when ``size`` is a multiple of its patch size."""
    patch = int(getattr(encoder, "patch_size", 0) or getattr(encoder, "encoder_kwargs", {}).get("patch_size", 0) or 1)
    if size < patch or size % patch:
        lo, hi = size // patch * patch, (size // patch + 1) * patch
        raise UsageError(f"--size {size} is not a multiple of the encoder's patch size {patch}; use "
                         + (f"{lo} or {hi}" if lo else f"{hi}"))


# ----------------------------------------------------------------------------- the job

def _lock(work: Path):
    """Exclusive lock on the work folder (released by the OS even on SIGKILL); two runs cannot share an --out."""
    import fcntl

    f = open(work / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise JobError(f"{work.parent}: another `abvid embed` run is writing here; wait for it or use "
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
            diff = {k: (old.get(k), v) for k, v in settings.items() | old.items() if old.get(k) != settings.get(k)}
            raise EmbedError(f"{out} holds embeddings made with other settings {diff} (old, new); "
                             "pass a new --out, or --overwrite to start over")
    else:
        write_text(sfile, json.dumps(settings, sort_keys=True) + "\n")
    return work


def embed_inputs(inputs: list[str], out: str | Path, encoder: nn.Module, *, fps: float | None = 4.0, size: int = 224,
                 batch_size: int = 64, device: str | torch.device = "cpu", dtype: str = "float32",
                 backend: str = "auto", threads: int = 0, workers: int = 1, executor: str = "local",
                 ray_address: str = "", pool: str = "cls", normalize: bool = False, faiss: bool = False,
                 prefetch_batches: int = 4, overwrite: bool = False, retry_failed: bool = False,
                 progress: bool = True, on_result: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
    """Embed every frame of ``inputs`` into ``out``; returns one result per input unit (in input order).

    Raises ``UsageError`` (``EmbedError``) for settings that cannot work, before writing anything.
    """
    problems = [f"{k}={v!r} must be one of {allowed}" for k, v, allowed in
                (("dtype", dtype, ("float32", "float16")), ("pool", pool, POOLS), ("executor", executor, EXECUTORS))
                if v not in allowed]
    if batch_size < 1 or workers < 1:
        problems.append(f"batch_size={batch_size} and workers={workers} must be >= 1")
    if problems:
        raise EmbedError("; ".join(problems))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} is a file, not a folder; pass a folder (created if missing)")
    device = resolve_device(str(device))
    check_size(encoder, size)
    if faiss:
        try:
            import faiss as _  # noqa: F401
        except ImportError:
            raise EmbedError("--faiss needs faiss: pip install 'abvid[faiss]' (or pip install faiss-cpu)") from None
    units = expand_units(inputs)
    if not units:
        raise EmbedError(f"no input found in {inputs}; pass video files, folders, list files or shards")
    cluster = None
    if executor == "ray":
        from abvid.pipeline.ray_preprocess import connect
        cluster = connect(ray_address)   # an address that does not answer: UsageError, before any output
    encoder = encoder.to(device).eval()
    settings = {"encoder": encoder_fingerprint(encoder), "fps": fps, "size": size}
    settings |= ({"pool": pool} if pool != "cls" else {}) | ({"normalize": True} if normalize else {})
    (out / "parts").mkdir(parents=True, exist_ok=True)
    try:
        with _lock(out / "parts"):
            results = _run(units, out, _prepare_work(out, settings, overwrite), encoder, fps=fps, size=size,
                           batch_size=batch_size, device=device, dtype=dtype, backend=backend, threads=threads,
                           workers=workers, cluster=cluster, pool=pool, normalize=normalize,
                           prefetch_batches=prefetch_batches, retry_failed=retry_failed, progress=progress,
                           on_result=on_result)
    finally:
        if cluster is not None:
            cluster.close()
    if faiss and (out / "embeddings.npy").exists():
        write_faiss(out, metric="ip" if normalize else "l2")
    return results


def _run(units: list[Unit], out: Path, work: Path, encoder: nn.Module, *, fps: float | None, size: int,
         batch_size: int, device: torch.device, dtype: str, backend: str, threads: int, workers: int, cluster,
         pool: str, normalize: bool, prefetch_batches: int, retry_failed: bool, progress: bool,
         on_result: Callable[[UnitResult], None] | None) -> list[UnitResult]:
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
    if cluster is not None:
        from abvid.train.embed_ray import ray_events
        events = ray_events(cluster, todo, encoder, fps=fps, size=size, batch_size=batch_size, backend=backend,
                            device=device.type, pool=pool, normalize=normalize, workers=workers)
    else:
        events = decode_events(todo, workers=workers, fps=fps, size=size, batch_size=batch_size, backend=backend,
                               threads=threads, pin_memory=device.type == "cuda", prefetch_batches=prefetch_batches)
    try:
        for kind, unit, payload in events:
            started.setdefault(unit.path, time.perf_counter())
            if kind in ("batch", "emb"):   # pixels to encode here, or vectors made by the Ray pipeline
                rows, data = payload
                emb = data if kind == "emb" else encode(encoder, data, device, pool, normalize)
                w = writers.get(unit.path) or writers.setdefault(unit.path, PartWriter(work, unit.name, unit.path))
                w.append(emb, rows)
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
    (out / "embeddings.faiss").unlink(missing_ok=True)   # written again (for these rows) when asked for
    if names:
        try:
            merge_parts(out, work, names, dtype)
        except StoreError as e:
            raise EmbedError(str(e)) from e
    else:   # outputs always describe the current inputs: no stale file of an earlier run stays beside the report
        for stale in ("embeddings.npy", "index.csv", "embeddings.parquet", "embeddings.faiss"):
            (out / stale).unlink(missing_ok=True)
    return ordered
