"""The CLI's error contract, row by row, through the real `abvid` in a subprocess (issue 13).

Every expected failure ends with one line on stderr, ``abvid <command>: ...``, that names the
file, key or option at fault, and the exit code of docs/INTERFACES.md: 2 usage, 3 job failed.
No traceback reaches stderr. An unexpected exception (a bug) is one line naming a log file that
holds the traceback, exit 3; ``--debug`` prints the traceback instead.

One module-scoped folder holds every input the rows need (tiny shards, an exported encoder,
random bytes, broken YAML, a short video, an embeddings folder), so each row costs one
interpreter start. Rows marked ``# scale`` are implemented on the branch that reworks
preprocess and embed (issue 13's rows about them).
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_video, write_test_shards  # noqa: E402

TINY_MODEL = ["model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", "model.embed_dim=32",
              "model.depth=2", "model.num_heads=2"]
TINY = ["data.workers=0", "data.shuffle_buffer=4", "data.global_size=32", "data.local_size=16", "data.n_local=2",
        "objective.name=simclr", "objective.bootstrap=false", "objective.proj_dim=16", "objective.proj_hidden_dim=32",
        "train.batch_size=4", "train.device=cpu", "train.threads=1", "train.steps=0", *TINY_MODEL]


def _sets(*kv: str) -> list[str]:
    return [a for k in kv for a in ("--set", k)]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """The working folder of every row (the rows run with it as the current directory)."""
    import torch

    from abvid.model import build_encoder
    from abvid.model.io import save_encoder
    d = tmp_path_factory.mktemp("cli_errors")
    write_test_shards(d / "shards", videos=4, clips_per_video=2, clip_len=4, shard_clips=2)   # 4 shards
    torch.manual_seed(0)
    kw = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    save_encoder(build_encoder(**kw), kw, d / "enc.safetensors")
    (d / "rand.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "afile").write_text("not a folder\n")
    (d / "bad.yaml").write_text("train:\n  steps: [1, 2\n")
    (d / "tab.yaml").write_text("train:\n\tsteps: 3\n")
    (d / "tiny.yaml").write_text("data:\n  shards: shards\n")
    make_video(d / "short" / "short.mp4", fps=10, num_frames=8, width=64, height=48)   # 0.8 s: 4 frames at 4 fps
    # an embeddings folder whose every video has its own label (the "one label per video")
    emb = d / "emb"
    emb.mkdir()
    np.save(emb / "embeddings.npy", np.random.default_rng(1).normal(size=(24, 8)).astype(np.float32))
    with (emb / "index.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["row", "video_id", "source", "frame_index", "pts_s"])
        wr.writerows([i, f"v{i // 4}_0123abcd", f"/data/v{i // 4}.mp4", i % 4, (i % 4) * 0.25] for i in range(24))
    (d / "one_per_video.csv").write_text("video,label\n" + "".join(f"v{v}.mp4,class{v}\n" for v in range(6)))
    (d / "labels_bad.csv").write_text("video,start,end\nv0.mp4,0,1\n")
    # shards where every JPEG is garbage: past data.max_bad_fraction the run stops (exit 3)
    bad = d / "badshards"
    write_test_shards(bad, videos=4, clips_per_video=4, clip_len=4, shard_clips=4)
    for shard in sorted(bad.glob("*.tar")):
        _rewrite(shard, lambda name, data: b"\xff\xd8 not a jpeg" if name.endswith(".jpg") else data)
    # a command module whose main raises: the stand-in for a bug anywhere in abvid
    (d / "boom_cmd.py").write_text('"""A command that fails the way a bug does."""\n'
                                   "def add_arguments(p):\n    pass\n\n"
                                   "def main(args):\n    return {}['no such key']\n")
    return d


def _rewrite(shard: Path, fn) -> None:
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            data = fn(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def abvid(w: Path, *argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`abvid ARGV` in ``w``, as a user runs it (no GPU visible, so device rows behave the same everywhere)."""
    e = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ABVID_LOG_DIR": str(w / "logs"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "abvid.tools.cli", *argv], cwd=w, env=e, capture_output=True,
                          text=True, timeout=timeout)


