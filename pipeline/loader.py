"""Transition loader: shards -> clips -> views -> batches (docs/INTERFACES.md "Loader batch").

    loader = build_loader(DataConfig(shards="/data/shards"), batch_size=64, rank=0, world_size=1)
    for batch in loader: ...                     # endless (resampled) unless one_pass=True
    state = loader.state_dict()                  # exact resume: new loader + load_state_dict(state)

The pipeline is composed in one place, ``ClipDataset._stages``, from curried
generator stages (webdataset style):

    shard URLs -> tar members -> samples (raw bytes) -> shuffle buffer -> position counter (resume skip)
      -> sample views (parameters only) -> decode the frames the views use
      -> render each batch in place: views cropped/resized/augmented straight into the batch's
         (shared-memory) pixel buffers (``render_batches``; per clip: ``render_views`` + ``collate``)

Exact resume without decoding. All randomness is a pure function of
(seed, epoch, rank, worker, position): the shard order/draws, the shuffle buffer's
generator (seeded once per epoch and fed a deterministic stream), and a fresh
generator per sample position for its views. The dataset's state is (epoch,
position) = how many samples of the epoch's shuffled stream the worker has
consumed. StatefulDataLoader stores that state per worker with every batch; on
``load_state_dict`` each worker rebuilds the epoch's raw stream and drops the first
``position`` samples *before* view sampling and decoding, so a replay reads tar
bytes but decodes no JPEG. Samples skipped by the error policy (source.py) count as
consumed positions, so resume stays exact when some data are bad. Each reader's skips
go to a ``source.SkipLog`` (logged once per shard and fault, counted in each batch as
``data_skipped``, the run stopped past ``data.max_bad_fraction``). Resume needs the
same shards, seed, world size and number of workers (the last two checked, with a clear
error: ``TransitionLoader.load_state_dict`` / ``ClipDataset.load_state_dict``).

Epochs: one-pass mode reads every shard once (split by rank and worker) and stops.
Training streams are endless: in resampled mode each worker draws its share of
shards with replacement every epoch (no shard-count requirement); otherwise each
epoch is a fresh permutation of all shards. The shuffle buffer is drained at each
epoch end, which bounds the replay cost of a resume to one worker-epoch of tar reading.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from abvid.pipeline.errors import JobError
from abvid.pipeline.source import (SkipLog, SkipPolicy, Stage, check_split, epoch_shards, expand_shards,
                                   group_samples, shuffle, tar_members, warn_skip)
from abvid.pipeline.views import FRAME_SUFFIXES, ViewConfig, Views, ViewSampler, decode_frame, render, render_into

# Sub-streams of the (seed, epoch, rank, worker, ...) seeding (source.py uses 0 and 1).
_SHUFFLE_STREAM, _VIEW_STREAM = 2, 3


@dataclass(frozen=True)
class DataConfig(ViewConfig):
    """Every data setting of pre-training: the stream settings below plus the view settings of
    ``views.ViewConfig`` (n_global, global_size, ..., max_dt, p_dt0, augmentation strengths)."""
    shards: str | tuple[str, ...] = ""      # path, folder, glob, brace pattern, URL, or several ('::' or a list)
    allow_pipe: bool = False                 # accept pipe: URLs (they run shell commands)
    resampled: bool = True                   # training stream: shards drawn with replacement
    shuffle: bool = True                     # per-epoch shard order + sample shuffle buffer
    shuffle_buffer: int = 256                # clips held per worker (~0.4 MB each for 16 JPEG frames)
    workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool | None = None           # page-locked batches (fast host->GPU copy); None = if CUDA is available
    seed: int = 0
    aug_in_loader: bool = True               # False: record aug params, leave colour/blur/solarize to the
                                             # caller (gpu_views.augment works on GPU tensors); flip stays here
    decode_on: Literal["workers", "device"] = "workers"   # device: batches carry JPEG bytes + view parameters,
                                             # decoded and rendered on the training device (pipeline/gpu_views.py)
    max_bad_fraction: float = 0.1            # stop when more than this share of the samples read is unreadable

    def view_sampler(self) -> ViewSampler:
        return ViewSampler(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ViewConfig)})


def clip_id(key: str) -> int:
    """Stable 63-bit id of a clip key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def frames_of(sample: dict) -> dict[int, tuple[str, bytes]]:
    """{'000.jpg': b'..', ...} members -> {0: ('jpg', b'..'), ...}."""
    out = {}
    for suffix, data in sample.items():
        idx, _, ext = suffix.partition(".")
        if ext in FRAME_SUFFIXES and idx.isdigit():
            out[int(idx)] = (ext, data)
    return out


