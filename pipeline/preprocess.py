"""Preprocess a video corpus into WebDataset shards (library; the CLI is ``abvid preprocess``).

    stats = run_preprocess(["videos/"], "shards/", PreprocessConfig(fps=4, size=256))

Flow: expand inputs (``inputs.py``) -> skip videos the manifest already has ``ok`` ->
decode each video in an isolated worker process (``isolation.IsolatedPool``) that writes its
encoded clips to a spool file -> the parent copies spools, in input order, into
atomic shards (``shardwriter.py``) and records one manifest row per input (row fields,
file names per prefix and run stats: ``manifest.py``).

Isolation: a worker that segfaults (exit by signal) or exceeds ``timeout_s`` on one
video is killed and replaced; that video is ``failed`` with the reason and the run
goes on. Processes are started with ``forkserver`` (safe when torch or threads live
in the parent; a fork from the warm server costs a few ms, a ``spawn`` ~0.5 s).

Determinism: keys are ``<video_id>-<clip:06d>`` with ``video_id`` = sanitized stem +
``_`` + 8 hex of sha1(absolute path); member bytes are deterministic, and results are
committed in input order, so an uninterrupted run always writes the same shards. A
resumed run writes the same keys and bytes; only the packing into shards may differ.

Fault injection (tests): ``PreprocessConfig.decode_hook = "module:function"`` names
a function called as ``fn(path)`` in the worker before each video is opened, e.g.
to hang or to ``os.kill(os.getpid(), SIGSEGV)``; ``tests/_faults.py`` has such hooks.
The CLI exposes it as the hidden flag ``--decode-hook``.

Library use: workers re-import the ``__main__`` module (as with ``spawn``), so a script
calling ``run_preprocess`` needs the ``if __name__ == "__main__":`` guard, and a heavy
main module (one importing torch: ~3 s) slows every worker start; the CLI's is light
(measured: first worker 0.44 s, later ones ~0.02 s + the video; ``spawn`` 0.4-0.6 s each).
"""
from __future__ import annotations

import fcntl
import functools
import importlib
import io
import json
import os
import re
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from abvid.pipeline import shardwriter
from abvid.pipeline.annotations import load_annotations, overlapping
from abvid.pipeline.inputs import VIDEO_EXTENSIONS, expand_inputs, slice_inputs
from abvid.pipeline.isolation import IsolatedPool
from abvid.pipeline.manifest import (ROW_FIELDS, Manifest, Stats, in_input_order, manifest_row, run_files, run_stats,
                                     video_id, write_json)
from abvid.pipeline.shardwriter import SpoolWriter

FORMATS = ("jpg", "webp")


class UsageError(ValueError):
    """Bad settings or nothing to do (CLI exit code 2); the message says what to change."""


class JobError(RuntimeError):
    """The job cannot run at all, e.g. the output folder is locked by another run (exit code 3)."""