# The table, through a fresh `abvid` process each: (id, argv, exit code, text the last stderr line names)
ROWS = [
    ("yaml-syntax", ["pretrain", "bad.yaml", "--out", "r1"], 2, "bad.yaml is not valid YAML"),
    ("yaml-tab", ["pretrain", "tab.yaml", "--out", "r1"], 2, "line 2, column 1"),
    ("pretrain-out-file", ["pretrain", "tiny.yaml", "--out", "afile", *_sets(*TINY)], 2, "afile"),
    ("embed-out-file", ["embed", "--checkpoint", "enc.safetensors", "shards", "--out", "afile"], 2,  # scale
     "afile"),
    ("preprocess-out-file", ["preprocess", "short", "--out", "afile"], 2, "afile"),                  # scale
    ("embed-ckpt-random", ["embed", "--checkpoint", "rand.pt", "shards", "--out", "e1"], 2, "rand.pt"),
    ("embed-ckpt-folder", ["embed", "--checkpoint", "shards", "shards", "--out", "e1"], 2, "shards is a folder"),
    ("export-ckpt-random", ["export", "rand.pt", "--out", "x.safetensors"], 2, "rand.pt"),
    ("export-ckpt-folder", ["export", "shards", "--out", "x.safetensors"], 2, "shards is a folder"),
    ("one-pass-too-few-shards", ["pretrain", "tiny.yaml", "--out", "r4",
                                 *_sets(*TINY, "data.resampled=false", "data.workers=8")], 2, "data.workers <= 4"),
    ("train-device-cuda", ["pretrain", "tiny.yaml", "--out", "r5", *_sets(*TINY, "train.device=cuda")], 2,
     "train.device=cuda"),
    ("embed-device-cuda", ["embed", "--checkpoint", "enc.safetensors", "shards", "--out", "e2", "--device",  # scale
                           "cuda"], 2, "cuda"),
    ("embed-size-50", ["embed", "--checkpoint", "enc.safetensors", "shards", "--out", "e3", "--size", "50"],  # scale
     2, "--size 50"),
    ("preprocess-clips-too-short", ["preprocess", "short", "--out", "p2", "--clip-len", "16"], 3,      # scale
     "--clip-len"),
    ("preprocess-missing-input", ["preprocess", "no_such_video.mp4", "--out", "p1"], 2,                # scale
     "no_such_video.mp4"),
    ("probe-one-label-per-video", ["probe", "--embeddings", "emb", "--labels", "one_per_video.csv"], 2,
     "one video only"),
    # beyond the table: bad training data (item 5) and init_from weights of another shape (item 4)
    ("too-much-bad-data", ["pretrain", "tiny.yaml", "--out", "r6",
                           *_sets(*TINY, "data.shards=badshards", "train.steps=2", "data.workers=1")], 3,
     "data.max_bad_fraction"),     # raised in a DataLoader worker: still one line, no traceback
    ("init-from-shape", ["pretrain", "tiny.yaml", "--out", "r3",
                         *_sets(*TINY, "model.init_from=enc.safetensors", "model.embed_dim=64")], 2, "model.embed_dim"),
]

# More mistakes, through the same `abvid` entry point in this process (no interpreter start per row: the
# suite has to stay fast on two cores); the same three checks.
IN_PROCESS = [
    ("unknown-key", ["pretrain", "--set", "train.stesp=3", "--out", "r1"], 2, "Did you mean 'steps'"),
    ("bad-value", ["pretrain", "--set", "train.steps=many", "--out", "r1"], 2, "train.steps"),
    ("no-shards", ["pretrain", "--out", "r1", *_sets("train.steps=1")], 2, "data.shards is empty"),
    ("missing-shards", ["pretrain", "--out", "r1", *_sets("data.shards=nowhere")], 2, "nowhere"),
    ("pretrain-out-under-file", ["pretrain", "tiny.yaml", "--out", "afile/run", *_sets(*TINY)], 2, "afile"),
    ("export-out-not-safetensors", ["export", "enc.safetensors", "--out", "enc.pt"], 2, ".safetensors"),
    ("export-ckpt-missing", ["export", "nope.pt", "--out", "x.safetensors"], 2, "nope.pt does not exist"),
    ("init-from-missing", ["pretrain", "tiny.yaml", "--out", "r2", *_sets(*TINY, "model.init_from=nope.pt")], 2,
     "model.init_from=nope.pt"),
    ("inspect-missing", ["inspect", "nothing_here"], 2, "nothing_here"),
    ("probe-missing-embeddings", ["probe", "--embeddings", "no_emb", "--labels", "one_per_video.csv"], 2,
     "abvid embed"),
    ("probe-bad-labels", ["probe", "--embeddings", "emb", "--labels", "labels_bad.csv"], 2, "labels_bad.csv"),
    ("unknown-option", ["export", "enc.safetensors", "--out", "x.safetensors", "--colour"], 2, "--colour"),
    ("bad-toy-size", ["toy-corpus", "toy", "--size", "big"], 2, "--size"),
]


