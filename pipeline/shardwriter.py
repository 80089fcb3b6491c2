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
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
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


class ShardWriter:
    """Packs whole videos (spool files) into ``<prefix>-NNNNNN.tar`` shards of about the target size."""

    def __init__(self, out_dir: str | Path, prefix: str, manifest: Manifest, next_index: int = 0,
                 max_clips: int = 0, max_bytes: int = 0):
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
        commit.unlink()
        self.completed.append(final.name)
        self.bytes_written += self._bytes + 2 * BLOCK
        self.index += 1
        self._rows, self._clips, self._bytes = [], 0, 0


def recover(out_dir: str | Path, prefix: str, manifest: Manifest) -> tuple[dict[str, dict], int]:
    """Clean up after a killed run; returns (manifest rows by path, next shard index).

    Rows with status ok whose shard files are gone are dropped (those videos are redone).
    """
    out_dir = Path(out_dir)
    pat = shard_pattern(prefix)

    def mine(suffix: str) -> list[Path]:  # exact pattern: prefix "shard" must not touch "shard-0-of-2-..."
        return sorted(p for p in out_dir.iterdir() if p.name.endswith(suffix) and pat.match(p.name[:-len(suffix)]))

    for tmp in mine(".tmp") + mine(".commit.tmp"):
        tmp.unlink()
    rows = manifest.load()
    for commit in mine(".commit"):
        shard = commit.with_name(commit.name[:-len(".commit")])
        if shard.exists():  # killed after the rename: make the manifest say what the shard holds
            with open(commit, encoding="utf-8") as f:
                replay = [json.loads(line) for line in f if line.strip()]
            manifest.append(replay)
            rows.update({r["path"]: r for r in replay})
        commit.unlink()
    shards = {p.name: int(m.group(1)) for p in out_dir.iterdir() if (m := pat.match(p.name))}
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
    return rows, max(shards.values(), default=-1) + 1