@dataclass(frozen=True)
class PreprocessConfig:
    fps: float | None = 4.0          # target frame rate; None keeps every source frame
    size: int | None = 256           # short side in pixels; None keeps the source size
    clip_len: int = 16               # frames per sample
    clip_stride: int = 0             # resampled frames between clip starts; 0 = clip_len
    format: str = "jpg"              # jpg | webp
    quality: int = 90                # JPEG/WebP quality; webp with 100 = lossless
    shard_clips: int = 0             # close a shard at this many clips (0 = no limit)
    shard_bytes: int = 256_000_000   # ... or at this many bytes (0 = no limit)
    workers: int = 0                 # worker processes; 0 = one per core
    threads: int = 0                 # decoder threads per worker; 0 = cores // workers
    backend: str = "auto"            # auto | pyav | decord
    annotations: str | None = None   # CSV/JSONL side file joined into each clip's JSON
    slice_index: int = 0             # --slice I/N (0-based)
    slice_count: int = 1
    retry_failed: bool = False       # decode inputs the manifest lists as failed again
    timeout_s: float = 1800.0        # per video; 0 = none
    prefix: str = ""                 # shard name prefix; "" = shard (shard-I-of-N with a slice)
    decode_hook: str = ""            # "module:function" called with the path before each video (tests)

    @property
    def stride(self) -> int:
        return self.clip_stride or self.clip_len

    @property
    def shard_prefix(self) -> str:
        if self.prefix:
            return self.prefix
        return "shard" if self.slice_count == 1 else f"shard-{self.slice_index}-of-{self.slice_count}"

    def check(self) -> None:
        problems = []
        if self.fps is not None and not self.fps > 0:
            problems.append(f"fps={self.fps} must be > 0 (or None/0 to keep every frame)")
        if self.size is not None and self.size < 8:
            problems.append(f"size={self.size} must be >= 8 pixels")
        if self.clip_len < 1 or self.clip_stride < 0:
            problems.append(f"clip_len={self.clip_len} must be >= 1 and clip_stride={self.clip_stride} >= 0")
        if self.format not in FORMATS:
            problems.append(f"format={self.format!r} must be one of {FORMATS}")
        if not 1 <= self.quality <= 100:
            problems.append(f"quality={self.quality} must be in 1..100")
        if self.shard_clips < 0 or self.shard_bytes < 0 or self.workers < 0 or self.timeout_s < 0:
            problems.append("shard_clips, shard_bytes, workers and timeout_s must be >= 0")
        if self.backend not in ("auto", "pyav", "decord"):
            problems.append(f"backend={self.backend!r} must be auto, pyav or decord")
        if not 0 <= self.slice_index < self.slice_count:
            problems.append(f"slice {self.slice_index}/{self.slice_count}: need 0 <= I < N")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", self.shard_prefix):
            problems.append(f"prefix={self.shard_prefix!r}: use letters, digits, '_' and '-' only")
        if self.decode_hook and ":" not in self.decode_hook:
            problems.append(f"decode_hook={self.decode_hook!r} must look like module:function")
        if problems:
            raise UsageError("; ".join(problems))

    def output_settings(self) -> dict:
        """The settings that change the bytes written (a resume must use the same)."""
        return {k: getattr(self, k) for k in ("fps", "size", "clip_len", "format", "quality", "backend")} | {
            "clip_stride": self.stride, "annotations": self.annotations}


# ------------------------------------------------------------------ worker side

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


def process_video(task: dict, cfg: PreprocessConfig, threads: int) -> dict:
    """Decode ``task["path"]``, write its clips to ``task["spool"]``; returns manifest fields (runs in a worker)."""
    from abvid.pipeline.video import VideoError, open_video

    path, vid, spool, annotations = task["path"], task["video_id"], task["spool"], task["annotations"]
    t_start = time.perf_counter()
    row: dict = {"frames": 0, "clips": 0, "tail_frames": 0, "decode_errors": 0, "source_frames": 0}
    try:
        if cfg.decode_hook:
            _resolve_hook(cfg.decode_hook)(path)
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
        row.update(status="ok", error="")
    except VideoError as e:
        row.update(status="failed", error=str(e), reason="decode error")
    except Exception as e:  # noqa: BLE001 - the isolation boundary: any failure fails this video only
        row.update(status="failed", error=f"{path}: {type(e).__name__}: {e}", reason=f"error ({type(e).__name__})")
    row["seconds"] = round(time.perf_counter() - t_start, 3)
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def _resolve_hook(spec: str):
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


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) from /proc; 0 where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------ parent side

