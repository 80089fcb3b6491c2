"""Atomic WebDataset tar shards and the manifest that says which videos they hold.

A shard is a plain POSIX tar (GNU long names) that stock ``tarfile`` and
``webdataset.WebDataset`` read. Members are built by ``tar_member`` with fixed
metadata (mtime 0, mode 0644, no owner), so the same samples give the same bytes.

Commit protocol (crash safety; every step is fsynced before the next):

1. workers write each video's members to a spool file (``SpoolWriter``, no end marker);
2. ``ShardWriter.append`` copies spools of whole videos into ``<prefix>-NNNNNN.tar.tmp``;
3. when the shard is full (or the run ends) ``ShardWriter.close`` writes the tar end
   marker, fsyncs, writes the videos' manifest rows to ``<shard>.tar.commit``, renames
   ``.tar.tmp`` -> ``.tar`` (and fsyncs the folder), appends the rows to
   ``manifest.jsonl``, and deletes the ``.commit`` file.

``recover`` (run at start, under the run lock) deletes ``.tar.tmp`` files, replays
``.commit`` files whose shard was renamed (the kill fell between rename and manifest
append), and moves completed shards that no manifest row refers to aside as
``.tar.orphan``. So a ``manifest.jsonl`` row with status ``ok`` always means the
video's clips are in a completed shard, and no key is in two completed shards.

Writers on other machines (``pipeline/ray_preprocess.py``) each own a sub-prefix
``<prefix>-rayNNN`` (:func:`writer_prefix`) and hold ``.<prefix>-rayNNN.lock`` while they
live; they stop after the rename (``keep_commit=True``) and the driver, which owns the
manifest, appends the rows and deletes the ``.commit`` file. ``recover`` treats those
sub-prefixes as part of the run: it waits for each one's lock (a writer of a killed run
may take a moment to be reaped), then cleans and replays it like its own.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tarfile
import time
import warnings
from pathlib import Path

from abvid.pipeline.manifest import Manifest, fsync_dir

BLOCK = 512


def tar_member(name: str, data: bytes) -> bytes:
    """Header + data + padding of one regular-file member (deterministic metadata)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % BLOCK)


class SpoolWriter:
    """Member stream of one video (tar members without the end marker), appended to a shard later."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.bytes = 0

    def add(self, name: str, data: bytes) -> None:
        buf = tar_member(name, data)
        self._f.write(buf)
        self.bytes += len(buf)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SpoolWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}-(\d{{6,}})\.tar$")


def writer_prefix(prefix: str, number: int) -> str:
    """The shard prefix of remote writer ``number`` of run prefix ``prefix``: ``<prefix>-rayNNN``."""
    return f"{prefix}-ray{number:03d}"


def writer_numbers(out_dir: str | Path, prefix: str) -> set[int]:
    """Numbers of the writer sub-prefixes that left any file (shard, temp, commit, lock) in ``out_dir``."""
    pat = re.compile(rf"^\.?{re.escape(prefix)}-ray(\d{{3,}})[-.]")
    return {int(m.group(1)) for p in Path(out_dir).iterdir() if (m := pat.match(p.name))}


def lock_file(path: str | Path, wait_s: float = 0.0):
    """An exclusive ``flock`` on ``path`` (released by the OS even on SIGKILL); None if still held after ``wait_s``."""
    f = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.1)


class ShardWriter:
    """Packs whole videos (spool files) into ``<prefix>-NNNNNN.tar`` shards of about the target size."""

    def __init__(self, out_dir: str | Path, prefix: str, manifest: Manifest, next_index: int = 0,
                 max_clips: int = 0, max_bytes: int = 0, keep_commit: bool = False):
        self.keep_commit = keep_commit   # True: the caller appends the rows to the manifest, then deletes .commit
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.manifest = manifest
        self.index = next_index
        self.max_clips, self.max_bytes = max_clips, max_bytes
        self._f = None
        self._rows: list[dict] = []
        self._clips = self._bytes = 0
        self.completed: list[str] = []   # shard names renamed by this writer
        self.bytes_written = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def append(self, spool: str | Path, clips: int, row: dict) -> str:
        """Copy one video's spool into the open shard; returns the shard name (row is committed on close)."""
        if self._f is None:
            self._f = open(self.out_dir / (self.name + ".tmp"), "wb")
        with open(spool, "rb") as src:
            shutil.copyfileobj(src, self._f, 1 << 20)
        self._bytes += os.path.getsize(spool)
        self._clips += clips
        self._rows.append({**row, "shards": [self.name]})
        name = self.name
        if (self.max_clips and self._clips >= self.max_clips) or (self.max_bytes and self._bytes >= self.max_bytes):
            self.close()
        return name

    def close(self) -> None:
        """Finish the open shard (if any): end marker, fsync, commit file, rename, manifest, drop commit."""
        if self._f is None:
            return
        f, self._f = self._f, None
        f.write(b"\0" * (2 * BLOCK))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        final = self.out_dir / self.name
        commit = final.with_name(final.name + ".commit")
        tmp_commit = commit.with_name(commit.name + ".tmp")
        with open(tmp_commit, "w", encoding="utf-8") as c:
            c.write("".join(json.dumps(r) + "\n" for r in self._rows))
            c.flush()
            os.fsync(c.fileno())
        os.replace(tmp_commit, commit)
        fsync_dir(self.out_dir)   # the commit file is durable before the shard appears
        os.replace(final.with_name(final.name + ".tmp"), final)
        fsync_dir(self.out_dir)
        self.manifest.append(self._rows)
        if not self.keep_commit:
            commit.unlink()
        self.completed.append(final.name)
        self.bytes_written += self._bytes + 2 * BLOCK
        self.index += 1
        self._rows, self._clips, self._bytes = [], 0, 0


