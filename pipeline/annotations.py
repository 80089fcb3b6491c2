"""Annotation side files: time spans of a video with a ``label`` or a free ``text``.

Format (CSV with a header, or JSONL with one object per line)::

    video,start_s,end_s,label
    cat_001.mp4,0.0,5.0,cat

``video`` names the video by absolute path, by a path relative to the annotation
file's folder, by file name, or by stem (``cat_001``); ``label`` or ``text`` (or both)
must be non-empty. ``load_annotations(path)`` returns an ``Annotations`` index;
``ann.for_video(path)`` gives the rows of one video and ``overlapping(rows, t0, t1)``
those overlapping the half-open span ``[t0, t1)``. A malformed row raises
``AnnotationError`` naming the file and line (CLI exit code 2).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .inputs import jsonl_objects


class AnnotationError(ValueError):
    """The annotation file cannot be read, or a row is malformed (message names file:line)."""


@dataclass(frozen=True)
class Annotation:
    start_s: float
    end_s: float
    label: str = ""
    text: str = ""

    def to_json(self) -> dict:
        row: dict = {"start_s": self.start_s, "end_s": self.end_s}
        if self.label:
            row["label"] = self.label
        if self.text:
            row["text"] = self.text
        return row


class Annotations:
    """Rows grouped by their ``video`` value; looked up by path, file name or stem."""

    def __init__(self, rows: dict[str, list[Annotation]], base: Path | None = None):
        self._rows = rows
        # lookup key -> ``video`` values: the value itself, and the absolute path a relative value names
        self._index: dict[str, set[str]] = {}
        for video in rows:
            self._index.setdefault(video, set()).add(video)
            if base is not None and not os.path.isabs(video):
                self._index.setdefault(os.path.abspath(base / video), set()).add(video)

    def __len__(self) -> int:
        return sum(len(v) for v in self._rows.values())

    @property
    def videos(self) -> list[str]:
        return list(self._rows)

    def for_video(self, path: str) -> list[Annotation]:
        """Rows whose ``video`` equals the path (absolute or relative to the file), name or stem."""
        p = Path(path)
        videos = set().union(*(self._index.get(k, ()) for k in (os.path.abspath(path), path, p.name, p.stem)))
        found = [a for v in videos for a in self._rows[v]]
        return sorted(found, key=lambda a: (a.start_s, a.end_s, a.label, a.text))


def overlapping(rows: list[Annotation], start_s: float, end_s: float) -> list[Annotation]:
    """Rows whose ``[start_s, end_s)`` overlaps the query span (a zero-length row counts at its time)."""
    return [a for a in rows if a.start_s < end_s and (a.end_s > start_s or (a.end_s == a.start_s == start_s))]


def load_annotations(path: str | Path, text: str | None = None) -> Annotations:
    """The segment annotations of a CSV/JSONL file; ``text``: its contents when the caller has read them."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AnnotationError(f"cannot read annotation file {path}: {e}") from e
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = _read_csv(path, text)
    elif suffix in (".jsonl", ".json"):
        raw = _read_jsonl(path, text)
    else:
        raise AnnotationError(f"{path}: unknown annotation file type {suffix!r}; use .csv or .jsonl")
    rows: dict[str, list[Annotation]] = {}
    for line, row in raw:
        video, ann = _parse_row(path, line, row)
        rows.setdefault(video, []).append(ann)
    return Annotations(rows, base=path.parent)


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    missing = [c for c in ("video", "start_s", "end_s") if c not in fields]
    if missing or not ({"label", "text"} & set(fields)):
        raise AnnotationError(f"{path}:1: header must have columns video,start_s,end_s and label or text "
                              f"(found {fields}; missing {missing or ['label|text']})")
    out = []
    for n, row in enumerate(reader, 2):
        if None in row:  # more cells than header columns
            raise AnnotationError(f"{path}:{n}: {len(fields) + len(row[None])} cells but the header has "
                                  f"{len(fields)}; quote values that contain commas")
        out.append((n, row))
    return out


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    return jsonl_objects(path, text, AnnotationError, "a JSON object with video, start_s, end_s, label|text")


def _parse_row(path: Path, line: int, row: dict) -> tuple[str, Annotation]:
    where = f"{path}:{line}"
    video = row.get("video")
    if not isinstance(video, str) or not video.strip():
        raise AnnotationError(f"{where}: missing or empty 'video' (a path, file name or stem)")
    times = []
    for col in ("start_s", "end_s"):
        value = row.get(col)
        try:
            t = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise AnnotationError(f"{where}: {col}={value!r} is not a number of seconds") from None
        if not math.isfinite(t) or t < 0:
            raise AnnotationError(f"{where}: {col}={value!r} must be a finite number >= 0")
        times.append(t)
    if times[1] < times[0]:
        raise AnnotationError(f"{where}: end_s={times[1]} is before start_s={times[0]}; swap them")
    label = row.get("label") or ""
    text = row.get("text") or ""
    if not isinstance(label, str) or not isinstance(text, str):
        raise AnnotationError(f"{where}: label and text must be strings")
    if not label.strip() and not text.strip():
        raise AnnotationError(f"{where}: neither 'label' nor 'text' is set; give one of them")
    return video.strip(), Annotation(times[0], times[1], label.strip(), text.strip())
