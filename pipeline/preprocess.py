"""Preprocess a video corpus into WebDataset shards (library; the CLI is ``abvid preprocess``).

    stats = run_preprocess(["videos/"], "shards/", PreprocessConfig(fps=4, size=256))

Flow: expand inputs (``inputs.py``) -> skip videos the manifest already has ``ok`` ->
decode each video in an isolated worker process (``isolation.IsolatedPool`` running
``clips.process_video``) that writes its encoded clips to a spool file -> the parent copies
spools, in input order, into atomic shards (``shardwriter.py``) and records one manifest row per input (row fields,
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

Executors: ``executor="local"`` runs the pool above on this machine; ``executor="ray"``
(``pipeline/ray_preprocess.py``) runs the same ``process_video`` with the same isolation on
the workers of a Ray cluster, each writing its own shard sub-prefix; both read and write the
same manifest, so either resumes the other's work. The work list streams in either way
(``inputs.iter_inputs``): a list file is read as tasks are started.

Videos shorter than one clip are ``skipped`` (reason ``too short``) and, like ``ok``, not
decoded again on a rerun (the settings are pinned, so the answer cannot change).

Library use: workers re-import the ``__main__`` module (as with ``spawn``), so a script
calling ``run_preprocess`` needs the ``if __name__ == "__main__":`` guard, and a heavy
main module (one importing torch: ~3 s) slows every worker start; the CLI's is light
(measured: first worker 0.44 s, later ones ~0.02 s + the video; ``spawn`` 0.4-0.6 s each).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from abvid.pipeline import shardwriter
from abvid.pipeline.annotations import load_annotations
from abvid.pipeline.clips import encode_image, peak_rss_mb, process_video, resolve_hook  # noqa: F401 (re-exported)
from abvid.pipeline.errors import JobError, UsageError
from abvid.pipeline.inputs import VIDEO_EXTENSIONS, InputItem, iter_inputs, iter_slice, missing_inputs
from abvid.pipeline.isolation import IsolatedPool
from abvid.pipeline.manifest import (ROW_FIELDS, TOO_SHORT, Manifest, Stats, in_input_order, manifest_row,
                                     run_files, run_stats, video_id, write_json)

FORMATS = ("jpg", "webp")
EXECUTORS = ("local", "ray")
PRELOAD = ["abvid.pipeline.preprocess", "abvid.pipeline.clips", "abvid.pipeline.video", "PIL.Image"]  # forkserver


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
    executor: str = "local"          # local (worker processes here) | ray (tasks on a Ray cluster)
    ray_address: str = ""            # Ray cluster to join ("" = RAY_ADDRESS or a local one; "auto"; host:port)
    retries: int = 2                 # ray: times a video is retried after its worker (process or node) is lost

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
        if self.executor not in EXECUTORS:
            problems.append(f"executor={self.executor!r} must be one of {EXECUTORS}")
        if self.retries < 0:
            problems.append(f"retries={self.retries} must be >= 0")
        if self.ray_address and self.executor != "ray":
            problems.append("ray_address is set but executor is not ray; add --executor ray")
        if problems:
            raise UsageError("; ".join(problems))

    def output_settings(self) -> dict:
        """The settings that change the bytes written (a resume must use the same)."""
        return {k: getattr(self, k) for k in ("fps", "size", "clip_len", "format", "quality", "backend")} | {
            "clip_stride": self.stride, "annotations": self.annotations}


# ------------------------------------------------------------------ parent side

def run_preprocess(inputs: list[str], out_dir: str | Path, cfg: PreprocessConfig, progress: bool = True) -> Stats:
    """Preprocess ``inputs`` (files, folders, globs, list files) into shards under ``out_dir``; resumable.

    Raises ``UsageError`` (bad settings, a named input that does not exist, nothing to do, ``out_dir``
    a file, a Ray cluster that does not answer), ``InputError`` / ``AnnotationError`` (unreadable list
    or annotation file) and ``JobError`` (output folder locked by another run). Nothing is created
    before the inputs and settings are checked.
    """
    cfg.check()
    if cfg.decode_hook:
        resolve_hook(cfg.decode_hook)   # fail once, here, rather than once per video in the workers
    t_start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; pass a folder (created if missing)")
    if missing := missing_inputs(list(inputs)):
        raise UsageError(f"input {', '.join(missing)}: no such file or folder; check the path")

    def items() -> Iterator[InputItem]:   # streamed anew for each pass: a long list is never held at once
        return iter_slice(iter_inputs(list(inputs)), cfg.slice_index, cfg.slice_count)

    if next(iter_inputs(list(inputs)), None) is None:   # (a slice of a job array may be empty: that is fine)
        raise UsageError(f"nothing to do: {list(inputs)} name no video file (folders are searched "
                         f"recursively for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    total = sum(1 for _ in items())
    ann = load_annotations(cfg.annotations) if cfg.annotations else None
    cluster = None
    if cfg.executor == "ray":
        from abvid.pipeline import ray_preprocess
        cluster = ray_preprocess.connect(cfg.ray_address)   # an address that does not answer: UsageError
    out.mkdir(parents=True, exist_ok=True)
    prefix = cfg.shard_prefix
    manifest_name, stats_name, settings_name = run_files(prefix)
    lock = _lock(out / f".{prefix}.lock")
    try:
        _check_settings(out / settings_name, cfg)
        manifest = Manifest(out / manifest_name)
        try:
            rows, next_index = shardwriter.recover(out, prefix, manifest)
        except RuntimeError as e:
            raise JobError(str(e)) from None
        rows = {p: r for p, r in rows.items() if _final(r)}   # duplicate-input skips are redone below
        manifest.rewrite(list(in_input_order(items(), rows)))  # compact: one row per path, torn lines gone
        counts = {"resumed": 0}
        with progress_bar(total, progress) as bar:
            todo = _todo(items(), rows, manifest, cfg, counts, bar)
            tasks = ({"seq": i, "path": it.path, "video_id": video_id(it.path),
                      "annotations": ann.for_video(it.path) if ann else []} for i, it in enumerate(todo))
            if cluster is not None:
                from abvid.pipeline import ray_preprocess
                done = ray_preprocess.run_tasks(cluster, tasks, cfg, out, prefix, manifest, rows, bar)
            else:
                done = _run_local(tasks, total, cfg, out, prefix, next_index, manifest, rows, bar)
        final = list(in_input_order(items(), rows))
        manifest.rewrite(final)
        stats = run_stats(items(), final, counts["resumed"], done.source_frames, done.shards, done.bytes,
                          time.perf_counter() - t_start)
        stats.manifest = str(manifest.path)
        stats.peak_rss_mb = {"parent": peak_rss_mb(),
                             "worker": max((r.get("peak_rss_mb", 0.0) for r in final), default=0.0)}
        stats.by_node = done.by_node
        write_json(out / stats_name, stats.to_json() | {"settings": cfg.output_settings(),
                                                         "config": asdict(cfg), "workers": done.workers})
        return stats
    finally:
        lock.close()
        if cluster is not None:
            cluster.close()


def _final(row: dict) -> bool:
    """A manifest row that stands on a rerun (ok, failed, too short); duplicate-input skips are redone."""
    return row.get("status") != "skipped" or row.get("reason") == TOO_SHORT


def _todo(items: Iterator[InputItem], rows: dict[str, dict], manifest: Manifest, cfg: PreprocessConfig,
          counts: dict, bar) -> Iterator[InputItem]:
    """The inputs to decode, lazily; the others tick the bar: resumed ones (counted), missing files (failed)."""
    for it in items:
        prev = rows.get(it.path)
        if it.skip_reason:
            bar.update(1)
            continue
        bar.update(1)   # undone below for the ones yielded: their result ticks the bar
        if prev and (prev["status"] in ("ok", "skipped") or (prev["status"] == "failed" and not cfg.retry_failed)):
            counts["resumed"] += prev["status"] == "ok"
        elif not os.path.exists(it.path):
            rows[it.path] = manifest_row(it.path, status="failed", reason="not found",
                                         error=f"{it.path}: no such file (from {it.origin}); check the path")
            manifest.append([rows[it.path]])
        else:
            bar.update(-1)
            yield it


@dataclass
class Done:
    """What an executor reports back: frames decoded, shards it completed, their bytes, per-node counts."""
    source_frames: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    workers: int = 0
    by_node: dict[str, dict] = field(default_factory=dict)


def count_node(by_node: dict[str, dict], row: dict) -> None:
    """Add a finished video's row to the per-node tally (videos, ok, failed, frames, seconds)."""
    n = by_node.setdefault(row.get("node") or "?", {"videos": 0, "ok": 0, "failed": 0, "frames": 0, "seconds": 0.0})
    n["videos"] += 1
    n["ok"] += row["status"] == "ok"
    n["failed"] += row["status"] == "failed"
    n["frames"] += row.get("source_frames", 0)
    n["seconds"] = round(n["seconds"] + row.get("seconds", 0.0), 3)


