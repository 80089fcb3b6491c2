"""The Ray executor of ``abvid preprocess``: every video a task on a Ray cluster, shards written on the workers.

    abvid preprocess list.csv --out /shared/shards --executor ray [--ray-address HEAD:6379] [--retries 2]

Who does what. The driver (the process running ``run_preprocess``) holds the run lock and is the
only writer of the manifest, as with the local executor. It starts ``--workers`` ``ClipWriter``
actors (default: one per CPU of the cluster, spread over the nodes). Actor k owns the shard
sub-prefix ``<prefix>-rayNNN`` (``shardwriter.writer_prefix``; a fresh number per actor, never
reused, so two processes never share a file) and holds that prefix's lock file while it lives.
A video is one actor task: the actor runs the local executor's per-video function
(``clips.process_video``) in its own ``IsolatedPool`` child, with the same isolation (a decoder
that segfaults or runs past ``--timeout`` fails that video only), then copies the video's spool
(node-local temp disk) into its open shard in the shared output folder. A full shard follows
shardwriter.py's commit protocol up to the rename (``keep_commit``); the actor returns its rows,
and the driver appends them to the manifest and deletes the ``.commit`` file. Shard bytes never
pass through the driver.

Streaming. A task is pulled from the input stream only when an actor is free (one video in
flight per actor), so a million-line list never sits in the driver; the manifest rows do (as
with the local executor, about 0.5 KB per video).

Failures. A video that fails, crashes or hangs ends ``failed`` exactly as it does locally
(decode error / ``crash`` / ``timeout``); that is not retried. A *lost worker* (the actor's
process or its node dies, or an actor task runs ``GRACE_S`` past ``--timeout`` and is killed) is
retried: the driver first salvages the lost writer's sub-prefix (``shardwriter.recover_writer``:
replays commit files, deletes its ``.tar.tmp``), then requeues the videos of its unfinished
shard (not counted as attempts) and its in-flight video, which after ``retries`` further losses
ends ``failed`` with reason ``lost worker``. The lost actor is replaced by a new one.

Logs (logger ``abvid.preprocess``): each worker's node when it starts, each shard as it is
committed (node, videos, clips), each failure with its node, each lost worker; the summary
of ``abvid preprocess`` has a line per node. Manifest rows carry the ``node`` that decoded them.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from abvid.pipeline.clips import process_video
from abvid.pipeline.errors import JobError, UsageError
from abvid.pipeline.isolation import IsolatedPool
from abvid.pipeline.manifest import ROW_FIELDS, Manifest, manifest_row
from abvid.pipeline.shardwriter import ShardWriter, lock_file, recover_writer, writer_numbers, writer_prefix

log = logging.getLogger("abvid.preprocess")

LOST = "lost worker"
GRACE_S = 60.0                  # an actor task this far past --timeout is stuck (in I/O, say): killed, counted lost
CONNECT_TIMEOUT_S = 5.0
WORKER_PID_ENV = "ABVID_WORKER_PID"   # set in each actor: lets test fault hooks kill the worker, not the child


# ----------------------------------------------------------------------------- connecting

@dataclass
class Cluster:
    """A connection to Ray; ``close`` shuts Ray down only if ``connect`` started it."""
    ray: Any
    started: bool

    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def connect(address: str = "") -> Cluster:
    """Join the Ray cluster at ``address`` (``""``: RAY_ADDRESS, else start a local one; ``"auto"``; host:port).

    Raises ``UsageError`` when Ray is not installed or the cluster does not answer.
    """
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'abvid[ray]' (or pip install 'ray>=2.9')") from None
    addr = address or ("" if ray.is_initialized() else os.environ.get("RAY_ADDRESS", ""))
    if addr and addr != "auto":
        _check_answers(addr)
    if ray.is_initialized():   # a library caller (or a test) joined a cluster already: use that one
        return Cluster(ray, False)
    try:
        ray.init(address=addr or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise UsageError(f"Ray cluster {addr or '(local)'} could not be joined: {e}; start one with "
                         f"`ray start --head`, or fix --ray-address / RAY_ADDRESS") from e
    return Cluster(ray, True)


def _check_answers(address: str) -> None:
    """Fail fast (seconds, not Ray's minute of retries) when nothing listens at host:port."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected host:port (e.g. 10.0.0.1:6379), 'auto', or "
                         f"ray://host:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"Ray cluster at {address} does not answer ({e}); start it with `ray start --head "
                         f"--port {port}` on {host}, or fix --ray-address / RAY_ADDRESS") from None


# ----------------------------------------------------------------------------- the worker side

class _Committed:
    """Stands in for the manifest inside an actor: collects the rows of shards it closed."""

    def __init__(self):
        self.rows: list[list[dict]] = []

    def append(self, rows: list[dict]) -> None:
        self.rows.append(list(rows))

    def take(self) -> list[list[dict]]:
        out, self.rows = self.rows, []
        return out


class ClipWriter:
    """One worker slot (a Ray actor): decodes videos in an isolated child, packs their clips into its own shards."""

    def __init__(self, out_dir: str, prefix: str, cfg, threads: int):
        from abvid.pipeline.preprocess import PRELOAD

        self.out, self.prefix = Path(out_dir), prefix
        self.lock = lock_file(self.out / f".{prefix}.lock")
        if self.lock is None:
            raise RuntimeError(f"{self.out}: shard prefix {prefix} is locked by another writer")
        self.host = socket.gethostname()
        self.spool_dir = Path(tempfile.mkdtemp(prefix=f"abvid-{prefix}-"))   # node-local
        self.committed = _Committed()
        self.writer = ShardWriter(self.out, prefix, self.committed, 0, cfg.shard_clips, cfg.shard_bytes,
                                  keep_commit=True)
        os.environ[WORKER_PID_ENV] = str(os.getpid())   # inherited by the pool's forkserver and children
        self.pool = IsolatedPool(process_video, (cfg, threads), n=1, timeout_s=cfg.timeout_s, preload=PRELOAD)

    def where(self) -> str:
        return self.host

    def process(self, task: dict) -> dict:
        """Decode one video into the open shard; returns its row and the rows of any shard closed meanwhile."""
        spool = self.spool_dir / "video.spool"
        res = list(self.pool.run(iter([{**task, "spool": str(spool)}])))[0]
        row = manifest_row(res["path"], **{k: v for k, v in res.items() if k in ROW_FIELDS})
        row["node"] = self.host     # the child's, unless it died before saying
        appended = row["status"] == "ok" and row["clips"] > 0
        if appended:
            row["shards"] = [self.writer.append(spool, row["clips"], row)]
        spool.unlink(missing_ok=True)
        return {"row": row, "appended": appended, "committed": self.committed.take(), "host": self.host}

    def flush(self) -> list[list[dict]]:
        """Close the open shard (the next video opens a new one); returns the rows of the shards closed."""
        self.writer.close()
        return self.committed.take()

    def close(self) -> None:
        """Release the prefix: spool folder gone, lock file removed and unlocked (after ``flush``)."""
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        (self.out / f".{self.prefix}.lock").unlink(missing_ok=True)
        self.lock.close()


# ----------------------------------------------------------------------------- the driver side

@dataclass
class _Slot:
    actor: Any
    prefix: str
    where: Any = None                     # ObjectRef of the actor's host name, answered when it starts
    host: str = "?"
    ref: Any = None                       # the in-flight task's ObjectRef
    task: dict | None = None
    started: float = 0.0
    pending: dict[str, dict] = field(default_factory=dict)   # path -> task: in the open shard, not committed


def run_tasks(cluster: Cluster, tasks: Iterator[dict], cfg, out: Path, prefix: str, manifest: Manifest,
              rows: dict[str, dict], bar):
    """Run ``tasks`` on the cluster's actors; rows go into ``rows`` and the manifest; returns ``preprocess.Done``."""
    from abvid.pipeline.preprocess import Done, count_node, show

    ray = cluster.ray
    n = min(cfg.workers or cluster.cpus(), cluster.cpus())
    done = Done(workers=n)
    remote = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")(ClipWriter)
    numbers = itertools.count(max(writer_numbers(out, prefix), default=-1) + 1)
    redo: deque[dict] = deque()            # videos to run again (lost worker), before new ones
    attempts: dict[str, int] = {}
    state = {"source_frames": 0, "failed": 0, "lost": 0, "since_progress": 0}
    t0 = time.perf_counter()

    def new_slot() -> _Slot:
        p = writer_prefix(prefix, next(numbers))
        actor = remote.remote(str(out), p, cfg, cfg.threads or 1)
        return _Slot(actor, p, where=actor.where.remote())

    def finish(row: dict) -> None:
        rows[row["path"]] = row
        count_node(done.by_node, row)

    def commit(slot: _Slot, shard_rows: list[dict]) -> None:
        manifest.append(shard_rows)
        name = shard_rows[0]["shards"][0]
        (out / f"{name}.commit").unlink(missing_ok=True)
        for r in shard_rows:
            finish(r)
            slot.pending.pop(r["path"], None)
        done.shards.append(name)
        done.bytes += (out / name).stat().st_size
        log.info("node %s: %s wrote %s (%d videos, %d clips)", slot.host, slot.prefix, name, len(shard_rows),
                 sum(r["clips"] for r in shard_rows))

    def lost(slot: _Slot, error: BaseException) -> None:
        if slot.host == "?":   # died before its first video ended: its start-up answer may still name the node
            try:
                slot.host = ray.get(slot.where, timeout=1.0)
            except Exception:  # noqa: BLE001 - it never started: the node stays unknown
                pass
        state["lost"] += 1
        state["since_progress"] += 1
        if state["since_progress"] > max(3, 2 * n):
            raise JobError(f"Ray workers keep dying before finishing a video ({state['since_progress']} in a row; "
                           f"last: {error}); check that abvid is installed on every node and --out is shared")
        salvaged = recover_writer(out, slot.prefix, manifest, rows, wait_s=GRACE_S)
        requeue = [t for path, t in slot.pending.items() if rows.get(path, {}).get("status") != "ok"]
        log.warning("node %s: worker %s lost (%s); %d uncommitted videos requeued%s", slot.host, slot.prefix,
                    str(error).splitlines()[0][:200], len(requeue),
                    "" if salvaged else f"; its lock is still held, the next run cleans {slot.prefix}")
        redo.extend(requeue)
        bar.update(-len(requeue))
        if slot.task is not None:
            t = slot.task
            attempts[t["path"]] = attempts.get(t["path"], 0) + 1
            if attempts[t["path"]] > cfg.retries:
                row = manifest_row(t["path"], status="failed", reason=LOST, node=slot.host,
                                   error=f"{t['path']}: its Ray worker was lost {attempts[t['path']]} times "
                                         f"(last on node {slot.host}: {str(error).splitlines()[0][:300]}); "
                                         f"rerun with --retry-failed")
                manifest.append([row])
                finish(row)
                state["failed"] += 1
                show(bar, state, t0)
            else:
                redo.appendleft(t)
        ray.kill(slot.actor, no_restart=True)
        slots[slots.index(slot)] = new_slot()

    def handle(slot: _Slot) -> None:
        ref, slot.ref = slot.ref, None
        try:
            res = ray.get(ref)
        except LOST_ERRORS as e:
            lost(slot, e)
            return
        except ray.exceptions.RayTaskError as e:   # the actor itself raised: writing the shard failed
            raise JobError(f"worker {slot.prefix} on node {slot.host} failed: {str(e).splitlines()[-1]}; fix it "
                           f"and rerun the same command to resume") from None
        task, slot.task, slot.host = slot.task, None, res["host"]
        state["since_progress"] = 0
        row = res["row"]
        state["source_frames"] += row.get("source_frames", 0)
        if res["appended"]:
            slot.pending[row["path"]] = task
        else:
            manifest.append([row])
            finish(row)
            if row["status"] == "failed":
                state["failed"] += 1
                log.info("node %s: %s failed (%s)", slot.host, row["path"], row.get("reason", ""))
        for shard_rows in res["committed"]:
            commit(slot, shard_rows)
        show(bar, state, t0, lost=state["lost"])

    def next_task() -> dict | None:
        return redo.popleft() if redo else next(tasks, None)

    LOST_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                   ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)
    slots = [new_slot() for _ in range(n)]
    log.info("ray: %d workers (cluster CPUs %d, nodes %d), shards under %s-rayNNN in %s", n, cluster.cpus(),
             len([x for x in ray.nodes() if x.get("Alive")]), prefix, out)
    try:
        while True:
            exhausted = False
            while True:
                for slot in slots:
                    if slot.ref is None and not exhausted:
                        t = next_task()
                        if t is None:
                            exhausted = True
                            continue
                        slot.task, slot.started = t, time.monotonic()
                        slot.ref = slot.actor.process.remote(t)
                busy = [s for s in slots if s.ref is not None]
                if not busy:
                    break
                ready, _ = ray.wait([s.ref for s in busy], num_returns=1, timeout=1.0)
                for s in [s for s in busy if s.ref in ready]:
                    handle(s)
                if cfg.timeout_s:
                    for s in [s for s in busy if s.ref is not None and s.ref not in ready]:
                        if time.monotonic() - s.started > cfg.timeout_s + GRACE_S:
                            ray.kill(s.actor, no_restart=True)   # its ref now raises: handled as lost
            # every video ran: close the open shards; a worker lost now requeues its videos for another round
            for slot in list(slots):
                try:
                    for shard_rows in ray.get(slot.actor.flush.remote()):
                        commit(slot, shard_rows)
                    slot.pending.clear()
                except LOST_ERRORS as e:
                    slot.task = None
                    lost(slot, e)
            if not redo:
                break
        ray.get([slot.actor.close.remote() for slot in slots])
    finally:
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)
    done.source_frames = state["source_frames"]
    return done