def _check(code: int, stderr: str, want_code: int, culprit: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == want_code, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert lines and lines[-1].startswith("abvid"), lines[-3:]       # argparse: 'abvid ...: error: ...'
    assert culprit in lines[-1], lines[-3:]


@pytest.fixture(scope="module")
def ran(w) -> dict[str, subprocess.CompletedProcess]:
    """Every row's process, three at a time (each is mostly an interpreter start and torch import)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        futures = {row[0]: pool.submit(abvid, w, *row[1]) for row in ROWS}
    return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("row, code, culprit", [(r[0], r[2], r[3]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_every_mistake_is_one_clear_line_and_its_exit_code(ran, row, code, culprit):
    _check(ran[row].returncode, ran[row].stderr, code, culprit)


@pytest.mark.parametrize("argv, code, culprit", [r[1:] for r in IN_PROCESS], ids=[r[0] for r in IN_PROCESS])
def test_more_mistakes_in_process(w, monkeypatch, capsys, argv, code, culprit):
    from abvid.tools.cli import main
    monkeypatch.chdir(w)
    try:
        rc = main(list(argv))
    except SystemExit as e:           # argparse's own errors
        rc = e.code
    _check(rc, capsys.readouterr().err, code, culprit)


def test_a_bug_is_one_line_naming_a_log_with_the_traceback(w):
    runner = ("import sys; sys.path.insert(0, '.'); from abvid.tools import cli; "
              "cli.COMMANDS['boom'] = ('boom_cmd', 'fails'); sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ABVID_LOG_DIR": str(w / "crash")}
    r = subprocess.run([sys.executable, "-c", runner, "boom"], cwd=w, env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "unexpected error (a bug in abvid" in line and "KeyError" in line and "--debug" in line
    [log] = list((w / "crash").glob("abvid-crash-boom-*.log"))
    assert str(log) in line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "no such key" in text and "command line: abvid boom" in text
    r = subprocess.run([sys.executable, "-c", runner, "--debug", "boom"], cwd=w, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 3 and "Traceback (most recent call last)" in r.stderr and "boom_cmd.py" in r.stderr


def test_version(w):
    r = abvid(w, "--version")
    assert r.returncode == 0 and r.stdout.startswith("abvid ") and r.stdout.split()[1][0].isdigit()


def test_pretrain_without_out_uses_runs_config_stem_and_a_rerun_resumes(w):
    """`abvid pretrain CFG` twice: the same folder, runs/<config stem>; the second run resumes it."""
    first = abvid(w, "pretrain", "tiny.yaml", *_sets(*TINY))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run folder runs/tiny" in first.stderr
    assert (w / "runs" / "tiny" / "checkpoints" / "ckpt-00000000.pt").is_file()
    again = abvid(w, "pretrain", "tiny.yaml", *_sets(*TINY))
    assert again.returncode == 0 and "run already complete" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["run_dir"] == "runs/tiny"
    # ... and a rerun that changes what is learned is refused, naming the key (exit 2, one line)
    changed = abvid(w, "pretrain", "tiny.yaml", *_sets(*TINY, "objective.simclr_temp=0.5"))
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "objective.simclr_temp: 0.1 -> 0.5" in changed.stderr.strip().splitlines()[-1]