def progress_bar(total: int, progress: bool):
    """The run's bar: videos done of the total (resumed ones included), frames/s and failures as postfix."""
    from tqdm import tqdm
    return tqdm(total=total, unit="video", disable=not progress, dynamic_ncols=True)


def show(bar, state: dict, t0: float, **extra) -> None:
    """Tick the bar for one finished video; ``state`` holds source_frames and failed so far."""
    bar.update(1)
    bar.set_postfix(frames=state["source_frames"],
                    frames_per_s=f"{state['source_frames'] / max(time.perf_counter() - t0, 1e-9):.0f}",
                    failed=state["failed"], **extra)


def _run_local(tasks: Iterator[dict], total: int, cfg: PreprocessConfig, out: Path, prefix: str, next_index: int,
               manifest: Manifest, rows: dict[str, dict], bar) -> Done:
    """The local executor: an IsolatedPool on this machine; spools copied into shards in input order."""
    n_workers = min(cfg.workers or os.cpu_count() or 1, max(1, total))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // n_workers)
    spool_dir = out / f".spool-{prefix}"
    shutil.rmtree(spool_dir, ignore_errors=True)
    spool_dir.mkdir()
    writer = shardwriter.ShardWriter(out, prefix, manifest, next_index, cfg.shard_clips, cfg.shard_bytes)
    spooled = ({**t, "spool": str(spool_dir / f"{t['seq']}.spool")} for t in tasks)
    done = Done(workers=n_workers)
    done.source_frames = _decode_all(spooled, cfg, n_workers, threads, writer, manifest, rows, bar, done.by_node)
    writer.close()
    shutil.rmtree(spool_dir, ignore_errors=True)
    done.shards, done.bytes = writer.completed, writer.bytes_written
    return done


