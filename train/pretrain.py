"""``abvid pretrain`` as a function: build the loader and objective from a config, then run the loop.

    from abvid.pipeline.config import load_config
    from abvid.train.config import PretrainConfig
    from abvid.train.pretrain import pretrain
    summary = pretrain(load_config(PretrainConfig, "examples/configs/tiny_cpu.yaml"), "runs/tiny")

Everything that knows about the config lives here; ``train/loop.py`` only sequences steps.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from abvid.train import dist
from abvid.train.loop import seed_everything, train
from abvid.train.metrics import setup_logging

log = logging.getLogger("abvid.train")


def device_transform(data_cfg: Any, device: torch.device) -> Callable[[dict], dict] | None:
    """What runs on each batch once on the device (train/prefetch.py, one step ahead on CUDA): decoding and
    rendering (``data.decode_on=device``), augmentation (``data.aug_in_loader=false``) or nothing."""
    from abvid.pipeline import gpu_views

    if data_cfg.decode_on == "device":
        return gpu_views.build_renderer(data_cfg, device)
    if not data_cfg.aug_in_loader:
        return functools.partial(augment_on_device, max_blur_sigma=max(data_cfg.blur_sigma))
    return None


def augment_on_device(batch: dict, max_blur_sigma: float) -> dict:
    """``data.aug_in_loader=false``: colour/blur/solarize on the device from the recorded ``aug`` params, every
    view of a size at once and without reading a value back to the host (pipeline/gpu_views.augment)."""
    from abvid.pipeline.gpu_views import augment, to_channels_last

    out = dict(batch)
    ng = batch["global"].shape[1]
    for key, aug in (("global", batch["aug"][:, :ng]), ("local", batch["aug"][:, ng:])):
        x = batch.get(key)
        if x is not None and x.shape[1] > 0:
            y = augment(x.flatten(0, 1).float(), aug.flatten(0, 1), max_blur_sigma)
            out[key] = to_channels_last(y, *x.shape[:2])
    return out


CLIP_TEXTS = "clip_texts.txt"     # in the run folder: the strings CLIP's vocabulary was built from


def read_texts(path: str | Path, what: str = "objective.clip_texts",
               fix: str = "give a UTF-8 text file with one label or caption per line, or leave it empty to read "
                          "the labels from local shards") -> list[str]:
    """Sorted distinct non-blank lines of a UTF-8 text file (one label or caption per line)."""
    from abvid.pipeline.config import ConfigError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path} ({e}); {fix}") from e
    return sorted({t.strip() for t in lines if t.strip()})


def clip_vocab_texts(cfg: Any, run_dir: str | Path, resume: bool, is_main: bool) -> list[str]:
    """The strings CLIP's text vocabulary is built from, the same for every start of one run.

    A fresh run takes ``objective.clip_texts`` (a text file) or, when that is empty, the labels and
    captions in the local shards (:func:`corpus_texts`), and rank 0 writes them to ``RUN/clip_texts.txt``.
    A run that resumes from a checkpoint reads that file back: the checkpoint's word embeddings are
    indexed by it, so shards added or a vocabulary file edited since the start must not renumber the
    words (a different count would not load; the same count would load and silently mean other words).
    Without a checkpoint there is nothing to fit, and the vocabulary is made afresh."""
    from abvid.train.checkpoint import list_checkpoints

    saved = Path(run_dir) / CLIP_TEXTS
    if resume and saved.is_file() and list_checkpoints(Path(run_dir) / "checkpoints"):
        texts = read_texts(saved, "the run's CLIP vocabulary", "it holds the vocabulary this run started with; "
                           "restore it, or start over with --no-resume")
        log.info("CLIP vocabulary: %d strings from the run's own %s", len(texts), saved)
        return texts
    path = cfg.objective.clip_texts
    texts = read_texts(path) if path else corpus_texts(cfg.data)
    if is_main:
        from abvid.train.embed_store import write_text

        saved.parent.mkdir(parents=True, exist_ok=True)
        write_text(saved, "".join(t.replace("\n", " ") + "\n" for t in texts))
    return texts


def corpus_texts(data_cfg: Any, max_shards: int = 256) -> list[str]:
    """Sorted label/text strings of the clips' JSON in (up to ``max_shards``) local shards: the CLIP vocabulary."""
    import tarfile

    from abvid.pipeline.source import expand_shards

    urls = expand_shards(data_cfg.shards, allow_pipe=False)
    local = [u for u in urls if Path(u).is_file()][:max_shards]
    if len(local) < len(urls):
        log.warning("CLIP vocabulary read from %d of %d shards (local files only, at most %d); "
                    "objective.clip_texts=FILE (one label or caption per line) gives it instead",
                    len(local), len(urls), max_shards)
    texts: set[str] = set()
    for url in local:
        with tarfile.open(url, "r:") as tar:      # seeks past the frames; reads only the .json members
            for member in tar:
                if member.name.endswith(".json") and (f := tar.extractfile(member)) is not None:
                    for ann in json.loads(f.read()).get("annotations") or []:
                        texts.update(t for t in (ann.get("label"), ann.get("text")) if t)
    return sorted(texts)


