"""Expand preprocess inputs (files, folders, globs, list files) into one ordered list of videos.

``expand_inputs(["videos/", "extra/*.mp4", "more.txt"])`` returns ``InputItem``s;
``iter_inputs`` yields the same items lazily (a list file is read line by line, so a
million-line list never sits in memory at once; only the set of paths seen, for duplicates):

* a folder is walked recursively (sorted) and yields files with a video extension
  (``VIDEO_EXTENSIONS``, case-insensitive); other files in a folder are not inputs;
* a glob (``*``, ``?``, ``[``) yields its matches, sorted; folders it matches are walked;
* a list file (``.txt``: one path per line, ``#`` comments; ``.csv`` / ``.jsonl``: a
  ``path`` column / key) yields its entries in order, relative paths taken from the
  list file's folder. An unreadable or malformed list file raises ``InputError``;
* any other argument is a video file, whatever its extension (the user named it).

Paths that do not exist (and globs matching nothing) are kept, so the manifest records
them as failed instead of dropping them silently. A path met a second time is kept
with ``skip_reason`` set, so it lands in the manifest as ``skipped``.

``slice_inputs(items, i, n)`` keeps the items of slice ``i`` (0-based) of ``n``; the
partition hashes the absolute path, so a video stays in its slice when the list grows
and the ``n`` slices together cover every input exactly once.

``missing_inputs(specs)`` names the command-line arguments that name nothing (not a path,
not a glob): the CLI refuses those up front (exit 2) instead of recording a failure.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from abvid.pipeline.errors import UsageError

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".vob", ".mxf", ".y4m",
})
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".jsonl"})
_GLOB_CHARS = set("*?[")


class InputError(UsageError):
    """A list file cannot be read or parsed, or a --slice spec is malformed (CLI exit code 2)."""


@dataclass(frozen=True)
class InputItem:
    path: str              # absolute path (not resolved through symlinks)
    origin: str            # the argument or "list.txt:12" that produced it
    skip_reason: str = ""  # non-empty: not processed, recorded in the manifest as skipped


def expand_inputs(specs: list[str]) -> list[InputItem]:
    """All videos named by ``specs``, in argument order; duplicates marked skipped."""
    return list(iter_inputs(specs))


def iter_inputs(specs: list[str]) -> Iterator[InputItem]:
    """``expand_inputs``, lazily: list files are read as the items are consumed."""
    first_seen: dict[str, str] = {}
    for spec in specs:
        for it in _expand_one(spec):
            if it.path in first_seen:
                it = replace(it, skip_reason=f"duplicate input (already listed by {first_seen[it.path]})")
            else:
                first_seen[it.path] = it.origin
            yield it


def missing_inputs(specs: list[str]) -> list[str]:
    """Arguments that are neither an existing path nor a glob pattern."""
    return [s for s in specs if not os.path.exists(Path(s).expanduser()) and not _GLOB_CHARS & set(s)]


def _expand_one(spec: str) -> Iterable[InputItem]:
    p = Path(spec).expanduser()
    if p.is_dir():
        return [InputItem(f, spec) for f in _walk(p)]
    if p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
        return iter_list_file(p)
    if not p.exists() and _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(str(p), recursive=True))
        out: list[InputItem] = []
        for m in matches:
            if os.path.isdir(m):
                out.extend(InputItem(f, spec) for f in _walk(Path(m)))
            elif Path(m).suffix.lower() in VIDEO_EXTENSIONS:
                out.append(InputItem(os.path.abspath(m), spec))
        # A glob matching no video is recorded as a failed input, not dropped.
        return out or [InputItem(os.path.abspath(p), spec)]
    return [InputItem(os.path.abspath(p), spec)]


def _walk(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                found.append(os.path.abspath(os.path.join(root, name)))
    return found


def jsonl_objects(path: Path, text: str, error: type[Exception], shape: str) -> list[tuple[int, dict]]:
    """Non-blank lines of a JSONL text as ``(line number, object)``; a bad line raises ``error``
    naming ``path:line`` and the expected ``shape`` of a line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: not valid JSON ({e.msg}); each line must be {shape}") from e
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: each line must be {shape}")
        out.append((n, row))
    return out


def read_list_file(path: str | Path) -> list[InputItem]:
    """Entries of a ``.txt`` / ``.csv`` / ``.jsonl`` list file, relative to its folder."""
    return list(iter_list_file(path))


def iter_list_file(path: str | Path) -> Iterator[InputItem]:
    """``read_list_file``, line by line; a bad line raises ``InputError`` when it is reached."""
    path = Path(path)
    base = path.parent
    suffix = path.suffix.lower()
    if suffix not in LIST_EXTENSIONS:
        raise InputError(f"{path}: unknown list file type {suffix!r}; use .txt, .csv or .jsonl")
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise InputError(f"cannot read list file {path}: {e}") from e
    with f:
        try:
            for n, value in _entries(path, suffix, f):
                p = Path(value).expanduser()
                p = p if p.is_absolute() else base / p
                yield InputItem(os.path.abspath(p), f"{path}:{n}")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read list file {path}: {e}") from e


def _entries(path: Path, suffix: str, f) -> Iterator[tuple[int, str]]:
    """(line number, path text) per entry of an open list file."""
    if suffix == ".txt":
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield n, line
    elif suffix == ".csv":
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise InputError(f"{path}:1: a CSV list file needs a header with a 'path' column "
                             f"(found {reader.fieldnames}); add one, or use a .txt file with one path per line")
        for row in reader:
            value = (row.get("path") or "").strip()
            if not value:
                raise InputError(f"{path}:{reader.line_num}: empty 'path' value; remove the row or fill it in")
            yield reader.line_num, value
    else:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f'{path}:{n}: not valid JSON ({e.msg}); each line must be an object like '
                                 f'{{"path": "video.mp4"}}') from e
            if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"].strip():
                raise InputError(f'{path}:{n}: each line must be an object with a string "path" key')
            yield n, row["path"].strip()


def parse_slice(spec: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; slices are 0-based: ``0/n`` .. ``n-1/n``."""
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise InputError(f"--slice {spec!r}: expected I/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--slice {spec!r}: need N >= 1 and 0 <= I < N (slices are 0-based)")
    return i, n


def slice_of(path: str, n: int) -> int:
    """Slice index of an absolute path among ``n`` (stable: sha1 of the path)."""
    return int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "big") % n


def slice_inputs(items: Iterable[InputItem], i: int, n: int) -> list[InputItem]:
    return list(iter_slice(items, i, n))


def iter_slice(items: Iterable[InputItem], i: int, n: int) -> Iterator[InputItem]:
    return (it for it in items if n == 1 or slice_of(it.path, n) == i)