def labels_at(annotations: list[dict], times: list[float]) -> list[str]:
    """Labels/texts of the annotations whose [start_s, end_s] holds one of ``times``, first-seen order."""
    labels: list[str] = []
    for ann in annotations:
        name = ann.get("label", ann.get("text"))
        if name and name not in labels and any(float(ann["start_s"]) <= t <= float(ann["end_s"]) for t in times):
            labels.append(str(name))
    return labels


def sample_views(sampler: ViewSampler, rng_for: Callable[[int], np.random.Generator], next_views: int = 0,
                 on_skip: SkipPolicy = warn_skip) -> Stage:
    """Stage: raw clip -> "__frames__" (still bytes), "__views__", "__times__", "__labels__"; no pixels touched.

    ``next_views`` > 0 also draws that many fresh, never rendered views per clip ("__next__"): the
    targets of annotation bootstrapping's next actions A' (``ViewSampler.sample_next``).
    """
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            key, url = s["__key__"], s["__url__"]
            try:
                meta = json.loads(s["json"])
                frames = frames_of(s)
                K = len(frames)
                if K == 0 or sorted(frames) != list(range(K)):
                    raise ValueError(f"frames must be numbered 000..{K - 1:03d}, found {sorted(frames)[:20]}")
                if len(meta["pts_s"]) != K:
                    raise ValueError(f"json pts_s has {len(meta['pts_s'])} entries for {K} frames")
                rng, W, H = rng_for(s["__pos__"]), int(meta["width"]), int(meta["height"])
                views = sampler.sample(rng, K, W, H)
                nxt = sampler.sample_next(rng, int(views.frame_idx[0]), K, W, H, next_views) if next_views else None
                times = [float(meta["pts_s"][int(t)]) for t in views.frame_idx]
                labels = labels_at(meta.get("annotations") or [], times)
            except (KeyError, ValueError, TypeError) as e:   # json.JSONDecodeError is a ValueError
                on_skip(url, key, f"bad clip metadata ({type(e).__name__}: {e})")
                continue
            yield {"__key__": key, "__url__": url, "__frames__": frames, "__views__": views, "__next__": nxt,
                   "__times__": times, "__labels__": labels}
    return stage