def run_preprocess(inputs: list[str], out_dir: str | Path, cfg: PreprocessConfig, progress: bool = True) -> Stats:
    """Preprocess ``inputs`` (files, folders, globs, list files) into shards under ``out_dir``; resumable.

    Raises ``UsageError`` (bad settings, nothing to do), ``InputError`` / ``AnnotationError``
    (unreadable list or annotation file) and ``JobError`` (output folder locked by another run).
    """
    cfg.check()
    if cfg.decode_hook:
        _resolve_hook(cfg.decode_hook)   # fail once, here, rather than once per video in the workers
    t_start = time.perf_counter()
    items = expand_inputs(list(inputs))
    if not items:
        raise UsageError(f"nothing to do: {list(inputs)} name no video file (folders are searched "
                         f"recursively for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    items = slice_inputs(items, cfg.slice_index, cfg.slice_count)
    ann = load_annotations(cfg.annotations) if cfg.annotations else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = cfg.shard_prefix
    manifest_name, stats_name, settings_name = run_files(prefix)
    lock = _lock(out / f".{prefix}.lock")
    try:
        _check_settings(out / settings_name, cfg)
        manifest = Manifest(out / manifest_name)
        rows, next_index = shardwriter.recover(out, prefix, manifest)
        rows = {p: r for p, r in rows.items() if r.get("status") != "skipped"}  # skips are redone below
        manifest.rewrite(in_input_order(items, rows, []))  # compact: one row per path, torn lines gone
        spool_dir = out / f".spool-{prefix}"
        shutil.rmtree(spool_dir, ignore_errors=True)
        spool_dir.mkdir()

        skipped, todo, resumed = [], [], 0
        for it in items:
            prev = rows.get(it.path)
            if it.skip_reason:
                skipped.append(manifest_row(it.path, status="skipped", error=it.skip_reason))
            elif prev and (prev["status"] == "ok" or (prev["status"] == "failed" and not cfg.retry_failed)):
                resumed += prev["status"] == "ok"
            elif not os.path.exists(it.path):
                rows[it.path] = manifest_row(it.path, status="failed", reason="not found",
                                             error=f"{it.path}: no such file (from {it.origin}); check the path")
                manifest.append([rows[it.path]])
            else:
                todo.append(it)
        manifest.append(skipped)

        n_workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(todo)))
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // n_workers)
        writer = shardwriter.ShardWriter(out, prefix, manifest, next_index, cfg.shard_clips, cfg.shard_bytes)
        tasks = [{"seq": i, "path": it.path, "video_id": video_id(it.path), "spool": str(spool_dir / f"{i}.spool"),
                  "annotations": ann.for_video(it.path) if ann else []} for i, it in enumerate(todo)]
        source_frames = _decode_all(tasks, cfg, n_workers, threads, writer, manifest, rows, progress)
        writer.close()
        shutil.rmtree(spool_dir, ignore_errors=True)
        final = in_input_order(items, rows, skipped)
        manifest.rewrite(final)
        stats = run_stats(items, final, resumed, source_frames, writer.completed, writer.bytes_written,
                          time.perf_counter() - t_start)
        stats.manifest = str(manifest.path)
        stats.peak_rss_mb = {"parent": _peak_rss_mb(),
                             "worker": max((r.get("peak_rss_mb", 0.0) for r in final), default=0.0)}
        write_json(out / stats_name, stats.to_json() | {"settings": cfg.output_settings(),
                                                         "config": asdict(cfg), "workers": n_workers})
        return stats
    finally:
        lock.close()


def _decode_all(tasks: list[dict], cfg: PreprocessConfig, n_workers: int, threads: int, writer, manifest,
                rows: dict[str, dict], progress: bool) -> int:
    """Run the worker pool; commit results in input order (deterministic shard layout); returns frames decoded."""
    if not tasks:
        return 0
    from tqdm import tqdm

    done: dict[int, dict] = {}
    state = {"started": 0, "next": 0, "source_frames": 0, "failed": 0}
    window = 4 * n_workers  # spool files waiting for an earlier, slower video

    def feed():
        for t in tasks:
            state["started"] += 1
            yield t

    pool = IsolatedPool(process_video, (cfg, threads), n=n_workers, timeout_s=cfg.timeout_s,
                        preload=["abvid.pipeline.preprocess", "abvid.pipeline.video", "PIL.Image"])
    t0 = time.perf_counter()
    with tqdm(total=len(tasks), unit="video", disable=not progress, dynamic_ncols=True) as bar:
        for res in pool.run(feed(), may_start=lambda: state["started"] < state["next"] + window):
            done[res["seq"]] = res
            state["source_frames"] += res.get("source_frames", 0)
            state["failed"] += res["status"] == "failed"
            bar.update(1)
            bar.set_postfix(frames_per_s=f"{state['source_frames'] / (time.perf_counter() - t0):.0f}",
                            failed=state["failed"])
            while state["next"] in done:
                res = done.pop(state["next"])
                state["next"] += 1
                row = manifest_row(res["path"], **{k: v for k, v in res.items() if k in ROW_FIELDS})
                if row["status"] == "ok" and row["clips"] > 0:
                    row = {**row, "shards": [writer.append(res["spool"], row["clips"], row)]}
                else:
                    manifest.append([row])
                rows[row["path"]] = row
                if os.path.exists(res["spool"]):
                    os.unlink(res["spool"])
    return state["source_frames"]


def _lock(path: Path):
    """Exclusive lock on the output prefix (released by the OS even on SIGKILL)."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise JobError(f"{path.parent}: another preprocess run is writing prefix {path.stem[1:-5]!r} "
                       f"(lock {path}); wait for it, or use another --out or --prefix") from None
    return f


def _check_settings(path: Path, cfg: PreprocessConfig) -> None:
    """A resume must write the same bytes: refuse other output settings for the same folder/prefix."""
    settings = json.loads(json.dumps(cfg.output_settings() | {
        "annotations": os.path.abspath(cfg.annotations) if cfg.annotations else None}))
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise UsageError(f"{path.parent} holds shards written with other settings ({what}); use the same "
                             f"options to resume, or a new --out / --prefix (settings in {path})")
    write_json(path, settings)
