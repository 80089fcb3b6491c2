"""``abvid pretrain`` on the real stack: tiny shards -> StatefulDataLoader -> ViT objective -> loop.

Must-show tests of issue 5: SIGKILL + resume repeats the uninterrupted losses
(model, optimizer, EMA, RNG and loader state together), a 2-process gloo DDP
run trains on disjoint data, SIGTERM saves and exits 143, ``train.steps=0``
writes an untrained checkpoint, the tiny_cpu config's loss falls (slow).
Settings are tiny (width 32, depth 2, 32 px views, batch 4) to stay fast on 2 cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from abvid.train.checkpoint import list_checkpoints, load_checkpoint
from abvid.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_test_shards  # noqa: E402
from test_dist import free_port  # noqa: E402

TINY = ["data.workers=1", "data.shuffle_buffer=8", "data.global_size=32", "data.local_size=16", "data.n_local=2",
        "model.arch=vit_tiny", "model.patch_size=8", "model.img_size=32", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "objective.name=dino", "objective.num_prototypes=32", "objective.head_hidden_dim=64",
        "objective.head_bottleneck_dim=16", "objective.decoder_dim=32", "objective.decoder_depth=1",
        "objective.decoder_heads=2", "train.batch_size=4", "train.lr=0.001", "train.scale_lr=false",
        "train.warmup_steps=2", "train.teacher_temp_warmup_steps=4", "train.log_every=1", "train.ckpt_every=4",
        "train.device=cpu", "train.threads=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_test_shards(out, videos=4, clips_per_video=4, clip_len=8, shard_clips=4)
    return out


def cli(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "abvid.tools.cli", "pretrain", "--out", str(run_dir), "--set",
            f"data.shards={shards}"]
    for kv in TINY + list(extra):
        args += ["--set", kv]
    return args


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r}


def test_steps_zero_writes_untrained_checkpoint(shards, tmp_path):
    r = subprocess.run(cli(shards, tmp_path, "train.steps=0"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000000.pt")
    assert ck["step"] == 0 and ck["encoder_kwargs"]["embed_dim"] == 32
    assert any(k.startswith("teacher_encoder.") for k in ck["model"])
    assert (tmp_path / "config.yaml").read_text().count("embed_dim: 32") == 1


CLIP = ["objective.name=clip", "objective.bootstrap=false", "objective.proj_dim=16", "objective.proj_hidden_dim=32",
        "objective.text_embed_dim=16", "train.ckpt_every=2"]


def test_clip_resume_keeps_the_runs_vocabulary_when_the_shards_gain_words(tmp_path):
    """data.shards may change on resume (more shards); CLIP's word table must not be renumbered then."""
    data = tmp_path / "shards"
    write_test_shards(data, videos=2, clips_per_video=2, shard_clips=4, labels=("red", "blue"))
    run = tmp_path / "run"
    r = subprocess.run(cli(data, run, *CLIP, "train.steps=2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (run / "clip_texts.txt").read_text().split() == ["blue", "red"]
    (new,) = write_test_shards(tmp_path / "more", videos=2, clips_per_video=2, shard_clips=4,
                               labels=("green", "yellow cat"))
    new.rename(data / "shard-000100.tar")          # the corpus grew: two more words than the run started with
    r = subprocess.run(cli(data, run, *CLIP, "train.steps=4"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and sorted(losses(run)) == [1, 2, 3, 4]
    assert (run / "clip_texts.txt").read_text().split() == ["blue", "red"]
    r = subprocess.run(cli(data, tmp_path / "fresh", *CLIP, "train.steps=0"), capture_output=True, text=True,
                       timeout=120)                # a new run reads the grown corpus
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fresh" / "clip_texts.txt").read_text().splitlines() == ["blue", "green", "red", "yellow cat"]


def test_clip_vocabulary_from_a_file_and_a_missing_file_named(tmp_path):
    from abvid.pipeline.config import ConfigError
    from abvid.train.config import PretrainConfig
    from abvid.train.objectives import ObjectiveConfig
    from abvid.train.pretrain import clip_vocab_texts

    texts = tmp_path / "captions.txt"
    texts.write_text("a dog on grass\n\n  a cat  \na dog on grass\n", encoding="utf-8")
    cfg = PretrainConfig(objective=ObjectiveConfig(name="clip", clip_texts=str(texts)))
    run = tmp_path / "run"
    assert clip_vocab_texts(cfg, run, resume=True, is_main=True) == ["a cat", "a dog on grass"]
    texts.write_text("something else\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-00000002.pt").touch()       # resuming from a checkpoint: the run's own strings
    assert clip_vocab_texts(cfg, run, resume=True, is_main=True) == ["a cat", "a dog on grass"]
    assert clip_vocab_texts(cfg, run, resume=False, is_main=True) == ["something else"]
    texts.write_text("a third\n")
    (run / "checkpoints" / "ckpt-00000002.pt").unlink()      # no checkpoint to fit: made afresh
    assert clip_vocab_texts(cfg, run, resume=True, is_main=True) == ["a third"]
    cfg = PretrainConfig(objective=ObjectiveConfig(name="clip", clip_texts=str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match="nope.txt.*one label or caption per line"):
        clip_vocab_texts(cfg, tmp_path / "run2", resume=True, is_main=True)


def test_sigkill_then_resume_repeats_uninterrupted_losses(shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    steps = ["train.steps=14"]
    r = subprocess.run(cli(shards, full, *steps), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(cli(shards, part, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(part / "checkpoints") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)                   # for real: no handler, no final checkpoint
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    resumed_from = load_checkpoint(list_checkpoints(part / "checkpoints")[-1])["step"]
    assert 0 < resumed_from < 14
    r = subprocess.run(cli(shards, part, *steps), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"at step {resumed_from}" in r.stderr and "resuming from" in r.stderr
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 15))
    for step in range(1, 15):   # steps before the kill: two fresh runs agree; after: the resume does
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_sigterm_saves_and_exits_143(shards, tmp_path):
    proc = subprocess.Popen(cli(shards, tmp_path, "train.steps=10000", "train.ckpt_every=10000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(read_metrics(tmp_path / "metrics.jsonl")) < 2 if (tmp_path / "metrics.jsonl").exists() else True:
        assert proc.poll() is None and time.time() < deadline, "run ended or hung before any step was logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted"
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert ck["step"] == summary["step"] >= 2


def _ddp_worker(rank: int, world: int, port: int, shards: str, run_dir: str, extra: tuple = ()) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from abvid.model import encoder_kwargs
    from abvid.pipeline.loader import build_loader
    from abvid.pipeline.config import load_config, to_dict
    from abvid.train import dist
    from abvid.train.config import PretrainConfig
    from abvid.train.loop import seed_everything, train
    from abvid.train.objectives import build_objective

    torch.set_num_threads(1)
    # resampled=false: each epoch is a permutation of the shards split across ranks; 4 steps x 2 clips = the
    # 8 clips of one rank's epoch, so the ranks' clips must be disjoint.
    cfg = load_config(PretrainConfig, None, [f"data.shards={shards}", *TINY, "data.workers=0", "data.resampled=false",
                                             "train.steps=4", "train.batch_size=2", "train.ckpt_every=2", *extra])
    ctx = dist.init("cpu", timeout_s=120)
    try:
        seed_everything(cfg.train.seed)
        obj = build_objective(cfg.objective, cfg.model)
        seen: list[str] = []
        loss_fn = obj.loss
        obj.loss = lambda batch, teacher_temp=None: (seen.extend(batch["key"]), loss_fn(batch, teacher_temp))[1]
        before = {k: v.clone() for k, v in obj.state_dict().items()}
        loader = build_loader(cfg.data, cfg.train.batch_size, rank=ctx.rank, world_size=ctx.world_size)
        s = train(obj, loader, cfg.train, run_dir, ctx, to_dict(cfg), encoder_kwargs(cfg.model))
        changed = any(not torch.equal(before[k], v) for k, v in obj.state_dict().items()
                      if k.startswith("student_encoder."))
        torch.save({"keys": seen, "summary_step": s["step"], "changed": changed,
                    # buffers too: the heads' BatchNorm running stats come from the global batch
                    "state": {k: v.detach() for k, v in obj.state_dict().items()}},
                   f"{run_dir}/rank{rank}.pt")
    finally:
        dist.shutdown(ctx)


@pytest.mark.parametrize("extra", [(), ("objective.name=simclr", "objective.bootstrap=true", "objective.proj_dim=16",
                                       "objective.proj_hidden_dim=64", "objective.proj_norm=bn")], ids=["ab_dino", "ab_simclr_gathered"])
def test_ddp_two_ranks_gloo_train_on_disjoint_data(shards, tmp_path, extra):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(shards), str(tmp_path), extra), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["summary_step"] == r1["summary_step"] == 4 and r0["changed"] and r1["changed"]
    assert len(r0["keys"]) == len(r1["keys"]) == len(set(r0["keys"])) == 4 * 2
    assert not set(r0["keys"]) & set(r1["keys"]), "ranks read overlapping clips"
    assert any("running_mean" in k for k in r0["state"])
    for k, v in r0["state"].items():                       # DDP kept student and EMA teacher in lockstep
        assert torch.allclose(v.float(), r1["state"][k].float(), atol=1e-6), k
    ck = load_checkpoint(tmp_path / "checkpoints" / "ckpt-00000004.pt")
    assert ck["loader_state"]["world_size"] == 2 and len(ck["loader_state"]["ranks"]) == 2
    assert len(ck["rng"]["ranks"]) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 5))


@pytest.mark.slow
def test_torchrun_cli_two_processes(shards, tmp_path):
    """The documented launch form: torchrun ... -m abvid.tools.cli pretrain (env:// rendezvous, gloo)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "abvid.tools.cli", "pretrain", "--out", str(tmp_path), "--set", f"data.shards={shards}"]
    for kv in TINY + ["train.steps=4", "data.workers=0"]:
        args += ["--set", kv]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert ck["step"] == 4 and ck["rng"]["world_size"] == 2


@pytest.mark.slow
def test_tiny_cpu_config_loss_falls(tmp_path):
    """examples/configs/tiny_cpu.yaml on a 16-video toy corpus, 100 of its 300 steps: loss falls, no collapse."""
    abvid = [sys.executable, "-m", "abvid.tools.cli"]
    corpus, shards = tmp_path / "corpus", tmp_path / "shards"
    for args in (["toy-corpus", str(corpus), "--videos", "16", "--seed", "0"],
                 ["preprocess", str(corpus), "--out", str(shards), "--fps", "4", "--size", "64", "--clip-len", "8",
                  "--shard-clips", "16", "--no-progress"]):
        r = subprocess.run(abvid + args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(abvid + ["pretrain", str(ROOT / "examples/configs/tiny_cpu.yaml"), "--out", str(tmp_path / "run"),
                                "--set", f"data.shards={shards}", "--set", "train.steps=100"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "event" not in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.15, (first, last)
    assert min(r["grad_norm"] for r in rows[-3:]) > 0.1, "gradients vanished: the features collapsed"


@pytest.mark.gpu
def test_bf16_autocast_step_on_cuda(shards, tmp_path):
    from abvid.model import encoder_kwargs
    from abvid.pipeline.loader import build_loader
    from abvid.pipeline.config import load_config, to_dict
    from abvid.train import dist
    from abvid.train.config import PretrainConfig
    from abvid.train.loop import seed_everything, train
    from abvid.train.objectives import build_objective

    cfg = load_config(PretrainConfig, None, [f"data.shards={shards}", *TINY, "train.device=cuda", "train.amp=true",
                                             "train.steps=3"])
    seed_everything(0)
    obj = build_objective(cfg.objective, cfg.model)
    ctx = dist.DistContext(0, 1, 0, torch.device("cuda", 0), None)
    s = train(obj, build_loader(cfg.data, 4), cfg.train, tmp_path, ctx, to_dict(cfg), encoder_kwargs(cfg.model))
    assert s["status"] == "completed" and s["step"] == 3 and s["final_loss"] == s["final_loss"]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in obj.parameters())   # autocast, not a bf16 model
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert all(not v.is_cuda for v in ck["model"].values())                       # loadable on CPU-only hosts


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_step_on_cuda(shards, tmp_path):
    r = subprocess.run(cli(shards, tmp_path, "train.device=cuda", "train.compile=true", "train.steps=3"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 3


@pytest.mark.gpu
def test_torchrun_nccl_ddp_on_one_gpu(shards, tmp_path):
    """torchrun with one process per GPU: NCCL init, DDP with device_ids, NCCL object gathers for the checkpoint."""
    n = max(1, min(torch.cuda.device_count(), 2))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "abvid.tools.cli", "pretrain", "--out", str(tmp_path), "--set", f"data.shards={shards}"]
    for kv in TINY + ["train.steps=4", "train.device=cuda", "data.workers=0"]:
        args += ["--set", kv]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert ck["step"] == 4 and ck["rng"]["world_size"] == n


def test_view_sizes_checked_against_the_patch_grid_before_training(shards, tmp_path):
    from abvid.pipeline.config import ConfigError, load_config
    from abvid.train.config import PretrainConfig, check_sizes

    def cfg(*extra):
        return load_config(PretrainConfig, None, [f"data.shards={shards}", *TINY, *extra])

    assert check_sizes(cfg()) == []
    with pytest.raises(ConfigError, match=r"data.local_size=12 is not a multiple of model.patch_size=8.*=16"):
        check_sizes(cfg("data.local_size=12"))
    assert check_sizes(cfg("data.local_size=12", "data.n_local=0")) == []        # no local views: not used
    (warning,) = check_sizes(cfg("data.global_size=48"))
    assert "model.img_size=32 differs from data.global_size=48" in warning
    r = subprocess.run(cli(shards, tmp_path / "run", "data.global_size=36"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "data.global_size=36 is not a multiple of model.patch_size=8" in r.stderr
    # the action's dt table must reach the largest |dt| between two views (2 x data.max_dt when symmetric)
    with pytest.raises(ConfigError, match=r"objective.max_dt=5 is below the largest \|dt\| between two views \(8"):
        check_sizes(cfg("data.max_dt=4", "objective.max_dt=5", "objective.bootstrap=true"))
    assert check_sizes(cfg("data.max_dt=4", "objective.max_dt=8", "objective.bootstrap=true")) == []
    assert check_sizes(cfg("data.max_dt=4", "objective.max_dt=0", "objective.bootstrap=true")) == []   # derived


@pytest.mark.slow
def test_compiled_step_on_cpu_matches_eager(shards, tmp_path):
    """train.compile=true end to end (inductor on CPU: ~1 min of compiling on 2 cores; needs a C++ compiler,
    as torch.compile on CPU does) gives eager's losses."""
    runs = {}
    for mode in ("false", "true"):
        r = subprocess.run(cli(shards, tmp_path / mode, f"train.compile={mode}", "train.steps=3"),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[mode] = losses(tmp_path / mode)
    assert sorted(runs["true"]) == [1, 2, 3]
    for step, loss in runs["false"].items():
        assert runs["true"][step] == pytest.approx(loss, rel=1e-4)
