"""The pre-training loop: data, forward/backward, clip, step, schedules, EMA, logging, checkpoint.

    abvid pretrain examples/configs/tiny_cpu.yaml --out runs/tiny           # CPU or one GPU
    torchrun --nproc-per-node 8 -m abvid.tools.cli pretrain CONFIG --out RUN  # DDP, one or many nodes

The loop only sequences steps (DINOv2's ``SSLMetaArch`` split): the objective
module owns student, EMA teacher and losses and is called as
``objective.loss(batch, teacher_temp=t) -> (loss, metrics)`` and
``objective.update_teacher(momentum)``; nothing here knows about DINO or value
functions. One code path for every setting:

* **devices**: fp32 on CPU; bf16 autocast on CUDA (``train.amp``), no grad
  scaler needed for bf16; optional ``torch.compile`` of the loss call.
* **DDP** when torchrun sets ``WORLD_SIZE``: the loss call is wrapped in
  ``DistributedDataParallel``. The EMA teacher lives in the same objective but
  has ``requires_grad=False``, so DDP neither reduces nor re-broadcasts it;
  it stays identical on all ranks because the student does and the EMA is
  deterministic (it is broadcast from rank 0 once at start). Each rank builds
  its loader with ``rank, world_size`` and reads different shards.
* **resume**: a checkpoint is a plain dict (``train/checkpoint.py``) and a
  resumed run goes through the same code as a fresh one: build everything,
  then load the dict (model + EMA, optimizer, step, epoch, each rank's loader
  and RNG state). Schedules are pure functions of the step. With the same
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
  is skipped (no optimizer or EMA update), logged as an ``event`` row, and
  ``train.max_bad_steps`` of them in a row stop the run (``status="diverged"``,
  CLI exit 3).

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
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from abvid.train import dist
from abvid.train.checkpoint import CheckpointError, capture_rng, load_latest, restore_rng, save_checkpoint
from abvid.train.metrics import IntervalMeter, MetricsWriter, setup_logging
from abvid.train.optim import build_optimizer, set_hparams
from abvid.train.schedules import cosine, linear, scaled_lr, warmup_cosine

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


class _StopFlag:
    """SIGTERM / SIGINT handler: remember the signal; the loop saves and exits at the step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if hasattr(signal, "SIGTERM") and _in_main_thread():
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


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_views(batch: dict) -> int:
    """Views in a batch: ``B * n`` summed over the ``global``/``local`` tensors (B when neither exists)."""
    n = sum(int(batch[k].shape[0] * batch[k].shape[1]) for k in VIEW_KEYS if k in batch and batch[k].ndim >= 2)
    if n == 0:
        first = next((v for v in batch.values() if torch.is_tensor(v)), None)
        n = int(first.shape[0]) if first is not None else 0
    return n


def _next_batch(loader: Any, it: Iterator, epoch: int) -> tuple[dict, Iterator, int]:
    """Next batch; a finished pass starts the next epoch. An empty pass is an error."""
    try:
        return next(it), it, epoch
    except StopIteration:
        it = iter(loader)
        try:
            return next(it), it, epoch + 1
        except StopIteration:
            raise RuntimeError("the loader yielded no batch in a whole pass: check data.shards "
                               "(and that each rank gets at least one shard)") from None


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.")
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


