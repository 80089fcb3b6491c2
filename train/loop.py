"""The pre-training loop: data, forward/backward, clip, step, schedules, EMA, logging, checkpoint.

    abvid pretrain examples/configs/tiny_cpu.yaml --out runs/tiny           # CPU or one GPU
    torchrun --nproc-per-node 8 -m abvid.tools.cli pretrain CONFIG --out RUN  # DDP, one or many nodes

The loop only sequences steps (DINOv2's ``SSLMetaArch`` split): the objective
module owns student, EMA teacher and losses and is called as
``objective.loss(batch, teacher_temp=t) -> (loss, metrics)`` and
``objective.update_teacher(momentum)``; nothing here knows about DINO or value
functions. One code path for every setting:

* **devices**: fp32 on CPU; bf16 autocast on CUDA (``train.amp``), no grad
  scaler needed for bf16, and TF32 for the fp32 matmuls left (the objectives' logits);
  optional ``torch.compile`` per module or of the whole loss call (train/compile.py).
* **DDP** when torchrun sets ``WORLD_SIZE`` (``train.strategy=auto|ddp``): the loss call is
  wrapped in ``DistributedDataParallel``. The EMA teacher lives in the same objective but
  has ``requires_grad=False``, so DDP neither reduces nor re-broadcasts it;
  it stays identical on all ranks because the student does and the EMA is
  deterministic (it is broadcast from rank 0 once at start). Each rank builds
  its loader with ``rank, world_size`` and reads different shards.
* **FSDP2** with ``train.strategy=fsdp`` (train/fsdp.py): student and teacher sharded per ViT
  block, the EMA on the shards; checkpoints gathered to the same plain dict DDP writes (every
  rank takes part in ``save``), restored shard by shard, so a run may resume under the other
  strategy. ``train.activation_checkpointing`` recomputes student blocks in backward.
* **resume**: a checkpoint is a plain dict (``train/checkpoint.py``) and a
  resumed run goes through the same code as a fresh one: build everything,
  then load the dict (model + EMA, optimizer, step, epoch, each rank's loader
  and RNG state). A resolved config that differs from the run's in any key but
  ``SAFE_TO_CHANGE`` (how long, how often, where) is refused with the keys named:
  a rerun with another ``objective.gamma`` must not quietly continue the old run. Schedules are pure functions of the step. With the same
  world size a resumed run on CPU repeats an uninterrupted run's losses
  exactly (tested); RNG and loader states of a different world size are not
  restored (a warning says so).
* **signals**: SIGTERM/SIGINT set a flag; the loop finishes its step, saves a
  checkpoint and returns ``status="interrupted"`` (the CLI exits 128+signal so
  schedulers can requeue). A second SIGINT raises ``KeyboardInterrupt``.
  torchrun forwards SIGTERM to every worker and SIGKILLs them 30 s later, so
  one step plus one checkpoint write must fit in that window.
* **BatchNorm** in heads: global-batch statistics over every rank
  (``model/heads.BatchNormAnyShape``, SyncBatchNorm's rule); the running stats
  are therefore the same on every rank.
* **NaN/inf guard**: a step with a non-finite loss or gradient norm (any rank)
  is skipped (no optimizer, EMA or family-state update: DINO's centre moves in
  ``update_teacher``, after the check), logged as an ``event`` row, and
  ``train.max_bad_steps`` of them in a row stop the run (``status="diverged"``,
  CLI exit 3).

Layout: ``train_step`` is one step (forward, backward, clip, guard, update);
``_Bookkeeping`` records metrics, bad-step streaks and progress; ``_resume`` and
``_saver`` read and write checkpoints; ``train`` sequences them. Building the
objective and loader from a config is ``train/pretrain.py``.

Determinism: every rank seeds python/numpy/torch with ``train.seed`` before
the objective is built (identical init), then ``seed + rank``. CPU runs with
the same thread count are bit-reproducible; ``train.deterministic`` also turns
on ``torch.use_deterministic_algorithms(warn_only=True)`` and sets
``CUBLAS_WORKSPACE_CONFIG`` for CUDA (slower; some CUDA ops have no
deterministic kernel and only warn). Changing ``train.threads`` changes CPU
reduction order and so the low bits of the losses.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from abvid.train import compile as tcompile
from abvid.train import dist, fsdp
from abvid.train.checkpoint import CheckpointError, capture_rng, load_latest, restore_rng, save_checkpoint
from abvid.train.metrics import IntervalMeter, MetricsWriter, setup_logging, to_floats
from abvid.train.optim import build_optimizer, set_hparams
from abvid.train.prefetch import DeviceFeed
from abvid.train.schedules import cosine, linear, scaled_lr, warmup_cosine
from abvid.train.signals import StopFlag

log = logging.getLogger("abvid.train")
VIEW_KEYS = ("global", "local")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class _LossCall(nn.Module):
    """``forward`` = ``objective.loss``, so DDP's hooks run and ``torch.compile`` sees one function."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(batch, teacher_temp=teacher_temp)


