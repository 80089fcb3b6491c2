"""SIGTERM / SIGINT during training: finish the step, save a checkpoint, exit 128+signal (train/loop.py).

torchrun forwards SIGTERM to every worker and SIGKILLs them 30 s later, so one step plus one
checkpoint write must fit in that window. A second SIGINT raises ``KeyboardInterrupt`` at once.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("abvid.train")


class StopFlag:
    """SIGTERM / SIGINT handler: remember the signal; the loop saves and exits at the step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if hasattr(signal, "SIGTERM") and in_main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