def train(objective: nn.Module, loader: Any, tc: Any, run_dir: str | Path, ctx: dist.DistContext,
          config: dict, encoder_kwargs: dict | None = None, resume: bool = True,
          on_device: Callable[[dict], dict] | None = None) -> dict:
    """Run ``tc.steps`` steps of ``objective`` on ``loader``; return a summary dict.

    ``tc`` is a :class:`abvid.train.config.TrainConfig`; ``config`` the resolved
    config as a plain dict (saved to ``run_dir/config.yaml`` and in checkpoints).
    The objective must be built with the same seed on every rank; this function
    moves it to ``ctx.device``, wraps it for DDP and owns the optimizer.
    ``on_device(batch)`` runs on each batch after it reached the device (GPU augmentation).
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier(ctx)
    setup_logging(run_dir, ctx.rank)
    if ctx.is_main and not resume:
        _start_over(run_dir)
    dist.barrier(ctx)

    device = ctx.device
    objective.to(device).train()
    dist.broadcast_module_(ctx, objective)
    global_batch = tc.batch_size * ctx.world_size
    base_lr = scaled_lr(tc.lr, global_batch) if tc.scale_lr else tc.lr
    optimizer = build_optimizer(objective, base_lr, tuple(tc.betas), fused=device.type == "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]

    step, epoch, rng_state = 0, 0, None
    found = load_latest(ckpt_dir, map_location="cpu") if resume else None
    if found is not None:
        state, path = found
        try:
            objective.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not fit the model built from this config (were model.* or "
                                  f"objective.* changed? {_config_diff(state.get('config') or {}, config)[:5]}); "
                                  f"use another --out, or --no-resume to start over: {e}") from e
        step, epoch = int(state["step"]), int(state["epoch"])
        same_world = (state.get("rng") or {}).get("world_size") == ctx.world_size
        loader_state = state.get("loader_state")
        if same_world and loader_state is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(loader_state["ranks"][ctx.rank])
        if same_world:
            rng_state = state["rng"]["ranks"][ctx.rank]
        else:
            log.warning("checkpoint was written with world size %s, now %d: loader and RNG states are not "
                        "restored (data order differs from an uninterrupted run)",
                        (state.get("rng") or {}).get("world_size"), ctx.world_size)
        changed = _config_diff(state.get("config") or {}, config)
        log.info("resuming from %s at step %d (epoch %d)%s", path, step, epoch,
                 "; config changes: " + "; ".join(changed) if changed else "")
        del state
    else:
        log.info("starting a new run in %s: %d steps, global batch %d (%d x %d ranks), lr %.3g",
                 run_dir, tc.steps, global_batch, tc.batch_size, ctx.world_size, base_lr)
    if ctx.is_main:
        tmp = run_dir / "config.yaml.tmp"
        try:
            import yaml
            text = yaml.safe_dump(config, sort_keys=False)
        except ImportError:  # bare GPU host without PyYAML (gpu_check.sh): JSON is valid YAML
            text = json.dumps(config, indent=2)
        tmp.write_text(text)
        os.replace(tmp, run_dir / "config.yaml")

    model: nn.Module = _LossCall(objective)
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters)
    if tc.compile:
        model = torch.compile(model)
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and tc.amp
        else contextlib.nullcontext)

    def save(at_step: int) -> Path | None:
        loader_states = dist.gather_objects(ctx, loader.state_dict() if hasattr(loader, "state_dict") else None)
        rngs = dist.gather_objects(ctx, capture_rng())
        path = None
        if ctx.is_main:
            ckpt = {"model": objective.state_dict(), "optimizer": optimizer.state_dict(), "scaler": None,
                    "step": at_step, "epoch": epoch,
                    "loader_state": None if loader_states[0] is None else
                    {"world_size": ctx.world_size, "ranks": loader_states},
                    "rng": {"world_size": ctx.world_size, "ranks": rngs},
                    "config": config, "encoder_kwargs": dict(encoder_kwargs or {})}
            path = save_checkpoint(ckpt, ckpt_dir, at_step, tc.keep_last)
            log.info("saved checkpoint %s", path)
        dist.barrier(ctx)
        return path

    writer = MetricsWriter(run_dir, ctx.is_main, tc.steps, step)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": tc.steps, "start_step": step, "status": "completed",
                               "world_size": ctx.world_size, "backend": ctx.backend, "device": str(device)}
    last_ckpt, bad_in_row, total_bad, loss_v = None, 0, 0, None
    last_row: dict[str, Any] = {}
    try:
        with _StopFlag() as stop:
            if step >= tc.steps:
                if found is None:
                    last_ckpt = save(step)  # train.steps=0: an untrained checkpoint to probe as a baseline
                else:
                    log.info("run already complete (step %d of %d)", step, tc.steps)
            else:
                # iter() draws loader seeds from the global RNG (restored from the loader state on resume),
                # so the RNG is set after it: the next draw is the one an uninterrupted run would make.
                it = iter(loader)
                restore_rng(rng_state) if rng_state is not None else seed_everything(tc.seed + ctx.rank)
            meter, shown = IntervalMeter(), step
            while step < tc.steps:
                t0 = time.perf_counter()
                batch, it, epoch = _next_batch(loader, it, epoch)
                views = count_views(batch) * ctx.world_size
                batch = _to_device(batch, device)
                if on_device is not None:
                    batch = on_device(batch)
                data_s = time.perf_counter() - t0

                lr = warmup_cosine(step, base_lr, tc.min_lr, tc.steps, tc.warmup_steps)
                wd = cosine(step, tc.weight_decay, tc.weight_decay_end, tc.steps)
                momentum = cosine(step, tc.momentum, tc.momentum_end, tc.steps)
                temp = linear(step, tc.teacher_temp, tc.teacher_temp_end, tc.teacher_temp_warmup_steps)
                set_hparams(optimizer, lr, wd)

                with autocast():
                    loss, metrics = model(batch, temp)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, tc.clip_grad if tc.clip_grad > 0 else math.inf)
                # One collective per step: did any rank see a non-finite value / a stop signal? The
                # reduced flags, this rank's loss and grad norm then reach the host in one transfer.
                flags = torch.stack([~torch.isfinite(loss.detach().float()) | ~torch.isfinite(gnorm),
                                     torch.tensor(stop.signum is not None, device=device)]).float()
                flags = dist.all_reduce_max(ctx, flags)
                bad_f, stop_f, loss_v, gnorm_v = torch.cat(
                    [flags, torch.stack([loss.detach().float(), gnorm.detach().float()])]).tolist()
                bad, stop_any = bool(bad_f), bool(stop_f)
                if bad:
                    bad_in_row += 1
                    total_bad += 1
                    log.warning("step %d: non-finite loss %.4g or grad norm %.4g; step skipped (%d in a row, "
                                "stop at %d)", step, loss_v, gnorm_v, bad_in_row, tc.max_bad_steps)
                    writer.write({"step": step + 1, "event": "skipped_nonfinite", "loss": loss_v,
                                  "grad_norm": gnorm_v})
                    optimizer.zero_grad(set_to_none=True)
                else:
                    bad_in_row = 0
                    optimizer.step()
                    objective.update_teacher(momentum)
                    meter.add({"loss": loss_v, **{k: v for k, v in metrics.items() if k != "loss"},
                               "grad_norm": gnorm_v}, views, data_s)
                step += 1
                if bad_in_row >= tc.max_bad_steps:
                    log.error("%d non-finite steps in a row at step %d: stopping (lower train.lr, raise "
                              "train.warmup_steps or check the data); last good checkpoint: %s",
                              bad_in_row, step, last_ckpt)
                    summary["status"] = "diverged"
                    break

                if step % tc.log_every == 0 or step == tc.steps or stop_any:
                    if meter.steps:
                        s = meter.summary()
                        s["loss"] = float(dist.all_reduce_mean(ctx, torch.tensor(s["loss"], device=device)))
                        last_row = {"step": step, "epoch": epoch, **s, "lr": lr, "weight_decay": wd,
                                    "momentum": momentum, "teacher_temp": temp}
                        writer.write(last_row)
                    writer.advance(step - shown, last_row.get("loss", loss_v), last_row.get("views_per_s"))
                    shown = step
                    meter.reset()
                if step % tc.ckpt_every == 0 or step == tc.steps or stop_any:
                    last_ckpt = save(step)
                if stop_any:
                    summary["status"] = "interrupted"
                    summary["signal"] = stop.signum
                    log.warning("stopped at step %d after a signal; resume with the same command", step)
                    break
    finally:
        writer.close()
    summary.update(step=step, epoch=epoch, final_loss=loss_v, bad_steps=total_bad,
                   checkpoint=str(last_ckpt) if last_ckpt else None,
                   **{k: last_row[k] for k in ("views_per_s", "step_time_s", "data_wait_frac") if k in last_row})
    return summary


def augment_on_device(batch: dict) -> dict:
    """``data.aug_in_loader=false``: colour/blur/solarize on the device from the recorded ``aug`` params."""
    from abvid.pipeline.views import augment

    out = dict(batch)
    ng = batch["global"].shape[1]
    for key, aug in (("global", batch["aug"][:, :ng]), ("local", batch["aug"][:, ng:])):
        x = batch.get(key)
        if x is not None and x.shape[1] > 0:
            out[key] = augment(x.flatten(0, 1), aug.flatten(0, 1)).view_as(x)
    return out


def corpus_texts(data_cfg: Any, max_shards: int = 256) -> list[str]:
    """Sorted label/text strings of the clips' JSON in (up to ``max_shards``) local shards: the CLIP vocabulary."""
    import tarfile

    from abvid.pipeline.source import expand_shards

    urls = expand_shards(data_cfg.shards, allow_pipe=False)
    local = [u for u in urls if Path(u).is_file()][:max_shards]
    if len(local) < len(urls):
        log.warning("CLIP vocabulary read from %d of %d shards (local files only, at most %d)",
                    len(local), len(urls), max_shards)
    texts: set[str] = set()
    for url in local:
        with tarfile.open(url, "r:") as tar:      # seeks past the frames; reads only the .json members
            for member in tar:
                if member.name.endswith(".json") and (f := tar.extractfile(member)) is not None:
                    for ann in json.loads(f.read()).get("annotations") or []:
                        texts.update(t for t in (ann.get("label"), ann.get("text")) if t)
    return sorted(texts)