def count_views(batch: dict) -> int:
    """Views in a batch: ``B * n`` summed over the ``global``/``local`` tensors (B when neither exists)."""
    n = sum(int(batch[k].shape[0] * batch[k].shape[1]) for k in VIEW_KEYS if k in batch and batch[k].ndim >= 2)
    if n == 0:
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        n = int(first.shape[0]) if first is not None else 0
    return n


# Keys a resumed run may change: they alter how long, how often or where a run goes, not what it learns.
# Any other difference between the run's saved config and the resolved one refuses the resume.
SAFE_TO_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_last", "train.max_bad_steps",
                  "train.threads", "train.device", "train.compile", "train.compile_scope", "train.compile_cache",
                  "train.strategy", "train.activation_checkpointing", "train.deterministic",
                  "data.prefetch_factor", "data.pin_memory", "data.shards", "data.allow_pipe", "data.decode_on")


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees, as 'key: old -> new'.

    A key the old tree lacks is a setting added to abvid after that run started: the run used its
    behaviour before it existed, which new keys keep as their default, so it is not a difference.
    """
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in old:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _start_over(run_dir: Path) -> None:
    """``--no-resume``: move old checkpoints aside (never delete them) so auto-resume cannot pick them up."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        aside = run_dir / f"checkpoints.{time.strftime('%Y%m%d-%H%M%S')}"
        ckpt_dir.rename(aside)
        log.warning("--no-resume: moved the old checkpoints to %s", aside)


@dataclass
class Resumed:
    """Where a run starts: step 0 with nothing loaded, or the state of a checkpoint."""
    step: int = 0
    epoch: int = 0
    rng: dict | None = None               # this rank's RNG state, restored once the loader iterates
    path: Path | None = None              # the checkpoint it came from


def _resume(objective: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, ckpt_dir: Path,
            ctx: dist.DistContext, config: dict, sharded: bool = False) -> Resumed:
    """Load the newest readable checkpoint into objective, optimizer and loader; refuse a changed config.

    Every rank reads the file; ``sharded`` (FSDP) keeps each rank's shard of the full tensors."""
    found = load_latest(ckpt_dir, map_location="cpu")
    if found is None:
        return Resumed()
    state, path = found
    changed = [d for d in config_diff(state.get("config") or {}, config)
               if d.split(":")[0] not in SAFE_TO_CHANGE]
    if changed:
        raise CheckpointError(
            f"{path.parent.parent} holds a run with another config; differing keys: {'; '.join(changed[:8])}"
            f"{' ...' if len(changed) > 8 else ''}. Resume with the run's own config ({path.parent.parent}/"
            f"config.yaml), or use another --out or --no-resume to start over. Keys that may change on resume: "
            f"{', '.join(SAFE_TO_CHANGE)}")
    try:
        fsdp.load_model_state(objective, state["model"], sharded)
        fsdp.load_optimizer_state(optimizer, state["optimizer"], sharded)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit the model built from this config; use another --out, or "
                              f"--no-resume to start over: {e}") from e
    out = Resumed(int(state["step"]), int(state["epoch"]), None, path)
    same_world = (state.get("rng") or {}).get("world_size") == ctx.world_size
    loader_state = state.get("loader_state")
    if same_world:
        if loader_state is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(loader_state["ranks"][ctx.rank])
        out.rng = state["rng"]["ranks"][ctx.rank]
    else:
        log.warning("checkpoint was written with world size %s, now %d: loader and RNG states are not "
                    "restored (data order differs from an uninterrupted run)",
                    (state.get("rng") or {}).get("world_size"), ctx.world_size)
    safe = config_diff(state.get("config") or {}, config)
    log.info("resuming from %s at step %d (epoch %d)%s", path, out.step, out.epoch,
             "; config changes: " + "; ".join(safe) if safe else "")
    return out


