"""Configuration of ``abvid pretrain``: the training knobs and the full resolved config.

Defaults live here in frozen dataclasses; a YAML file (``examples/configs/``)
holds only overrides and ``--set train.steps=100`` overrides the file
(``abvid.pipeline.config``). The resolved :class:`PretrainConfig` is written to
``RUN_DIR/config.yaml`` and into every checkpoint.

Batch size and learning rate (DINO convention):

* ``train.batch_size`` is **per process** (per GPU); the global batch is
  ``batch_size * world_size``, so the same config scales from one GPU to many
  nodes without edits.
* ``train.lr`` is the learning rate at a global batch of 256; the rate used is
  ``lr * global_batch / 256`` (linear scaling, DINO's ``5e-4 * B / 256``).
  ``train.scale_lr: false`` uses ``lr`` as given. ``min_lr`` is absolute.

Schedules (``train/schedules.py``): learning rate warms up linearly for
``warmup_steps`` then follows a cosine to ``min_lr``; weight decay and EMA
momentum follow a cosine from their start to their ``_end`` value over the run;
the teacher temperature rises linearly from ``teacher_temp`` to
``teacher_temp_end`` over ``teacher_temp_warmup_steps`` and stays there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from abvid.model import ModelConfig
from abvid.pipeline.loader import DataConfig
from abvid.train.objectives import ObjectiveConfig


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000                  # optimizer steps in the whole run (0 = write an untrained checkpoint)
    batch_size: int = 64                 # clips per process per step; global batch = batch_size * world_size
    lr: float = 5e-4                     # at global batch 256; scaled by global_batch / 256 when scale_lr
    scale_lr: bool = True
    min_lr: float = 1e-6                 # end of the cosine (absolute, not scaled)
    warmup_steps: int = 1_000            # linear learning-rate warm-up from 0
    weight_decay: float = 0.04           # start of the weight-decay cosine (DINO 0.04 -> 0.4)
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.996              # EMA teacher momentum at step 0 ...
    momentum_end: float = 1.0            # ... cosine to this at the last step
    teacher_temp: float = 0.04           # passed to objective.loss(batch, teacher_temp=...)
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_steps: int = 3_000
    clip_grad: float = 3.0               # max global grad norm; 0 disables clipping
    amp: bool = True                     # bf16 autocast on CUDA (CPU always runs fp32)
    compile: bool = False                # torch.compile the loss computation
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient
    deterministic: bool = False          # torch.use_deterministic_algorithms (slower on GPU; see loop.py)
    log_every: int = 20                  # steps per metrics.jsonl row / log line
    ckpt_every: int = 1_000              # steps between checkpoints (the last step and SIGTERM always save)
    keep_last: int = 3                   # checkpoints kept in RUN_DIR/checkpoints
    max_bad_steps: int = 10              # consecutive non-finite steps before the run stops (exit 3)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0                     # torch intra-op threads on CPU; 0 = torch's default


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def validate(cfg: TrainConfig) -> None:
    """Reject values the loop cannot run with; messages name the key and the fix."""
    from abvid.pipeline.config import ConfigError

    checks = [
        (cfg.steps >= 0, "train.steps must be >= 0"),
        (cfg.batch_size >= 1, "train.batch_size must be >= 1 (clips per process)"),
        (cfg.lr >= 0 and cfg.min_lr >= 0, "train.lr and train.min_lr must be >= 0"),
        (cfg.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.ckpt_every >= 1, "train.ckpt_every must be >= 1"),
        (cfg.keep_last >= 1, "train.keep_last must be >= 1"),
        (cfg.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (0.0 <= cfg.momentum <= 1.0 and 0.0 <= cfg.momentum_end <= 1.0,
         "train.momentum and train.momentum_end must lie in [0, 1]"),
        (cfg.clip_grad >= 0, "train.clip_grad must be >= 0 (0 disables clipping)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def check_sizes(cfg: PretrainConfig) -> list[str]:
    """View sizes against the model. Raises ConfigError for a size the patch grid cannot tile (the first
    training step would fail, after the workers started); returns warnings for settings that only cost time."""
    from abvid.pipeline.config import ConfigError

    p = cfg.model.patch_size
    sizes = [("data.global_size", cfg.data.global_size)]
    if cfg.data.n_local > 0:
        sizes.append(("data.local_size", cfg.data.local_size))
    for key, size in sizes:
        if size % p:
            near = max(p, round(size / p) * p)
            raise ConfigError(f"{key}={size} is not a multiple of model.patch_size={p}: use e.g. {key}={near}")
    need = cfg.data.view_sampler().max_abs_dt()
    if cfg.objective.bootstrap and cfg.objective.temporal and 0 < cfg.objective.max_dt < need:
        raise ConfigError(f"objective.max_dt={cfg.objective.max_dt} is below the largest |dt| between two views "
                          f"({need}: data.max_dt={cfg.data.max_dt}, dt_mode={cfg.data.dt_mode}); larger offsets "
                          f"would share the edge token. Set objective.max_dt=0 (derived from the data) or >= {need}")
    if cfg.model.img_size != cfg.data.global_size:
        return [f"model.img_size={cfg.model.img_size} differs from data.global_size={cfg.data.global_size}: the "
                f"position embedding is resized for every global view; set model.img_size={cfg.data.global_size} "
                "unless the encoder is meant for that other size"]
    return []