def decode_frames(on_skip: SkipPolicy = warn_skip) -> Stage:
    """Stage: decode only the frames the views use -> "__frames__" = {index: (3, H, W) uint8}."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            views: Views = s["__views__"]
            try:
                s["__frames__"] = {int(t): decode_frame(s["__frames__"][int(t)][1], s["__frames__"][int(t)][0])
                                   for t in np.unique(views.frame_idx)}
            except (RuntimeError, ValueError) as e:
                on_skip(s["__url__"], s["__key__"], f"frame does not decode ({type(e).__name__}: {e})")
                continue
            yield s
    return stage


def _row(s: dict, boxes: np.ndarray) -> dict:
    """The per-clip fields of a batch besides the pixels."""
    views: Views = s["__views__"]
    row = {"boxes": boxes, "frame_idx": views.frame_idx, "time_s": np.asarray(s["__times__"], dtype=np.float32),
           "aug": views.aug, "key": s["__key__"], "labels": s["__labels__"], "clip_id": clip_id(s["__key__"])}
    nxt: Views | None = s.get("__next__")
    if nxt is not None:
        row.update(next_boxes=nxt.boxes, next_frame_idx=nxt.frame_idx, next_aug=nxt.aug)
    return row


def render_views(sampler: ViewSampler, apply_aug: bool) -> Stage:
    """Stage: decoded frames + view parameters -> one transition sample (per-clip part of the batch)."""
    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for s in samples:
            g, loc, boxes = render(s["__frames__"], s["__views__"], sampler.n_global, sampler.global_size,
                                   sampler.local_size, apply_aug=apply_aug)
            yield {"global": g, "local": loc, **_row(s, boxes)}
    return stage


def render_batches(sampler: ViewSampler, apply_aug: bool, batch_size: int) -> Stage:
    """Stage: decoded clips -> batches (docs/INTERFACES.md), every view rendered straight into its slot.

    The pixel buffers are allocated once per batch (in shared memory inside a DataLoader worker), so
    a view is written once and never copied again on its way to the main process. A finite stream
    ends with a short batch. No sample is pulled ahead: when a batch is yielded, the dataset's
    resume position is that of the batch's last clip.
    """
    G, L, ng, nl = sampler.global_size, sampler.local_size, sampler.n_global, sampler.n_local

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        samples = iter(samples)
        while True:
            g, loc = pixel_buffer((batch_size, ng, G, G, 3)), pixel_buffer((batch_size, nl, L, L, 3))
            g_np, loc_np, rows = g.numpy(), loc.numpy(), []
            for s in itertools.islice(samples, batch_size):
                i = len(rows)
                rows.append(_row(s, render_into(s["__frames__"], s["__views__"], g_np[i], loc_np[i], apply_aug)))
            if rows:
                yield {"global": g[:len(rows)].permute(0, 1, 4, 2, 3), "local": loc[:len(rows)].permute(0, 1, 4, 2, 3),
                       **_stack_rows(rows)}
            if len(rows) < batch_size:
                return
    return stage


class ClipDataset(IterableDataset):
    """Iterable of transition samples for one rank; splits shards across DataLoader workers itself.

    State (per worker, saved by StatefulDataLoader): {"epoch", "position", "world_size", "num_workers", "cpu_s"}.
    ``batch_size=None`` yields one sample per clip (``collate`` batches them); an int yields whole batches,
    rendered in place (``render_batches``: what ``build_loader`` uses). Batches run across epoch ends.
    ``decode_only=True`` stops after decoding (yields {"key", "frames"} per clip): the benchmark's bound.
    """

    def __init__(self, urls: list[str], sampler: ViewSampler, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, resampled: bool = True, one_pass: bool = False, shuffle: bool = True,
                 shuffle_buffer: int = 256, allow_pipe: bool = False, apply_aug: bool = True,
                 decode_only: bool = False, batch_size: int | None = None, next_views: int = 0,
                 jpeg_bytes: bool = False, max_bad_fraction: float = 0.1):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if jpeg_bytes and (batch_size is None or decode_only):
            raise ValueError("jpeg_bytes (data.decode_on=device) needs whole batches (batch_size) and no decode_only")
        self.urls, self.sampler, self.seed, self.rank, self.world_size = list(urls), sampler, seed, rank, world_size
        self.resampled, self.one_pass, self.shuffle = resampled and not one_pass, one_pass, shuffle
        self.shuffle_buffer, self.allow_pipe = shuffle_buffer, allow_pipe
        self.apply_aug, self.decode_only, self.batch_size = apply_aug, decode_only, batch_size
        self.next_views = next_views
        self.jpeg_bytes = jpeg_bytes             # batches of JPEG bytes + view parameters (pipeline/gpu_views.py)
        self._epoch, self._position, self._loaded_workers = 0, 0, None
        self.skips = SkipLog(max_bad_fraction)      # per process: each DataLoader worker counts its own

    def state_dict(self) -> dict:
        """Resume state; "cpu_s" (this process's CPU seconds so far) is diagnostics for the benchmark only."""
        info = get_worker_info()
        return {"epoch": self._epoch, "position": self._position, "world_size": self.world_size,
                "num_workers": info.num_workers if info else 0, "cpu_s": time.process_time()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"loader state was saved with world_size={state['world_size']}, now {self.world_size}: "
                             "resume with the same number of ranks (or start the data stream afresh)")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._loaded_workers = state.get("num_workers")

    def _stages(self, epoch: int, worker: int, start: int) -> list[Stage]:
        """The whole per-worker pipeline of one epoch, in order."""
        shuffle_rng = np.random.default_rng([self.seed, epoch, self.rank, worker, _SHUFFLE_STREAM])
        rng_for = lambda pos: np.random.default_rng([self.seed, epoch, self.rank, worker, pos, _VIEW_STREAM])

        def count_and_skip(samples: Iterator[dict]) -> Iterator[dict]:
            for pos, s in enumerate(samples):
                if pos < start:                 # resume replay: raw bytes only, nothing decoded
                    continue
                self._position = pos + 1        # set before yielding: a state taken now includes this sample
                self.skips.read()
                s["__pos__"] = pos
                yield s

        stages = [tar_members(self.allow_pipe, on_skip=self.skips), group_samples(),
                  shuffle(self.shuffle_buffer if self.shuffle else 0, shuffle_rng), count_and_skip,
                  sample_views(self.sampler, rng_for, self.next_views, self.skips)]
        if self.jpeg_bytes:
            from abvid.pipeline import gpu_views
            return stages + [gpu_views.read_headers(self.skips)]       # batched in __iter__; decoded on the device
        stages.append(decode_frames(self.skips))
        if self.decode_only:
            return stages + [lambda it: ({"key": s["__key__"], "frames": len(s["__frames__"])} for s in it)]
        if self.batch_size is not None:
            return stages          # rendered in __iter__, across epoch ends
        return stages + [render_views(self.sampler, self.apply_aug)]

    def __iter__(self) -> Iterator[dict]:
        if self.batch_size is None or self.decode_only:
            return self._clips()
        if self.jpeg_bytes:
            from abvid.pipeline import gpu_views
            return self._with_skips(gpu_views.jpeg_batches(self.batch_size, _row, _stack_rows)(self._clips()))
        return self._with_skips(render_batches(self.sampler, self.apply_aug, self.batch_size)(self._clips()))

    def _with_skips(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Each batch carries ``data_skipped``: samples this reader skipped since its previous batch."""
        for batch in batches:
            batch["data_skipped"] = self.skips.take()
            yield batch

    def _clips(self) -> Iterator[dict]:
        """The endless (or one-pass) stream of clips, epoch after epoch."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 0)
        if info is not None and not self.decode_only:
            import cv2
            cv2.setNumThreads(1)     # one core per worker, as torch sets its own threads in workers
        if self._loaded_workers is not None and self._loaded_workers != num_workers:
            raise ValueError(f"loader state was saved with {self._loaded_workers} workers, now {num_workers}: "
                             "resume with the same data.workers")
        empty_epochs = 0
        while True:
            epoch, start = self._epoch, self._position
            urls = epoch_shards(self.urls, epoch=epoch, seed=self.seed, rank=self.rank,
                                world_size=self.world_size, worker=worker, num_workers=num_workers,
                                resampled=self.resampled, shuffle=self.shuffle)
            stream: Iterator = iter(urls)
            for stage in self._stages(epoch, worker, start):
                stream = stage(stream)
            produced = 0
            for sample in stream:
                produced += 1
                yield sample
            self._epoch, self._position = epoch + 1, 0
            if self.one_pass:
                return
            empty_epochs = empty_epochs + 1 if produced == 0 and start == 0 else 0
            if empty_epochs >= 10:   # an endless stream of nothing would hang the training loop silently
                raise JobError(f"worker {worker} of rank {self.rank} got no usable sample in 10 epochs in a row "
                               f"(last shards {urls[:5]}): check the SampleSkipped warnings above")


def pixel_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """Empty uint8 tensor; in shared memory inside a DataLoader worker (as default_collate allocates)."""
    if get_worker_info() is not None:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape)), 0, shape)
    return torch.empty(shape, dtype=torch.uint8)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Per-clip (n, 3, S, S) uint8 views -> (B, n, 3, S, S), channels-last in memory ((B, n, S, S, 3) underneath).

    Inside a DataLoader worker the batch is written straight into shared memory (as default_collate
    does), so it crosses to the main process without another copy. Views rendered by ``render`` are
    (S, S, 3) arrays underneath: stacking them in that layout is a plain memory copy, where making
    them channels-first here would be a transposing copy (~0.15 ms per clip).
    """
    n, c, h, w = views[0].shape
    out = pixel_buffer((len(views), n, h, w, c))
    np.stack([v.permute(0, 2, 3, 1).numpy() for v in views], out=out.numpy())
    return out.permute(0, 1, 4, 2, 3)


def collate(samples: list[dict]) -> dict:
    """List of per-clip samples (``batch_size=None``) -> the batch dict of docs/INTERFACES.md."""
    return {"global": stack_views([s["global"] for s in samples]),                      # (B, n_global, 3, G, G)
            "local": stack_views([s["local"] for s in samples]),                        # (B, n_local, 3, L, L)
            **_stack_rows(samples)}


def _stack_rows(samples: list[dict]) -> dict:
    out = _stack_view_rows(samples)
    if "next_boxes" in samples[0]:                                                      # A' targets (M per clip)
        out.update(next_boxes=torch.from_numpy(np.stack([s["next_boxes"] for s in samples])).float(),   # (B, M, 4)
                   next_frame_idx=torch.from_numpy(np.stack([s["next_frame_idx"] for s in samples])).long(),
                   next_aug=torch.from_numpy(np.stack([s["next_aug"] for s in samples])).float())  # (B, M, AUG_DIM)
    return out


def _stack_view_rows(samples: list[dict]) -> dict:
    return {
        "boxes": torch.from_numpy(np.stack([s["boxes"] for s in samples])).float(),     # (B, n, 4)
        "frame_idx": torch.from_numpy(np.stack([s["frame_idx"] for s in samples])).long(),  # (B, n)
        "time_s": torch.from_numpy(np.stack([s["time_s"] for s in samples])).float(),   # (B, n)
        "aug": torch.from_numpy(np.stack([s["aug"] for s in samples])).float(),         # (B, n, AUG_DIM)
        "key": [s["key"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "clip_id": torch.tensor([s["clip_id"] for s in samples], dtype=torch.int64),    # (B,)
    }


def _saved_workers(state: dict) -> int | None:
    """Worker count a StatefulDataLoader state was saved with (0 = main process), None if unknown."""
    if "_num_yielded" in state:                                   # single-process layout
        return 0
    main = state.get("_snapshot", {}).get("_main_snapshot", {})
    return main.get("_num_workers")


class TransitionLoader(StatefulDataLoader):
    """StatefulDataLoader that refuses, with a clear message, a state saved with another worker count."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved = _saved_workers(state_dict)
        if saved is not None and saved != self.num_workers:
            raise ValueError(f"loader state was saved with {saved} workers, this loader has {self.num_workers}: "
                             f"resume with data.workers={saved} (each worker's stream position is saved apart)")
        super().load_state_dict(state_dict)