def _write_config(run_dir: Path, config: dict) -> None:
    tmp = run_dir / "config.yaml.tmp"
    try:
        import yaml
        text = yaml.safe_dump(config, sort_keys=False)
    except ImportError:  # bare GPU host without PyYAML (gpu_check.sh): JSON is valid YAML
        text = json.dumps(config, indent=2)
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")


@dataclass(frozen=True)
class Hparams:
    """The scheduled values of one step (pure functions of the step, train/schedules.py)."""
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float

    @classmethod
    def at(cls, step: int, tc: Any, base_lr: float) -> "Hparams":
        return cls(lr=warmup_cosine(step, base_lr, tc.min_lr, tc.steps, tc.warmup_steps),
                   weight_decay=cosine(step, tc.weight_decay, tc.weight_decay_end, tc.steps),
                   momentum=cosine(step, tc.momentum, tc.momentum_end, tc.steps),
                   teacher_temp=linear(step, tc.teacher_temp, tc.teacher_temp_end, tc.teacher_temp_warmup_steps))


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    bad: bool                 # non-finite loss or gradient on some rank: nothing was updated
    stop: bool                # some rank got SIGTERM / SIGINT
    metrics: dict[str, float]


def train_step(model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer, params: list,
               batch: dict, hp: Hparams, clip_grad: float, ctx: dist.DistContext, autocast: Callable[[], Any],
               stop_requested: bool) -> StepOutcome:
    """Forward, backward, clip; then optimizer step and teacher/state update unless any rank went non-finite.

    The teacher update (EMA and family state such as DINO's centre) comes after the finiteness check, so a
    bad step changes nothing that later steps read.
    """
    set_hparams(optimizer, hp.lr, hp.weight_decay)
    with autocast():
        loss, metrics = model(batch, hp.teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf))
    # One collective per step: did any rank see a non-finite value / a stop signal? The
    # reduced flags, this rank's loss and grad norm then reach the host in one transfer.
    device = loss.device
    flags = torch.stack([~torch.isfinite(loss.detach().float()) | ~torch.isfinite(gnorm),
                         torch.tensor(stop_requested, device=device)]).float()
    flags = dist.all_reduce_max(ctx, flags)
    metrics, (bad_f, stop_f, loss_v, gnorm_v) = to_floats(metrics, *flags, loss, gnorm)
    if bad_f:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        objective.update_teacher(hp.momentum)
    return StepOutcome(loss_v, gnorm_v, bool(bad_f), bool(stop_f), metrics)


def _wrap(objective: nn.Module, ctx: dist.DistContext, tc: Any, strategy: str) -> nn.Module:
    """The module the step calls: the loss call with per-module compile, activation checkpointing, then
    DDP / FSDP (``strategy`` from ``dist.resolve_strategy``), or compiled whole (``compile_scope=step``).
    Under FSDP the objective's parameters become shards: build the optimizer after this."""
    if tc.compile:
        tcompile.apply(objective, tc.compile_scope, tc.compile_cache)
    if tc.activation_checkpointing:                        # around the compiled forward: see train/compile.py
        n = fsdp.checkpoint_blocks(objective.student_encoder)
        log.info("activation checkpointing: %d student blocks recomputed in backward", n)
    model: nn.Module = _LossCall(objective)
    if strategy == "fsdp":
        model = fsdp.shard(model, objective, ctx)
    elif strategy == "ddp":
        device = ctx.device
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters)
    if tc.compile and tc.compile_scope == "step":
        model = tcompile.compile_step(model)
    return model