def pretrain(cfg: Any, run_dir: str | Path, resume: bool = True) -> dict:
    """Build loader and objective from a :class:`~abvid.train.config.PretrainConfig` and :func:`train` them."""
    from abvid.model import encoder_kwargs
    from abvid.pipeline.loader import build_loader
    from abvid.tools.config import to_dict
    from abvid.train.config import check_sizes, validate
    from abvid.train.objectives import build_objective

    tc = cfg.train
    validate(tc)
    for msg in check_sizes(cfg):
        if os.environ.get("RANK", "0") == "0":      # once per job, not once per torchrun process
            log.warning(msg)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 noise, every worker
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    ctx = dist.init(tc.device)
    try:
        data_info = {"texts": corpus_texts(cfg.data)} if cfg.objective.name == "clip" else None
        seed_everything(tc.seed)  # the same on every rank: identical student and teacher init
        objective = build_objective(cfg.objective, cfg.model, data_info)
        loader = build_loader(cfg.data, tc.batch_size, rank=ctx.rank, world_size=ctx.world_size)
        on_device = None if cfg.data.aug_in_loader else augment_on_device
        return train(objective, loader, tc, run_dir, ctx, to_dict(cfg), encoder_kwargs(cfg.model), resume,
                     on_device=on_device)
    finally:
        dist.shutdown(ctx)