def _decode_all(tasks: Iterator[dict], cfg: PreprocessConfig, n_workers: int, threads: int, writer,
                manifest, rows: dict[str, dict], bar, by_node: dict[str, dict]) -> int:
    """Run the worker pool; commit results in input order (deterministic shard layout); returns frames decoded."""
    done: dict[int, dict] = {}
    state = {"started": 0, "next": 0, "source_frames": 0, "failed": 0}
    window = 4 * n_workers  # spool files waiting for an earlier, slower video

    def feed():
        for t in tasks:
            state["started"] += 1
            yield t

    pool = IsolatedPool(process_video, (cfg, threads), n=n_workers, timeout_s=cfg.timeout_s,
                        preload=PRELOAD)
    t0 = time.perf_counter()
    for res in pool.run(feed(), may_start=lambda: state["started"] < state["next"] + window):
        done[res["seq"]] = res
        state["source_frames"] += res.get("source_frames", 0)
        state["failed"] += res["status"] == "failed"
        show(bar, state, t0)
        while state["next"] in done:
            res = done.pop(state["next"])
            state["next"] += 1
            row = manifest_row(res["path"], **{k: v for k, v in res.items() if k in ROW_FIELDS})
            if row["status"] == "ok" and row["clips"] > 0:
                row = {**row, "shards": [writer.append(res["spool"], row["clips"], row)]}
            else:
                manifest.append([row])
            rows[row["path"]] = row
            count_node(by_node, row)
            if os.path.exists(res["spool"]):
                os.unlink(res["spool"])
    return state["source_frames"]


def _lock(path: Path):
    """Exclusive lock on the output prefix (released by the OS even on SIGKILL)."""
    f = shardwriter.lock_file(path)
    if f is None:
        raise JobError(f"{path.parent}: another preprocess run is writing prefix {path.stem[1:-5]!r} "
                       f"(lock {path}); wait for it, or use another --out or --prefix")
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
