"""The record a preprocess run keeps in its output folder: file names, manifest rows, stats.

One manifest row per input video, keyed by its path and naming it by :func:`video_id`
(the key stem of its clips). ``pipeline/preprocess.py`` fills the rows, keeps them in input
order (:func:`in_input_order`) and sums them into :class:`Stats`; the manifest file itself
(append, rewrite, torn-row tolerance) is :class:`Manifest`; shardwriter.py's commit protocol writes it.

File names (:func:`run_files`): ``manifest.jsonl``, ``stats.json`` and ``preprocess.json``
(the output settings a resume must match) for the default prefix ``shard``; with
``--prefix P`` or ``--slice i/n`` (prefix ``shard-i-of-n``) they are ``P-manifest.jsonl``,
``P-stats.json`` and ``P-preprocess.json``, so slices running at once into one folder
never share a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

TOO_SHORT = "too short"   # reason of a video with fewer frames than one clip (status skipped, final like ok)

# fields a worker result may set in its row (others come from the parent)
ROW_FIELDS = ("video_id", "status", "reason", "error", "frames", "clips", "tail_frames", "decode_errors",
              "source_frames", "seconds", "peak_rss_mb", "backend", "node")


def video_id(path: str) -> str:
    """``<sanitized stem>_<8 hex of sha1(abs path or URL)>``; no dots, so webdataset keys stay whole."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem).strip("_")[:64] or "video"
    where = path if "://" in path else os.path.abspath(path)
    return f"{stem}_{hashlib.sha1(where.encode('utf-8')).hexdigest()[:8]}"


def run_files(prefix: str) -> tuple[str, str, str]:
    """(manifest, stats, settings) file names: the documented ones for the default prefix, else
    prefixed, so slices running at once into one folder never share a file."""
    names = ("manifest.jsonl", "stats.json", "preprocess.json")
    return names if prefix == "shard" else tuple(f"{prefix}-{n}" for n in names)  # type: ignore[return-value]


def manifest_row(path: str, **fields) -> dict:
    """A manifest row with every documented field present."""
    row = {"path": path, "video_id": video_id(path), "status": "failed", "error": "", "frames": 0, "clips": 0,
           "shards": [], "decode_errors": 0, "seconds": 0.0}
    row.update(fields)
    return row


def in_input_order(items: Iterable, rows: dict[str, dict]) -> Iterator[dict]:
    """Manifest rows in input order (duplicate inputs as skipped rows in place), then rows of earlier
    runs' other inputs. ``items`` (``inputs.InputItem``) may be a stream."""
    seen: set[str] = set()
    for it in items:
        if it.skip_reason:
            yield manifest_row(it.path, status="skipped", reason="duplicate", error=it.skip_reason)
        elif it.path in rows and it.path not in seen:
            seen.add(it.path)
            yield rows[it.path]
    yield from (r for p, r in rows.items() if p not in seen)


@dataclass
class Stats:
    inputs: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    resumed: int = 0              # ok rows of earlier runs, not decoded again
    frames: int = 0               # resampled frames written or dropped as tail (this run)
    clips: int = 0
    tail_frames: int = 0          # frames after the last full clip, dropped
    source_frames: int = 0        # frames the decoder decoded (throughput basis)
    decode_errors: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    by_node: dict[str, dict] = field(default_factory=dict)   # host -> videos, ok, failed, frames, seconds (this run)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # parent / largest worker (VmHWM)
    manifest: str = ""

    def to_json(self) -> dict:
        s = max(self.seconds, 1e-9)
        return asdict(self) | {"throughput": {"source_frames_per_s": round(self.source_frames / s, 2),
                                              "frames_per_s": round(self.frames / s, 2),
                                              "clips_per_s": round(self.clips / s, 3),
                                              "mb_per_s": round(self.bytes / s / 1e6, 3)}}


def run_stats(items: Iterable, final: list[dict], resumed: int, source_frames: int, shards: list[str],
              bytes_written: int, seconds: float) -> Stats:
    """Sum the rows of this run's inputs (``items``) among ``final`` (rows of other inputs are left out)."""
    mine: set[str] = set()
    n_items = 0
    for it in items:
        mine.add(it.path)
        n_items += 1
    rows = [r for r in final if r["path"] in mine]
    st = Stats(inputs=n_items, resumed=resumed, source_frames=source_frames, shards=shards,
               bytes=bytes_written, seconds=round(seconds, 3))
    for r in rows:
        if r["status"] == "ok":
            st.ok += 1
            st.frames += r["frames"]
            st.clips += r["clips"]
            st.tail_frames += r.get("tail_frames", 0)
            st.decode_errors += r["decode_errors"]
        elif r["status"] == "failed":
            st.failed += 1
            reason = r.get("reason") or "error"
            st.failures_by_reason[reason] = st.failures_by_reason.get(reason, 0) + 1
        else:
            st.skipped += 1
            reason = r.get("reason") or "duplicate"
            st.skipped_by_reason[reason] = st.skipped_by_reason.get(reason, 0) + 1
    return st


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """``manifest.jsonl``: one JSON row per input; appended with fsync, compacted to the last row per path."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        """Last row per path. A torn line (kill during a write) is skipped: its commit file replays it."""
        rows: dict[str, dict] = {}
        if not self.path.exists():
            return rows
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{n}: skipping a torn manifest row (interrupted write)")
                    continue
                if isinstance(row, dict) and isinstance(row.get("path"), str):
                    # a "skipped" row of a duplicate input never hides the real row of the same path
                    if row.get("status") != "skipped" or row.get("reason") == TOO_SHORT or row["path"] not in rows:
                        rows[row["path"]] = row
        return rows

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the file atomically (temp, fsync, rename)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
