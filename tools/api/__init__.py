"""abvid's Python API: the CLI's jobs as functions, for notebooks and pipelines.

    from abvid.api import preprocess, pretrain, embed, probe, export, load_encoder

    preprocess(["videos/"], "shards", fps=4, size=256, clip_len=16, annotations="labels.csv")
    summary = pretrain("examples/configs/tiny_cpu.yaml", "runs/tiny", overrides=["data.shards=shards"])
    enc = load_encoder(summary["checkpoint"])                    # eval-mode ViT; enc.embed(uint8 frames) -> (B, D)
    embed(["videos/"], summary["checkpoint"], "emb", fps=4)     # emb/embeddings.npy + index.csv
    print(probe("emb", "labels.csv"))                            # linear / k-NN on held-out videos
    export(summary["checkpoint"], "vit.safetensors", format="timm")

Each function does what its command does (same code, same files, same resume rules) and
raises instead of exiting: ``abvid.pipeline.errors.UsageError`` where the command exits 2
(bad settings, missing inputs), ``JobError`` where it exits 3. They take explicit arguments;
settings without an argument here are the fields of the config dataclasses they name.

Where it lives: a package folder inside ``tools/`` (the CLI's layer, the only one that may
import every other), installed as ``abvid.api`` through pyproject's package-dir mapping,
so users get a short, stable import path and the four code folders stay as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from abvid.model.io import load_encoder

__all__ = ["preprocess", "pretrain", "embed", "probe", "export", "load_encoder"]


def preprocess(inputs: Sequence[str] | str, out: str | Path, *, progress: bool = False, **settings: Any):
    """Decode videos into WebDataset shards in ``out`` (``abvid preprocess``); returns the run's ``Stats``.

    ``inputs``: files, folders (recursive), globs or list files. ``settings`` are fields of
    :class:`abvid.pipeline.preprocess.PreprocessConfig` (``fps``, ``size``, ``clip_len``,
    ``annotations``, ``workers``, ``shard_clips``, ...); an unknown name is a ``UsageError``.
    Resumable: a second call with the same arguments decodes only what the first did not finish.
    """
    import dataclasses

    from abvid.pipeline.errors import UsageError
    from abvid.pipeline.preprocess import PreprocessConfig, run_preprocess

    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"preprocess(): unknown setting(s) {unknown}; PreprocessConfig has {sorted(known)}")
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    return run_preprocess(items, out, PreprocessConfig(**settings), progress=progress)


def pretrain(config: str | Path | None, out: str | Path, *, overrides: Sequence[str] = (),
             resume: bool = True) -> dict:
    """Pre-train an encoder (``abvid pretrain CONFIG --set ... --out OUT``); returns the run summary.

    ``config``: a YAML file of overrides, or None for the defaults; ``overrides``: ``"a.b=v"``
    strings, applied after the file. The summary has ``status`` ('completed', 'diverged',
    'interrupted'), ``step``, ``final_loss`` and ``checkpoint`` (the last checkpoint written).
    Rerunning with the same ``out`` resumes; ``resume=False`` starts over.
    """
    from abvid.pipeline.config import load_config
    from abvid.train.config import PretrainConfig, check_sizes, validate
    from abvid.train.pretrain import pretrain as _pretrain

    cfg = load_config(PretrainConfig, str(config) if config is not None else None, list(overrides))
    validate(cfg.train)
    check_sizes(cfg)
    return _pretrain(cfg, Path(out), resume=resume)


def embed(inputs: Sequence[str] | str, checkpoint: str | Path, out: str | Path, *, fps: float | None = 4.0,
          size: int | None = None, batch_size: int = 64, device: str = "auto", which: Literal["ema", "student"] = "ema",
          dtype: Literal["float32", "float16"] = "float32", progress: bool = False) -> list:
    """Per-frame embeddings of videos or shards into ``out`` (``abvid embed``); returns one result per input.

    ``checkpoint``: an exported .safetensors or a training checkpoint (its ``which`` encoder).
    ``size`` defaults to the encoder's ``img_size``; ``device="auto"`` picks CUDA when present.
    """
    from abvid.train.embed import embed_inputs

    encoder = load_encoder(checkpoint, map_location="cpu", which=which)
    size = size or int(encoder.encoder_kwargs.get("img_size", 224))
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    return embed_inputs(items, out, encoder, fps=fps, size=size, batch_size=batch_size, device=device, dtype=dtype,
                        progress=progress)             # embed_inputs resolves "auto" and refuses a missing GPU


def probe(embeddings: str | Path, labels: str | Path, *, methods: Sequence[str] = ("linear", "knn"),
          test_fraction: float = 0.3, seed: int = 0) -> list:
    """Linear and k-NN probes of an ``embed`` folder against a label file (``abvid probe``).

    ``labels``: ``video,start_s,end_s,label`` segments or ``video,label`` whole-video labels.
    Returns :class:`abvid.train.probe.ProbeResult` rows; warns (``ProbeWarning``) about test
    classes absent from training.
    """
    from abvid.train.probe import run_probe
    return run_probe(embeddings, labels, methods=tuple(methods), test_fraction=test_fraction, seed=seed)


def export(checkpoint: str | Path, out: str | Path, *, format: Literal["abvid", "timm"] = "abvid",
           which: Literal["ema", "student"] = "ema") -> Path:
    """Write one encoder of a checkpoint as .safetensors, in abvid's or timm's key layout (``abvid export``)."""
    from abvid.model.io import save_encoder, save_timm
    from abvid.pipeline.errors import UsageError

    if format not in ("abvid", "timm"):
        raise UsageError(f"export(format={format!r}): use 'abvid' or 'timm'")
    encoder = load_encoder(checkpoint, which=which)
    if format == "timm":
        return save_timm(encoder, encoder.encoder_kwargs, out)[0]
    return save_encoder(encoder, encoder.encoder_kwargs, out)