def build_dataset(cfg: DataConfig, rank: int = 0, world_size: int = 1, one_pass: bool = False,
                  decode_only: bool = False, batch_size: int | None = None, next_views: int = 0) -> ClipDataset:
    """Expand and check the shard list (errors at start), then the dataset of one rank."""
    if cfg.seed < 0:
        raise ValueError(f"data.seed must be >= 0 (it seeds numpy SeedSequences), got {cfg.seed}")
    urls = expand_shards(cfg.shards, allow_pipe=cfg.allow_pipe)
    if one_pass or not cfg.resampled:
        check_split(len(urls), world_size, cfg.workers)
    return ClipDataset(urls, cfg.view_sampler(), seed=cfg.seed, rank=rank, world_size=world_size,
                       resampled=cfg.resampled, one_pass=one_pass, shuffle=cfg.shuffle,
                       shuffle_buffer=cfg.shuffle_buffer, allow_pipe=cfg.allow_pipe,
                       apply_aug=cfg.aug_in_loader, decode_only=decode_only, batch_size=batch_size,
                       next_views=next_views,
                       jpeg_bytes=cfg.decode_on == "device" and batch_size is not None and not decode_only,
                       max_bad_fraction=cfg.max_bad_fraction)


def build_loader(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 one_pass: bool = False, next_views: int = 0) -> StatefulDataLoader:
    """StatefulDataLoader of transition batches for one rank; ``one_pass`` for evaluation (each clip once).

    ``next_views``: fresh view parameters per clip for bootstrapping's next actions (``next_*`` batch keys;
    the objective's ``num_next_actions`` when ``gamma > 0``, else 0).

    ``cfg.pin_memory=None`` pins batches when CUDA is available; no other device logic lives in data code.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    ds = build_dataset(cfg, rank, world_size, one_pass, batch_size=batch_size, next_views=next_views)
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    return TransitionLoader(ds, batch_size=None, num_workers=cfg.workers, collate_fn=_as_is,
                            prefetch_factor=cfg.prefetch_factor if cfg.workers > 0 else None, pin_memory=pin)


def _as_is(batch: dict) -> dict:
    """collate_fn for a dataset that yields whole batches (module level: workers pickle it)."""
    return batch
