"""A process pool where one task cannot take the run down: crashes and hangs fail that task only.

``multiprocessing.Pool`` hangs when a worker segfaults and ``ProcessPoolExecutor``
breaks the whole pool (``BrokenProcessPool``); decoders of untrusted video do both.
``IsolatedPool`` gives each worker process its own pipe and one task at a time, and
waits on the pipes, the process sentinels and the earliest deadline together:

* a worker that dies mid-task yields ``{"status": "failed", "reason": "crash",
  "error": "decoder crashed (signal SIGSEGV)"}`` and is replaced;
* a task running past ``timeout_s`` gets its worker SIGKILLed and yields
  ``"reason": "timeout"``, ``"error": "timed out after 30 s"``; the worker is replaced.

A task's clock starts when its worker has received it and says so, not when it was sent: a
fresh worker's start-up (a cold forkserver importing the preload, a child re-importing the
parent's ``__main__``, seconds on a loaded node) is not the video's fault. A worker that
never says so is failed after ``START_S`` more.

Workers run ``fn(task, *args) -> dict`` (``fn`` importable at module level). They are
started with ``forkserver`` by default: safe with torch / threads in the parent (no
fork of a threaded process), and a replacement forks from the warm server in a few ms.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from multiprocessing.connection import wait
from typing import Callable, Iterator

START_METHOD = "forkserver"
STARTED = "started"      # what a worker sends when it takes a task: the task's clock starts then
START_S = 30.0           # a worker this long past the task's timeout without taking it is failed as timed out


def _serve(conn, fn: Callable[..., dict], args: tuple) -> None:
    """Worker loop: receive a task, send back ``{**task, **fn(task, *args)}``; ``None`` or EOF ends it."""
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(STARTED)
        conn.send({**task, **fn(task, *args)})


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"decoder crashed (signal {name})"
    return (f"worker process exited unexpectedly (exit code {exitcode}; its stderr has the cause, e.g. a script "
            f"starting workers without the if __name__ == '__main__': guard)")


class _Worker:
    def __init__(self, ctx, fn, args):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn, args), daemon=True)
        self.proc.start()
        child.close()
        self.task: dict | None = None
        self.started = 0.0
        self.running = False   # the worker has said it took the task (its clock restarted then)

    def stop(self, kill: bool = False) -> None:
        if self.proc.is_alive():
            if kill:
                self.proc.kill()
            else:
                try:
                    self.conn.send(None)
                except OSError:
                    self.proc.kill()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class IsolatedPool:
    """``n`` isolated workers; ``run(tasks)`` yields one result dict per task, in completion order."""

    def __init__(self, fn: Callable[..., dict], args: tuple = (), n: int = 1, timeout_s: float = 0,
                 start_method: str = START_METHOD, preload: list[str] | None = None):
        self.fn, self.args, self.n, self.timeout_s = fn, args, max(1, n), timeout_s
        self.ctx = mp.get_context(start_method)
        if start_method == "forkserver" and preload:
            self.ctx.set_forkserver_preload(preload)
        self.workers: list[_Worker] = []
        self.replaced = 0

    def run(self, tasks: Iterator[dict], may_start: Callable[[], bool] = lambda: True) -> Iterator[dict]:
        """Feed ``tasks`` to free workers while ``may_start()`` (a back-pressure hook) is true."""
        tasks = iter(tasks)
        exhausted = False
        try:
            while True:
                for w in [w for w in self.workers if w.task is None and not w.proc.is_alive()]:
                    self._replace(w, kill=True)   # died while idle: not any task's fault
                for w in self.workers:
                    if w.task is None and not exhausted and may_start():
                        task = next(tasks, None)
                        if task is None:
                            exhausted = True
                            break
                        self._start(w, task)
                if not exhausted and may_start() and len(self.workers) < self.n:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                    else:
                        self.workers.append(w := _Worker(self.ctx, self.fn, self.args))
                        self._start(w, task)
                        continue
                busy = [w for w in self.workers if w.task is not None]
                if not busy:
                    if exhausted:
                        return
                    if not may_start():
                        raise RuntimeError("IsolatedPool: may_start() is false with no task running")
                    continue
                yield from self._collect(busy)
        finally:
            self.close()

    def _start(self, w: _Worker, task: dict) -> None:
        w.task, w.started, w.running = task, time.monotonic(), False
        try:
            w.conn.send(task)
        except OSError:  # the idle worker died: the collector reports it and replaces it
            pass

    def _deadline(self, w: _Worker) -> float:
        return w.started + self.timeout_s + (0.0 if w.running else START_S)

    def _collect(self, busy: list[_Worker]) -> Iterator[dict]:
        timeout = None
        if self.timeout_s:
            timeout = max(0.0, min(self._deadline(w) for w in busy) - time.monotonic())
        ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout))
        for w in busy:
            task = w.task
            if w.conn in ready or w.proc.sentinel in ready:
                result, broken = self._receive(w)
                if result is not None:
                    w.task = None
                    yield result
                    continue
                if not broken and w.proc.sentinel not in ready:
                    continue                      # it only said it took the task
                w.proc.join(5)
                self._replace(w, kill=True)
                yield {**task, "status": "failed", "reason": "crash", "error": _death_reason(w.proc.exitcode)}
            elif self.timeout_s and time.monotonic() >= self._deadline(w):
                error = (f"timed out after {self.timeout_s:g} s" if w.running else
                         f"timed out: the worker did not take the task within {self.timeout_s + START_S:g} s")
                self._replace(w, kill=True)
                yield {**task, "status": "failed", "reason": "timeout", "error": error}

    @staticmethod
    def _receive(w: _Worker) -> tuple[dict | None, bool]:
        """What ``w`` has sent: (its result or None, whether its pipe broke); a start notice restarts its clock."""
        while w.conn.poll():
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                return None, True
            if msg == STARTED:
                w.running, w.started = True, time.monotonic()
                continue
            return msg, False
        return None, False

    def _replace(self, w: _Worker, kill: bool) -> None:
        """Stop ``w``; a fresh worker is started when the next task needs one."""
        w.stop(kill=kill)
        self.workers.remove(w)
        self.replaced += 1

    def close(self) -> None:
        for w in self.workers:
            w.stop(kill=w.task is not None)
        self.workers = []
