"""pipeline/isolation.py: a crash or a hang fails its task only, and a task's clock starts when its worker takes it.

The workers are real forkserver processes. A slow start-up is made by an argument that takes
seconds to unpickle in the child (as a cold forkserver or a re-imported ``__main__`` does on a
loaded node); before the start notice, such a start counted against the task's timeout.
"""
from __future__ import annotations

import os
import signal
import time

from abvid.pipeline import isolation
from abvid.pipeline.isolation import IsolatedPool


def _work(task: dict, _start_arg: float) -> dict:   # _start_arg: the pool args (a SlowToArrive delays start-up)
    if task.get("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(task.get("sleep", 0.0))
    return {"status": "ok", "pid": os.getpid()}


def _slow_float(value: float, wait_s: float) -> float:
    time.sleep(wait_s)
    return value


class SlowToArrive(float):
    """A float that takes ``wait_s`` to unpickle: a worker process that is slow to start."""

    def __new__(cls, value: float, wait_s: float):
        obj = super().__new__(cls, value)
        obj.wait_s = wait_s
        return obj

    def __reduce__(self):
        return _slow_float, (float(self), self.wait_s)


def _run(pool: IsolatedPool, tasks: list[dict]) -> dict[int, dict]:
    return {r["seq"]: r for r in pool.run(iter(tasks))}


def test_a_slow_worker_start_does_not_count_against_the_tasks_timeout():
    pool = IsolatedPool(_work, (SlowToArrive(0.0, 2.0),), n=1, timeout_s=1.0)
    t0 = time.monotonic()
    out = _run(pool, [{"seq": 0}, {"seq": 1}])
    assert [out[i]["status"] for i in (0, 1)] == ["ok", "ok"], out
    assert out[0]["pid"] == out[1]["pid"]              # one worker served both
    assert time.monotonic() - t0 >= 2.0                  # its start really took longer than the timeout


def test_a_hanging_task_times_out_alone_and_its_worker_is_replaced():
    pool = IsolatedPool(_work, (0.0,), n=2, timeout_s=1.0)
    out = _run(pool, [{"seq": 0, "sleep": 60.0}, {"seq": 1}, {"seq": 2}])
    assert (out[0]["status"], out[0]["reason"], out[0]["error"]) == ("failed", "timeout", "timed out after 1 s")
    assert [out[i]["status"] for i in (1, 2)] == ["ok", "ok"]
    assert pool.replaced == 1


def test_a_crashing_task_fails_alone():
    pool = IsolatedPool(_work, (0.0,), n=1, timeout_s=10.0)
    out = _run(pool, [{"seq": 0, "crash": True}, {"seq": 1}])
    assert (out[0]["status"], out[0]["reason"]) == ("failed", "crash")
    assert "SIGSEGV" in out[0]["error"]
    assert out[1]["status"] == "ok"


def test_a_worker_that_never_takes_its_task_is_failed_after_the_start_allowance(monkeypatch):
    monkeypatch.setattr(isolation, "START_S", 0.5)
    pool = IsolatedPool(_work, (SlowToArrive(0.0, 30.0),), n=1, timeout_s=0.5)
    t0 = time.monotonic()
    out = _run(pool, [{"seq": 0}])
    assert (out[0]["status"], out[0]["reason"]) == ("failed", "timeout")
    assert out[0]["error"] == "timed out: the worker did not take the task within 1 s"
    assert time.monotonic() - t0 < 20.0


def test_without_a_timeout_a_slow_start_is_waited_for():
    pool = IsolatedPool(_work, (SlowToArrive(0.0, 1.0),), n=1, timeout_s=0.0)
    assert _run(pool, [{"seq": 0}])[0]["status"] == "ok"