def _saver(objective: nn.Module, optimizer: torch.optim.Optimizer, loader_state: Callable[[], Any],
           ctx: dist.DistContext, ckpt_dir: Path, config: dict, encoder_kwargs: dict, keep_last: int,
           sharded: bool = False) -> Callable[[int, int], Path | None]:
    """``save(step, epoch)``: gather every rank's loader and RNG state (and, under FSDP, the full model and
    optimizer state); rank 0 writes the plain-dict checkpoint."""
    def save(step: int, epoch: int) -> Path | None:
        loader_states = dist.gather_objects(ctx, loader_state())
        rngs = dist.gather_objects(ctx, capture_rng())
        model_state = fsdp.full_model_state(objective, sharded, ctx)
        optimizer_state = fsdp.full_optimizer_state(optimizer, sharded, ctx)
        path = None
        if ctx.is_main:
            ckpt = {"model": model_state, "optimizer": optimizer_state, "scaler": None,
                    "step": step, "epoch": epoch,
                    "loader_state": None if loader_states[0] is None else
                    {"world_size": ctx.world_size, "ranks": loader_states},
                    "rng": {"world_size": ctx.world_size, "ranks": rngs},
                    "config": config, "encoder_kwargs": dict(encoder_kwargs)}
            path = save_checkpoint(ckpt, ckpt_dir, step, keep_last)
            log.info("saved checkpoint %s", path)
        dist.barrier(ctx)
        return path
    return save


class _Bookkeeping:
    """Everything the loop records about steps: metrics rows, progress, bad-step streaks, the summary."""

    def __init__(self, writer: MetricsWriter, ctx: dist.DistContext, tc: Any, step: int):
        self.writer, self.ctx, self.tc = writer, ctx, tc
        self.meter, self.shown = IntervalMeter(), step
        self.bad_in_row = self.total_bad = self.data_skipped = 0   # data_skipped: this rank's unreadable samples
        self.last_row: dict[str, Any] = {}
        self.last_ckpt: Path | None = None

    def record(self, out: StepOutcome, step: int, views: int, data_s: float) -> bool:
        """Account for the step that just ended at ``step``; True when too many bad steps in a row."""
        if not out.bad:
            self.bad_in_row = 0
            self.meter.add({"loss": out.loss, **{k: v for k, v in out.metrics.items() if k != "loss"},
                            "grad_norm": out.grad_norm}, views, data_s)
            return False
        self.bad_in_row += 1
        self.total_bad += 1
        log.warning("step %d: non-finite loss %.4g or grad norm %.4g; step skipped (%d in a row, stop at %d)",
                    step - 1, out.loss, out.grad_norm, self.bad_in_row, self.tc.max_bad_steps)
        self.writer.write({"step": step, "event": "skipped_nonfinite", "loss": out.loss, "grad_norm": out.grad_norm})
        if self.bad_in_row < self.tc.max_bad_steps:
            return False
        log.error("%d non-finite steps in a row at step %d: stopping (lower train.lr, raise train.warmup_steps or "
                  "check the data); last good checkpoint: %s", self.bad_in_row, step, self.last_ckpt)
        return True

    def log_interval(self, step: int, epoch: int, hp: Hparams, loss: float) -> None:
        """One metrics row for the steps since the last one (loss averaged over ranks), and the progress bar."""
        if self.meter.steps:
            s = self.meter.summary()
            loss_v, skips_v = dist.all_reduce_mean(self.ctx, torch.tensor([s["loss"], float(self.data_skipped)],
                                                                          device=self.ctx.device)).tolist()
            s["loss"], s["data_skipped"] = loss_v, round(skips_v * self.ctx.world_size)   # skips summed over ranks
            self.last_row = {"step": step, "epoch": epoch, **s, "lr": hp.lr, "weight_decay": hp.weight_decay,
                             "momentum": hp.momentum, "teacher_temp": hp.teacher_temp}
            self.writer.write(self.last_row)
        self.writer.advance(step - self.shown, self.last_row.get("loss", loss), self.last_row.get("views_per_s"))
        self.shown = step
        self.meter.reset()

    def summary(self) -> dict[str, Any]:
        return {"bad_steps": self.total_bad, "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                **{k: self.last_row[k] for k in ("views_per_s", "step_time_s", "data_wait_frac", "data_skipped")
                   if k in self.last_row}}


