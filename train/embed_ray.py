"""``abvid embed --executor ray``: a Ray Data pipeline; decoding in CPU tasks across the cluster, the encoder in actors.

    abvid embed --checkpoint enc.safetensors list.txt --out emb/ --executor ray [--ray-address HEAD:6379] [--workers K]

One dataset, with ``preserve_order`` on:

    from_items(one row per unit to embed: index, kind, path)
    .flat_map(decode_unit, num_cpus=1)     CPU tasks anywhere in the cluster: the unit's frames in batches
                                           (embed_sources.batched: never spanning two units), then a
                                           "done" or "failed" row
    .map(Encoder, concurrency=K, ...)      the encoder in K actors: num_gpus=1 each on CUDA, else num_cpus=1
    .iter_rows()                           back in the driver, in input order: train/embed.py writes the parts

Each row carries one decode batch, so the encoder sees the batches the local executor makes
(equal vectors, tested to 1e-5). Pixels go from the decode tasks to the actors through the
object store; only the vectors (B x D floats) reach the driver, which writes the part files,
so resume, ``report.jsonl`` and the merged outputs are the local executor's. The encoder is
shipped to the actors once (``ray.put``). ``K`` is ``--workers`` (default 1: one GPU, or one
CPU actor; a CPU cluster wants a few).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from abvid.train.embed_sources import ShardError, Unit, batched, unit_frames


def decode_unit(row: dict, *, fps: float | None, size: int, batch_size: int, backend: str) -> Iterator[dict]:
    """flat_map stage (a CPU task): one unit -> its batches, then a done / failed row."""
    from abvid.pipeline.video import VideoError

    empty = np.zeros((0, size, size, 3), np.uint8)
    unit = Unit(row["kind"], row["path"], "", "")
    try:
        for rows, pixels in batched(unit_frames(unit, fps, size, backend, threads=1), batch_size):
            yield {"i": row["i"], "kind": "batch", "rows": json.dumps(rows), "pixels": pixels, "why": ""}
    except (VideoError, ShardError) as e:
        yield {"i": row["i"], "kind": "failed", "rows": "[]", "pixels": empty, "why": str(e)}
        return
    yield {"i": row["i"], "kind": "done", "rows": "[]", "pixels": empty, "why": ""}


class Encoder:
    """map stage (an actor): pixels of one batch -> its vectors (``train.embed.encode``)."""

    def __init__(self, encoder_ref: list, device: str, pool: str, normalize: bool):
        import ray

        from abvid.train.embed import encode

        self.encode = encode
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
        torch.set_num_threads(max(1, cpus))
        self.device = torch.device(device)
        self.encoder = ray.get(encoder_ref[0]).to(self.device).eval()
        self.pool, self.normalize = pool, normalize

    def __call__(self, row: dict) -> dict:
        pixels = row.pop("pixels")
        if row["kind"] == "batch":
            row["emb"] = self.encode(self.encoder, torch.from_numpy(np.ascontiguousarray(pixels)), self.device,
                                     self.pool, self.normalize)
        else:
            row["emb"] = np.zeros((0, 0), np.float32)
        return row


def ray_events(cluster, units: list[Unit], encoder: nn.Module, *, fps: float | None, size: int, batch_size: int,
               backend: str, device: str, pool: str, normalize: bool, workers: int) -> Iterator[tuple[str, Unit, Any]]:
    """The events of ``units`` (``("emb", unit, (rows, vectors))``, then done / failed), in input order."""
    if not units:
        return
    ray = cluster.ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False   # abvid embed's own bar counts the inputs
    gpu = device == "cuda"
    encoder_ref = ray.put(copy.deepcopy(encoder).cpu())
    ds = ray.data.from_items([{"i": i, "kind": u.kind, "path": u.path} for i, u in enumerate(units)])
    ds = ds.flat_map(decode_unit, fn_kwargs={"fps": fps, "size": size, "batch_size": batch_size, "backend": backend},
                     num_cpus=1)
    ds = ds.map(Encoder, fn_constructor_kwargs={"encoder_ref": [encoder_ref], "device": "cuda" if gpu else "cpu",
                                                "pool": pool, "normalize": normalize},
                concurrency=max(1, workers), **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
    for row in ds.iter_rows():
        unit = units[int(row["i"])]
        if row["kind"] == "batch":
            yield "emb", unit, (json.loads(row["rows"]), np.asarray(row["emb"], dtype=np.float32))
        else:
            yield row["kind"], unit, (row["why"] or None)
