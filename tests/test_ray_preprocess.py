"""pipeline/ray_preprocess.py on a real local Ray (one module-scoped ``ray.init(num_cpus=2)``, no mocks).

Ray keys and frame bytes equal the local executor's (toy corpus plus the broken inputs of
test_preprocess.py); a crashing or hanging video fails alone; a lost worker is retried, then
reported; killing the driver mid-run and rerunning loses and duplicates nothing; the local and
the Ray executor resume each other; a cluster address that does not answer is exit 2.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from _faults import make_audio_only, truncate
from conftest import make_video
from test_preprocess import _frame_digests, manifest, read_shards

from abvid.pipeline.preprocess import PreprocessConfig, run_preprocess, video_id
from abvid.tools.cli import main as cli_main

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(Path(__file__).resolve().parent)
CFG = PreprocessConfig(fps=4.0, size=48, clip_len=4, shard_clips=5, timeout_s=6.0, decode_hook="_faults:hook")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module; its workers can import tests/_faults.py (the decode hook)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, old) if p)
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _videos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    return [make_video(folder / f"v{seed + i}.mp4", fps=10, num_frames=25 + 5 * i, width=96, height=64, seed=seed + i)
            for i in range(n)]


def _statuses(out: Path) -> dict[str, tuple]:
    return {Path(p).name: (r["status"], r.get("reason", ""), r["clips"]) for p, r in manifest(out).items()}


def test_ray_writes_the_local_executors_keys_and_bytes_and_bad_videos_fail_alone(tmp_path, cluster):
    from abvid.tools.toy_corpus import make_toy_corpus
    v = tmp_path / "in"
    good = make_toy_corpus(v / "toy", videos=3, seconds=2.5, size=(96, 64), seed=1) + _videos(v, 2)
    bad = {"truncated": truncate(good[3], v / "truncated.mp4"), "zero": v / "zero.mp4", "text": v / "text.mp4",
           "audio": make_audio_only(v / "audio.mp4"), "missing": v / "missing.mp4",
           "hang": make_video(v / "hang.mp4", fps=10, num_frames=30, width=96, height=64, seed=7),
           "crash": make_video(v / "crash.mp4", fps=10, num_frames=30, width=96, height=64, seed=8)}
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not a video\n" * 10)
    Path(f"{bad['hang']}.hang").touch()
    Path(f"{bad['crash']}.crash").touch()
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in [*good, *bad.values()]) + "\n")
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    stats = {k: run_preprocess([str(tmp_path / "list.txt")], o, replace(CFG, executor=k, workers=2), progress=False)
             for k, o in outs.items()}
    assert _frame_digests(outs["ray"]) == _frame_digests(outs["local"])     # same keys, same frame and JSON bytes
    assert len(read_shards(outs["ray"])) == stats["ray"].clips == stats["local"].clips > 0
    assert _statuses(outs["ray"]) == _statuses(outs["local"])
    rows = manifest(outs["ray"])
    assert "timed out after 6 s" in rows[str(bad["hang"])]["error"]
    assert "crashed (signal SIGSEGV)" in rows[str(bad["crash"])]["error"]
    assert {Path(p).name for p, r in rows.items() if r["status"] == "ok"} == {p.name for p in good}
    assert all(s.startswith("shard-ray") for r in rows.values() for s in r["shards"])
    assert rows[str(good[0])]["node"] == socket.gethostname()
    assert (stats["ray"].ok, stats["ray"].failed, stats["ray"].failures_by_reason) == \
        (stats["local"].ok, stats["local"].failed, stats["local"].failures_by_reason)
    assert stats["ray"].by_node[socket.gethostname()]["videos"] == len(good) + len(bad) - 1   # missing: never sent
    assert not list(outs["ray"].glob("*.tmp")) and not list(outs["ray"].glob("*.commit"))
    assert not list(outs["ray"].glob(".shard-ray*.lock"))   # writers released their prefixes


def test_local_and_ray_runs_resume_each_other(tmp_path, cluster):
    vids = _videos(tmp_path / "in", 6)
    for p in vids:
        Path(f"{p}.calls").touch()
    clean = tmp_path / "clean"
    run_preprocess([str(p) for p in vids], clean, replace(CFG, decode_hook=""), progress=False)
    out = tmp_path / "out"
    run_preprocess([str(p) for p in vids[:2]], out, replace(CFG, executor="ray"), progress=False)
    s = run_preprocess([str(p) for p in vids[:4]], out, CFG, progress=False)            # local resumes ray's
    assert (s.resumed, s.ok) == (2, 4)
    s = run_preprocess([str(p) for p in vids], out, replace(CFG, executor="ray"), progress=False)  # and back
    assert (s.resumed, s.ok) == (4, 6)
    assert [Path(f"{p}.calls").read_text().count("decoded") for p in vids] == [1] * 6     # none decoded twice
    assert _frame_digests(out) == _frame_digests(clean)                                  # no key lost or doubled
    assert {r["status"] for r in manifest(out).values()} == {"ok"}


def test_a_lost_worker_is_retried_then_reported(tmp_path, cluster):
    vids = _videos(tmp_path / "in", 5)
    Path(f"{vids[1]}.lose-once").touch()     # the worker dies once on this video: the retry succeeds
    Path(f"{vids[3]}.lose").touch()          # dies every time: failed after the retries
    cfg = replace(CFG, executor="ray", retries=1, shard_clips=100)   # one open shard per worker: losses take it along
    out = tmp_path / "out"
    stats = run_preprocess([str(p) for p in vids], out, cfg, progress=False)
    rows = manifest(out)
    assert rows[str(vids[3])]["status"] == "failed" and rows[str(vids[3])]["reason"] == "lost worker"
    assert "lost 2 times" in rows[str(vids[3])]["error"]
    assert [rows[str(p)]["status"] for i, p in enumerate(vids) if i != 3] == ["ok"] * 4
    assert stats.failures_by_reason == {"lost worker": 1}
    keys = read_shards(out)                  # asserts no key in two shards
    assert {k.rsplit("-", 1)[0] for k in keys} == {video_id(str(p)) for i, p in enumerate(vids) if i != 3}
    assert len(keys) == stats.clips and not list(out.glob("*.tmp")) and not list(out.glob("*.commit"))


def _cli(out: Path, inputs: list[str], address: str) -> list[str]:
    return [sys.executable, "-m", "abvid.tools.cli", "preprocess", *inputs, "--out", str(out), "--size", "48",
            "--clip-len", "2", "--shard-clips", "2", "--executor", "ray", "--ray-address", address, "--no-progress"]


@pytest.mark.slow
def test_killing_the_driver_mid_run_then_rerunning_loses_and_doubles_nothing(tmp_path, cluster):
    vids = [str(p) for p in _videos(tmp_path / "in", 8)]
    clean = tmp_path / "clean"
    run_preprocess(vids, clean, PreprocessConfig(fps=4.0, size=48, clip_len=2, shard_clips=2), progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": TESTS}
    p = subprocess.Popen(_cli(out, vids, cluster), cwd=ROOT, start_new_session=True, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-ray*.tar")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    finished = p.poll() is not None
    os.killpg(p.pid, signal.SIGKILL)          # the driver only: the cluster and its workers live on
    p.wait()
    assert not finished, "the run ended before the first shard was seen"
    rows = manifest(out) if (out / "manifest.jsonl").exists() else {}
    assert sum(r["status"] == "ok" for r in rows.values()) < 8
    r = subprocess.run(_cli(out, vids, cluster), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _frame_digests(out) == _frame_digests(clean)       # every clip once, same bytes
    assert {r["status"] for r in manifest(out).values()} == {"ok"} and len(manifest(out)) == 8
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.commit"))


def test_a_cluster_address_that_does_not_answer_is_a_usage_error(tmp_path, capsys):
    with socket.socket() as s:               # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    video = make_video(tmp_path / "v.mp4", fps=10, num_frames=20, width=96, height=64)
    t0 = time.monotonic()
    rc = cli_main(["preprocess", str(video), "--out", str(tmp_path / "out"), "--executor", "ray",
                   "--ray-address", f"127.0.0.1:{port}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"127.0.0.1:{port} does not answer" in err and "ray start --head" in err, err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out").exists()
    rc = cli_main(["preprocess", str(video), "--out", str(tmp_path / "out"), "--ray-address", "x:1", "--no-progress"])
    assert rc == 2 and "--executor ray" in capsys.readouterr().err
