"""Batches onto the training device, one step ahead on a side CUDA stream, with exact loader states.

    feed = DeviceFeed(loader, device, on_device=transform, epoch=0)
    feed.start()                       # iter(loader): it draws the loader's seeds from the global RNG
    batch, epoch = feed.next()         # on the device, usable on the current stream
    state = feed.loader_state()        # the resume point after the last batch next() returned

On CUDA, ``next()`` hands out batch k and, before returning, starts batch k+1 on a side stream:
the copy of its pinned, channels-last CPU memory (``non_blocking``) and ``on_device`` (GPU decoding
and rendering, pipeline/gpu_views.py, or GPU augmentation). That work overlaps step k; the current
stream waits for it with an event, never the host, and every tensor made on the side stream is
``record_stream``-ed on the current one so the allocator does not reuse its memory early.

Exact resume: the loader has then yielded one batch more than the loop used, so its
``state_dict()`` would skip a batch on resume. The feed snapshots the loader's state right after
fetching each batch and :meth:`loader_state` returns the one of the last batch handed out. An
epoch's end is not prefetched: ``iter(loader)`` for the next pass runs inside ``next()``, at the
same point of the program as without prefetching, so the RNG draws it makes stay in order.

On CPU (the default there, or ``prefetch=False``) ``next()`` fetches, copies and transforms
synchronously, which is what the loop did before this module existed; ``prefetch=True`` on CPU
looks one batch ahead without a stream (tests/test_prefetch.py checks the bookkeeping that way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's top-level tensors on ``device`` (non-blocking from pinned memory); the rest as is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _record(obj: Any, stream: torch.cuda.Stream) -> None:
    """``record_stream`` every CUDA tensor in a (nested) batch."""
    if torch.is_tensor(obj):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record(v, stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record(v, stream)


@dataclass
class _Ready:
    batch: dict
    epoch: int
    state: Any                         # loader state right after this batch was fetched (prefetching only)
    event: Any                         # torch.cuda.Event recorded after its transfer, or None


class DeviceFeed:
    """Loader -> device batches (see the module docstring). ``on_device(batch)`` runs on the device batch."""

    def __init__(self, loader: Any, device: torch.device, on_device: Callable[[dict], dict] | None = None,
                 epoch: int = 0, prefetch: bool | None = None):
        self.loader, self.device, self.on_device, self.epoch = loader, torch.device(device), on_device, epoch
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        # a side stream on CUDA; prefetching on CPU only looks one batch ahead (tests the bookkeeping)
        self._stream = torch.cuda.Stream(self.device) if self.prefetch and self.device.type == "cuda" else None
        self._it: Iterator | None = None
        self._ready: _Ready | None = None
        self._state: Any = None

    def start(self) -> None:
        self._it = iter(self.loader)

    def _fetch(self, new_epoch: bool) -> tuple[dict, int] | None:
        """The next CPU batch and its epoch; at a pass's end, the next pass only if ``new_epoch``."""
        try:
            return next(self._it), self.epoch
        except StopIteration:
            if not new_epoch:
                return None
        self._it = iter(self.loader)
        self.epoch += 1
        try:
            return next(self._it), self.epoch
        except StopIteration:
            raise RuntimeError("the loader yielded no batch in a whole pass: check data.shards "
                               "(and that each rank gets at least one shard)") from None

    def _launch(self, cpu_batch: dict, epoch: int) -> _Ready:
        state = self.loader.state_dict() if self.prefetch and hasattr(self.loader, "state_dict") else None
        if self._stream is None:
            batch = to_device(cpu_batch, self.device)
            return _Ready(self.on_device(batch) if self.on_device else batch, epoch, state, None)
        with torch.cuda.stream(self._stream):
            batch = to_device(cpu_batch, self.device)
            if self.on_device is not None:
                batch = self.on_device(batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _Ready(batch, epoch, state, event)

    def next(self) -> tuple[dict, int]:
        """(device batch, its epoch); a finished pass starts the next one. An empty pass is an error."""
        ready, self._ready = self._ready, None
        if ready is None:                                  # first batch, or the first of a new pass
            ready = self._launch(*self._fetch(new_epoch=True))
        self._state = ready.state
        if self.prefetch:
            upcoming = self._fetch(new_epoch=False)
            if upcoming is not None:
                self._ready = self._launch(*upcoming)      # overlaps the step about to run on `ready`
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready.event)
            _record(ready.batch, current)
        return ready.batch, ready.epoch

    def loader_state(self) -> Any:
        """The loader's resume state after the last batch handed out (None for a loader without one)."""
        if not hasattr(self.loader, "state_dict"):
            return None
        if self.prefetch and self._state is not None:
            return self._state
        return self.loader.state_dict()