def init_encoders(objective: torch.nn.Module, path: str) -> None:
    """``model.init_from``: student and teacher (if any) encoders start from the ViT weights in ``path``."""
    from abvid.model.io import init_encoder_from

    what = init_encoder_from(objective.student_encoder, path)
    teacher = getattr(objective, "teacher_encoder", None)
    if teacher is not None:
        teacher.load_state_dict(objective.student_encoder.state_dict())
    log.info("model.init_from: encoder weights from %s", what)


def first_batch_hook(inner: Callable[[dict], dict] | None, hook: Callable[[dict], None]) -> Callable[[dict], dict]:
    """An ``on_device`` function that also hands the first batch (as the model gets it) to ``hook`` once."""
    seen = []

    def on_device(batch: dict) -> dict:
        batch = inner(batch) if inner is not None else batch
        if not seen:
            seen.append(True)
            hook(batch)
        return batch
    return on_device


def pretrain(cfg: Any, run_dir: str | Path, resume: bool = True,
             on_first_batch: Callable[[dict], None] | None = None) -> dict:
    """Build loader and objective from a :class:`~abvid.train.config.PretrainConfig` and :func:`train` them.

    ``on_first_batch(batch)`` is called once, on rank 0, with the first batch on the device (the
    CLI draws it into TensorBoard). ``model.init_from`` applies to a fresh run; a resumed run
    loads its checkpoint over it.
    """
    from abvid.model import encoder_kwargs
    from abvid.pipeline.loader import build_loader
    from abvid.pipeline.config import to_dict
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
        data_info: dict[str, Any] = {"max_abs_dt": cfg.data.view_sampler().max_abs_dt()}
        if cfg.objective.name == "clip":
            data_info["texts"] = clip_vocab_texts(cfg, run_dir, resume, ctx.is_main)
        seed_everything(tc.seed)  # the same on every rank: identical student and teacher init
        objective = build_objective(cfg.objective, cfg.model, data_info)
        if cfg.model.init_from:
            if ctx.is_main:            # train() sets up the run's log again; this line must reach it already
                Path(run_dir).mkdir(parents=True, exist_ok=True)
            setup_logging(Path(run_dir) if ctx.is_main else None, ctx.rank)
            init_encoders(objective, cfg.model.init_from)
        oc = cfg.objective     # bootstrapping's next actions A' go to fresh views the loader samples
        next_views = oc.num_next_actions if oc.bootstrap and oc.gamma > 0 else 0
        loader = build_loader(cfg.data, tc.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                              next_views=next_views)
        on_device = device_transform(cfg.data, ctx.device)
        if on_first_batch is not None and ctx.is_main:
            on_device = first_batch_hook(on_device, on_first_batch)
        return train(objective, loader, tc, run_dir, ctx, to_dict(cfg), encoder_kwargs(cfg.model), resume,
                     on_device=on_device)
    finally:
        dist.shutdown(ctx)
