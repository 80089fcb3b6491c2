"""Frame selection without decoding: the resampling rule and the packet skip plan.

Pure Python (no ``av`` / ``decord``): pipeline/video.py feeds these with pts it reads, and
tests drive them with synthetic pts.

Selection rule (tests/test_video.py reimplements it as the reference)
    Given frame times t_j in presentation order (exact ``Fraction`` seconds) and t0 the
    first one, for target ``fps``:
      * slot k = 0, 1, ... has time T_k = t0 + k / fps, and exists iff T_k <= t_last;
      * slot k takes the frame whose pts is nearest to T_k; on a tie, the earlier frame.
    So the chosen pts is within half a local frame interval of T_k. A source slower than
    ``fps`` repeats frames, so ``index / fps`` stays an exact time axis for the loader.
    ``fps=None`` keeps every frame. No source fps is needed: VFR and missing rates work.

:class:`Resampler` applies the rule to a stream of (t, item); :class:`SkipPlanner` applies
it to packet pts in decode order to mark the packets whose frames can be chosen, so the
decoder may skip the others; :func:`output_size` is the scaled frame size.
"""
from __future__ import annotations

import collections
import heapq
from fractions import Fraction
from typing import Any, Iterator


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(w, h) with the shorter side scaled to ``short_side`` and the aspect kept; None keeps it."""
    if short_side is None:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


class Resampler:
    """The selection rule, streaming: ``push(t, item)`` with non-decreasing t returns the
    (slot, t, item) chosen for every slot the new frame decides; holds one previous item."""

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0 or None, got {fps}")
        self.step = None if fps is None else 1 / Fraction(fps).limit_denominator(1_000_000)
        self.t0: Fraction | None = None
        self.k = 0
        self.prev: tuple[Fraction, Any] | None = None

    def push(self, t: Fraction, item: Any) -> list[tuple[int, Fraction, Any]]:
        out = []
        if self.step is None:
            self.k += 1
            return [(self.k - 1, t, item)]
        if self.t0 is None:
            self.t0 = t
        while (tk := self.t0 + self.k * self.step) <= t:
            if self.prev is not None and tk - self.prev[0] <= t - tk:
                out.append((self.k, *self.prev))
            else:
                out.append((self.k, t, item))
            self.k += 1
        self.prev = (t, item)
        return out


class SkipPlanner:
    """Marks, from packet pts alone, the packets whose frames the selection rule can use.

    Packets come in decode order; a heap of ``LOOKAHEAD`` packets (more than H.264's reorder
    depth) sorts their pts for a :class:`Resampler`. A packet is *needed* when its pts is
    chosen for a slot or is the first or last shown pts (packets flagged discard, before an
    edit list's start, are decoded but not planned); the others are decoded with
    ``skip_frame=NONREF`` (dropped only if no frame references them). The decoded subset
    holds every slot's nearest frame and the first and last frames, so selecting over it
    gives the same frames as over all. Missing pts, disorder beyond the lookahead or a decode
    error switch planning off (all needed); near a corrupt packet a neighbouring frame may
    be picked instead of the one a full decode would give.
    """

    LOOKAHEAD = 16

    def __init__(self, fps: float | None, time_base: Fraction, enabled: bool):
        self.enabled = enabled and fps is not None
        self._res, self._tb = Resampler(fps), time_base
        self._heap: list[tuple[Fraction, int]] = []          # (pts, seq) not yet in pts order
        self._fifo: collections.deque = collections.deque()   # (seq, packet), decode order
        self._needed: set[int] = set()
        self._final: set[int] = set()                          # seqs whose status is decided
        self._seq, self._prev, self._last_t = 0, None, None

    def push(self, packet) -> Iterator[tuple[Any, bool]]:
        """Feed a packet (None or empty = end of stream); yields (packet, needed), decode order."""
        if packet is None or packet.size == 0:
            while self._heap:
                self._sorted(*heapq.heappop(self._heap))
            if self._prev is not None:                         # the last frame is always needed
                self._needed.add(self._prev)
                self._final.add(self._prev)
            yield from self._release(everything=True)
            if packet is not None:
                yield packet, True
            return
        seq, self._seq = self._seq, self._seq + 1
        self._fifo.append((seq, packet))
        self.enabled &= packet.pts is not None
        if getattr(packet, "is_discard", False):   # before an edit list's start: never shown,
            self._final.add(seq)                    # decoded in full, not part of the pts grid
            self._needed.add(seq)
        elif self.enabled:
            heapq.heappush(self._heap, (Fraction(packet.pts) * self._tb, seq))
            if len(self._heap) > self.LOOKAHEAD:
                self._sorted(*heapq.heappop(self._heap))
        yield from self._release(everything=not self.enabled)

    def _sorted(self, t: Fraction, seq: int) -> None:
        """Next pts in presentation order."""
        if self._last_t is not None and t < self._last_t:      # reordered beyond the lookahead
            self.enabled = False
            return
        if self._prev is None:
            self._needed.add(seq)                              # first frame: t0 of the grid
        else:
            self._final.add(self._prev)                        # prev's fate is now decided
        self._needed.update(chosen for _, _, chosen in self._res.push(t, seq))
        self._prev, self._last_t = seq, t

    def _release(self, everything: bool) -> Iterator[tuple[Any, bool]]:
        while self._fifo and (everything or self._fifo[0][0] in self._final):
            seq, packet = self._fifo.popleft()
            self._final.discard(seq)
            yield packet, (not self.enabled) or seq in self._needed
            self._needed.discard(seq)