def recover(out_dir: str | Path, prefix: str, manifest: Manifest, wait_s: float = 60.0) -> tuple[dict[str, dict], int]:
    """Clean up after a killed run; returns (manifest rows by path, next shard index of ``prefix``).

    Covers ``prefix`` and its remote writers' sub-prefixes (each cleaned under its lock, waited
    for up to ``wait_s``). Rows with status ok whose shard files are gone are dropped (those
    videos are redone).
    """
    out_dir = Path(out_dir)
    numbers = sorted(writer_numbers(out_dir, prefix))
    locks = []
    for n in numbers:
        lock = lock_file(out_dir / f".{writer_prefix(prefix, n)}.lock", wait_s)
        if lock is None:
            for f in locks:
                f.close()
            raise RuntimeError(f"{out_dir}: writer {writer_prefix(prefix, n)} of an earlier run still holds "
                               f".{writer_prefix(prefix, n)}.lock after {wait_s:g} s; stop that run first")
        locks.append(lock)
    try:
        rows = manifest.load()
        shards: dict[str, int] = {}
        for p in [prefix] + [writer_prefix(prefix, n) for n in numbers]:
            found = _recover_prefix(out_dir, p, manifest, rows)
            shards.update({name: i if p == prefix else -1 for name, i in found.items()})
        referenced = set()
        for path, row in list(rows.items()):
            if row.get("status") == "ok":
                if all(s in shards for s in row.get("shards", [])):
                    referenced.update(row.get("shards", []))
                else:
                    warnings.warn(f"{path}: marked ok but shard(s) {row.get('shards')} are missing in {out_dir}; "
                                  f"redoing this video")
                    del rows[path]
        for name in sorted(set(shards) - referenced):
            warnings.warn(f"{out_dir / name}: no manifest row refers to this shard (manifest edited or lost?); "
                          f"moved aside to {name}.orphan so its keys are not written twice")
            os.replace(out_dir / name, out_dir / (name + ".orphan"))
            del shards[name]
        fsync_dir(out_dir)
    finally:
        for n, f in zip(numbers, locks):
            (out_dir / f".{writer_prefix(prefix, n)}.lock").unlink(missing_ok=True)
            f.close()
    return rows, max(shards.values(), default=-1) + 1


def recover_writer(out_dir: str | Path, prefix: str, manifest: Manifest, rows: dict[str, dict],
                   wait_s: float) -> bool:
    """Clean up after one lost remote writer (sub-prefix ``prefix``) in a running job: replay its commit
    files into ``manifest`` / ``rows``, delete its temp files. False if its lock is still held after ``wait_s``."""
    out_dir = Path(out_dir)
    lock = lock_file(out_dir / f".{prefix}.lock", wait_s)
    if lock is None:
        return False
    try:
        _recover_prefix(out_dir, prefix, manifest, rows)
        fsync_dir(out_dir)
    finally:
        (out_dir / f".{prefix}.lock").unlink(missing_ok=True)
        lock.close()
    return True


def _recover_prefix(out_dir: Path, prefix: str, manifest: Manifest, rows: dict[str, dict]) -> dict[str, int]:
    """Delete temp files of ``prefix``, replay its commit files into ``rows``; returns its shards -> index."""
    pat = shard_pattern(prefix)

    def mine(suffix: str) -> list[Path]:  # exact pattern: prefix "shard" must not touch "shard-0-of-2-..."
        return sorted(p for p in out_dir.iterdir() if p.name.endswith(suffix) and pat.match(p.name[:-len(suffix)]))

    for tmp in mine(".tmp") + mine(".commit.tmp"):
        tmp.unlink()
    for commit in mine(".commit"):
        shard = commit.with_name(commit.name[:-len(".commit")])
        if shard.exists():  # killed after the rename: make the manifest say what the shard holds
            with open(commit, encoding="utf-8") as f:
                replay = [json.loads(line) for line in f if line.strip()]
            manifest.append(replay)
            rows.update({r["path"]: r for r in replay})
        commit.unlink()
    return {p.name: int(m.group(1)) for p in out_dir.iterdir() if (m := pat.match(p.name))}