def train(objective: nn.Module, loader: Any, tc: Any, run_dir: str | Path, ctx: dist.DistContext,
          config: dict, encoder_kwargs: dict | None = None, resume: bool = True,
          on_device: Callable[[dict], dict] | None = None) -> dict:
    """Run ``tc.steps`` steps of ``objective`` on ``loader``; return a summary dict.

    ``tc`` is a :class:`abvid.train.config.TrainConfig`; ``config`` the resolved
    config as a plain dict (saved to ``run_dir/config.yaml`` and in checkpoints).
    The objective must be built with the same seed on every rank; this function
    moves it to ``ctx.device``, wraps it for DDP and owns the optimizer.
    ``on_device(batch)`` runs on each batch after it reached the device (GPU decoding / augmentation), on
    CUDA one step ahead (train/prefetch.py).
    """
    run_dir = Path(run_dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(ctx)
    setup_logging(run_dir, ctx.rank)
    if ctx.is_main and not resume:
        _start_over(run_dir)
    dist.barrier(ctx)

    device = ctx.device
    strategy = dist.resolve_strategy(tc.strategy, ctx)
    objective.to(device).train()
    dist.broadcast_module_(ctx, objective)
    model = _wrap(objective, ctx, tc, strategy)            # before the optimizer: FSDP replaces parameters
    sharded = strategy == "fsdp"
    global_batch = tc.batch_size * ctx.world_size
    base_lr = scaled_lr(tc.lr, global_batch) if tc.scale_lr else tc.lr
    optimizer = build_optimizer(objective, base_lr, tuple(tc.betas), fused=device.type == "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start = (_resume(objective, optimizer, loader, run_dir / "checkpoints", ctx, config, sharded) if resume
             else Resumed())
    if start.path is None:
        log.info("starting a new run in %s: %d steps, global batch %d (%d x %d ranks, %s), lr %.3g",
                 run_dir, tc.steps, global_batch, tc.batch_size, ctx.world_size, strategy, base_lr)
    if ctx.is_main:
        _write_config(run_dir, config)
    if device.type == "cuda" and tc.amp:
        torch.backends.cuda.matmul.allow_tf32 = True       # fp32 matmuls left under autocast: the logits
        torch.backends.cudnn.allow_tf32 = True
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and tc.amp
        else contextlib.nullcontext)
    feed = DeviceFeed(loader, device, on_device, start.epoch)       # one batch ahead on a side stream on CUDA
    save = _saver(objective, optimizer, feed.loader_state, ctx, run_dir / "checkpoints", config,
                  encoder_kwargs or {}, tc.keep_last, sharded)

    step, epoch, out = start.step, start.epoch, None
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": tc.steps, "start_step": step, "status": "completed",
                               "world_size": ctx.world_size, "backend": ctx.backend, "device": str(device),
                               "strategy": strategy}
    books = _Bookkeeping(MetricsWriter(run_dir, ctx.is_main, tc.steps, step), ctx, tc, step)
    try:
        with StopFlag() as stop:
            if step >= tc.steps and start.path is None:
                books.last_ckpt = save(step, epoch)  # train.steps=0: an untrained checkpoint to probe as a baseline
            elif step >= tc.steps:
                log.info("run already complete (step %d of %d)", step, tc.steps)
            else:
                # iter() draws loader seeds from the global RNG (restored from the loader state on resume),
                # so the RNG is set after it: the next draw is the one an uninterrupted run would make.
                feed.start()
                restore_rng(start.rng) if start.rng is not None else seed_everything(tc.seed + ctx.rank)
            while step < tc.steps:
                t0 = time.perf_counter()
                batch, epoch = feed.next()
                books.data_skipped += int(batch.pop("data_skipped", 0))
                views = count_views(batch) * ctx.world_size
                data_s = time.perf_counter() - t0
                hp = Hparams.at(step, tc, base_lr)
                out = train_step(model, objective, optimizer, params, batch, hp, tc.clip_grad, ctx, autocast,
                                 stop.signum is not None)
                step += 1
                if books.record(out, step, views, data_s):
                    summary["status"] = "diverged"
                    break
                if step % tc.log_every == 0 or step == tc.steps or out.stop:
                    books.log_interval(step, epoch, hp, out.loss)
                if step % tc.ckpt_every == 0 or step == tc.steps or out.stop:
                    books.last_ckpt = save(step, epoch)
                if out.stop:
                    summary.update(status="interrupted", signal=stop.signum)
                    log.warning("stopped at step %d after a signal; resume with the same command", step)
                    break
    finally:
        books.writer.close()
    summary.update(step=step, epoch=epoch, final_loss=out.loss if out else None, **books.summary())
    return summary
