"""Storage of ``abvid embed``: per-unit part files in ``OUT/parts`` and their merge into the outputs.

A unit (one video or shard) is written as ``<name>.f32`` (raw float32 rows, appended
batch by batch under a temp name), ``<name>.csv`` (its index rows) and, last,
``<name>.done.json`` (``{"status": "ok", "rows", "dim", "path"}``), each renamed into
place, so a part is either complete and marked done or ignored. A unit that failed leaves
only ``<name>.failed.json`` (``{"status": "failed", "error", "path"}``). ``merge_parts``
concatenates done parts into ``embeddings.npy`` (``np.lib.format.open_memmap`` on a
temp name, then rename; memory flat in N), ``index.csv`` and ``embeddings.parquet``
(index columns + a fixed-size-list ``embedding``; pyarrow is a dependency of abvid, and
the file is skipped only where it is absent). ``write_faiss`` adds ``embeddings.faiss``,
an exact (flat) faiss index whose ids are the rows of ``index.csv``:

    import faiss, numpy as np
    index = faiss.read_index("emb/embeddings.faiss")
    x = np.load("emb/embeddings.npy", mmap_mode="r")
    scores, rows = index.search(np.asarray(x[:1], dtype=np.float32), 5)   # the 5 frames nearest row 0
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FIELDS = ("row", "video_id", "source", "frame_index", "pts_s")


class StoreError(RuntimeError):
    """Part files of an output folder disagree (dimension, row count); rerun with --overwrite."""


class PartWriter:
    """Embeddings of one unit, appended batch by batch to a temp file; ``commit`` makes them a done part."""

    def __init__(self, work: Path, name: str, path: str):
        self.work, self.name, self.path = work, name, path
        self.tmp = work / f"{name}.f32.tmp"
        self.f = self.tmp.open("wb")
        self.rows: list[dict] = []
        self.dim = 0

    def append(self, emb: np.ndarray, rows: list[dict]) -> None:
        self.dim = emb.shape[1]
        self.f.write(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
        self.rows.extend(rows)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        base = self.work / self.name
        os.replace(self.tmp, base.with_suffix(".f32"))
        _write_csv(base.with_suffix(".csv"), self.rows, INDEX_FIELDS[1:])
        done = {"status": "ok", "rows": len(self.rows), "dim": self.dim, "path": self.path}
        write_text(base.with_suffix(".done.json"), json.dumps(done) + "\n")
        base.with_suffix(".failed.json").unlink(missing_ok=True)     # a retried unit that now works

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)

    def fail(self, error: str) -> None:
        """Drop what was written and record the failure (``failed_part``), so a rerun can skip the unit."""
        self.abort()
        write_text((self.work / self.name).with_suffix(".failed.json"),
                   json.dumps({"status": "failed", "error": error, "path": self.path}) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: a temp file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def done_part(work: Path, name: str) -> dict[str, Any] | None:
    """The done record of part ``name`` when it is complete and consistent, else None."""
    base = work / name
    try:
        done = json.loads(base.with_suffix(".done.json").read_text())
        size = base.with_suffix(".f32").stat().st_size
    except (OSError, json.JSONDecodeError):
        return None
    ok = done.get("status") == "ok" and size == done["rows"] * done["dim"] * 4 and base.with_suffix(".csv").is_file()
    return done if ok else None


def failed_part(work: Path, name: str) -> str | None:
    """The error of part ``name`` when an earlier run recorded it as failed, else None."""
    try:
        rec = json.loads((work / name).with_suffix(".failed.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return str(rec.get("error", "unknown error")) if rec.get("status") == "failed" else None


def merge_parts(out: Path, work: Path, names: list[str], dtype: str = "float32") -> int:
    """Concatenate done parts (in order) into embeddings.npy + index.csv (+ parquet); returns N.

    Streams part by part (a part's rows are checked against its done record), so memory stays flat in N.
    """
    dones = [json.loads((work / f"{n}.done.json").read_text()) for n in names]
    dims = {d["dim"] for d in dones if d["rows"]}
    if len(dims) > 1:
        raise StoreError(f"{work}: parts have different dimensions {sorted(dims)}; rerun with --overwrite")
    dim, total = (dims.pop() if dims else 0), sum(d["rows"] for d in dones)
    tmp_npy, tmp_csv = out / ".embeddings.npy.tmp", out / ".index.csv.tmp"
    arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.dtype(dtype), shape=(total, dim))
    row = 0
    with tmp_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(INDEX_FIELDS), extrasaction="ignore")
        w.writeheader()
        for n, d in zip(names, dones):
            with (work / f"{n}.csv").open(newline="") as pf:
                part_rows = list(csv.DictReader(pf))
            if len(part_rows) != d["rows"]:
                raise StoreError(f"{work / n}.csv holds {len(part_rows)} rows, its embeddings {d['rows']}; "
                                 "rerun with --overwrite")
            if d["rows"]:
                part = np.memmap(work / f"{n}.f32", dtype=np.float32, mode="r", shape=(d["rows"], dim))
                arr[row:row + d["rows"]] = part
                del part
            for r in part_rows:
                r["row"] = row
                w.writerow(r)
                row += 1
    arr.flush()
    del arr
    os.replace(tmp_csv, out / "index.csv")
    os.replace(tmp_npy, out / "embeddings.npy")
    _write_parquet(out)
    return total


def _write_parquet(out: Path, chunk: int = 65536) -> bool:
    """embeddings.parquet (index columns + a fixed-size-list 'embedding' column) when pyarrow is importable.

    Written one row group of ``chunk`` rows at a time from index.csv and the memory-mapped array.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    x = np.load(out / "embeddings.npy", mmap_mode="r")
    tmp = out / ".embeddings.parquet.tmp"
    writer = None
    with (out / "index.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        try:
            start = 0
            while True:
                part = [r for _, r in zip(range(chunk), reader)]
                if not part and writer is not None:
                    break   # done; (an empty index still gets one empty row group, so the file has a schema)
                emb = np.ascontiguousarray(x[start:start + len(part)])
                table = pa.table({
                    "row": pa.array([int(r["row"]) for r in part], pa.int64()),
                    "video_id": pa.array([r["video_id"] for r in part], pa.string()),
                    "source": pa.array([r["source"] for r in part], pa.string()),
                    "frame_index": pa.array([int(r["frame_index"]) for r in part], pa.int64()),
                    "pts_s": pa.array([float(r["pts_s"]) for r in part], pa.float64()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), x.shape[1]),
                })
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
                start += len(part)
        finally:
            if writer is not None:
                writer.close()
    os.replace(tmp, out / "embeddings.parquet")
    return True


def write_faiss(out: Path, metric: str = "l2", chunk: int = 65536) -> Path:
    """``embeddings.faiss``: a flat index over embeddings.npy (inner product for ``metric="ip"``, e.g.
    normalised vectors, else L2), added in chunks from the memory map; written to a temp name, renamed."""
    import faiss

    x = np.load(out / "embeddings.npy", mmap_mode="r")
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        index.add(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32))
    tmp = out / ".embeddings.faiss.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / "embeddings.faiss")
    return out / "embeddings.faiss"
