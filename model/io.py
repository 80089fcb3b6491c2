"""Encoder files: write an encoder alone (safetensors, abvid's or timm's key layout), read it back.

Two inputs give the same thing, an eval-mode encoder with ``embed()``:

* an exported ``.safetensors`` file (``abvid export``): the encoder's tensors, and
  ``build_encoder`` kwargs as JSON in the file's metadata (key ``abvid.encoder_kwargs``),
  so loading needs no training config and no pickle;
* a training checkpoint (docs/INTERFACES.md): a plain dict whose ``model`` entry is
  the objective's state dict, with the EMA encoder under ``teacher_encoder.`` and the
  student under ``student_encoder.``, and ``encoder_kwargs``. Read with
  ``torch.load(weights_only=True)``. The EMA (teacher) is the default: it is the
  encoder DINO-style methods evaluate. A checkpoint without one (an objective that keeps
  no teacher) gives its student encoder, with a warning saying so.

    enc = load_encoder("encoder.safetensors")            # or "run/checkpoints/ckpt-00001000.pt"
    z = enc.embed(frames_uint8)                           # (B, D)

``save_timm`` writes the same tensors in timm's ViT layout (model/timm_layout.py), and
``read_init_weights`` reads either layout, or a training checkpoint, as the starting
weights of a new run (``model.init_from``).

Checkpoint format version. Every training checkpoint carries ``format_version``
(``CHECKPOINT_FORMAT``); a file without one is format 0, written before versions existed:
the same layout, with LayerNorm eps 1e-5 (encoders built now use 1e-6, timm's value, and
record it as ``norm_eps`` in their kwargs; kwargs without ``norm_eps`` mean 1e-5, so old
files give exactly the features they gave before). A newer format, one older than
``OLDEST_READABLE_FORMAT``, or a dict that is no abvid checkpoint at all is refused with
what to do. The constants live here, not in train/checkpoint.py which writes them,
because this module (model/, below train/) reads checkpoints too.

Every error is an ``EncoderFileError`` (a ``UsageError``: the CLI prints it and exits 2).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from abvid.pipeline.errors import UsageError

METADATA_KEY = "abvid.encoder_kwargs"
PREFIXES = {"ema": "teacher_encoder.", "student": "student_encoder."}
Which = Literal["ema", "student"]
CHECKPOINT_FORMAT = 1            # "format_version" of the checkpoints this version writes
OLDEST_READABLE_FORMAT = 0       # 0: no "format_version" key (LayerNorm eps 1e-5, same layout)
LEGACY_NORM_EPS = 1e-5           # the eps of encoders whose kwargs do not record one


class EncoderFileError(UsageError):
    """The file is not an abvid encoder or checkpoint, or lacks the requested weights (exit 2)."""


class CheckpointFormatError(EncoderFileError):
    """A checkpoint of a format version this abvid does not read, or a dict that is no abvid checkpoint."""


def with_norm_eps(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``build_encoder`` kwargs with ``norm_eps`` filled in for files written before it was recorded."""
    return {**kwargs, "norm_eps": float(kwargs.get("norm_eps", LEGACY_NORM_EPS))}


def checkpoint_format(ckpt: Any, path: str | Path, needs: tuple[str, ...] = ("model", "encoder_kwargs")) -> int:
    """The format version of a loaded training checkpoint; raises naming what to do when it cannot be read
    (a newer or too old format, or a dict without the entries ``needs``)."""
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path}: not an abvid checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise CheckpointFormatError(
            f"{path}: checkpoint format {version!r} was written by a newer abvid (this one reads formats "
            f"{OLDEST_READABLE_FORMAT}..{CHECKPOINT_FORMAT}); upgrade abvid (pip install -U abvid), or export the "
            "encoder with the newer version (`abvid export`) and use the .safetensors file")
    if version < OLDEST_READABLE_FORMAT:
        raise CheckpointFormatError(
            f"{path}: checkpoint format {version} is older than this abvid reads ({OLDEST_READABLE_FORMAT}.."
            f"{CHECKPOINT_FORMAT}); export its encoder with the abvid version that wrote it (`abvid export CKPT "
            "--out enc.safetensors`), then embed that file or continue from it with --set model.init_from=PATH")
    missing = [k for k in needs if k not in ckpt]
    if missing:
        bare = bool(ckpt) and all(torch.is_tensor(v) for v in ckpt.values())
        hint = (" It looks like a bare state dict (timm or torch weights): start pre-training from it with "
                "--set model.init_from=PATH." if bare else "")
        raise CheckpointFormatError(
            f"{path}: not an abvid checkpoint (needs {' and '.join(map(repr, needs))}, found {sorted(ckpt)[:8]}); pass a "
            f"checkpoint written by `abvid pretrain` (RUN/checkpoints/ckpt-*.pt) or a .safetensors from "
            f"`abvid export`.{hint}")
    return version


def _is_safetensors(path: Path) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON header starting with '{'."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def save_encoder(encoder: nn.Module, encoder_kwargs: dict[str, Any], path: str | Path) -> Path:
    """Write ``encoder``'s tensors and its ``build_encoder`` kwargs to one safetensors file (atomically)."""
    kwargs = dict(encoder_kwargs)
    if isinstance(getattr(encoder, "norm", None), nn.LayerNorm):
        kwargs["norm_eps"] = float(encoder.norm.eps)       # what it was built with, whatever the caller says
    meta = {METADATA_KEY: json.dumps(kwargs, sort_keys=True), "format": "pt"}
    return _write_safetensors(encoder.state_dict(), meta, Path(path))


def save_timm(encoder: nn.Module, encoder_kwargs: dict[str, Any], path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write ``encoder`` in timm's ViT key layout (safetensors); returns (path, timm constructor kwargs).

    ``timm.models.vision_transformer.VisionTransformer(**kw)`` with the returned kwargs minus
    ``mean``, ``std`` and ``norm_eps`` loads the file with ``strict=True``; feed it
    ``(x - mean) / std`` (abvid's encoder normalises itself, timm's does not). The kwargs are
    also in the file's metadata (``abvid.timm_kwargs``).
    """
    from abvid.model.timm_layout import TIMM_METADATA_KEY, timm_kwargs, to_timm

    kw = timm_kwargs(encoder_kwargs, int(encoder.embed_dim), len(encoder.blocks),
                     int(encoder.blocks[0].attn.num_heads))
    kw["norm_eps"] = float(encoder.norm.eps)
    if kw["norm_eps"] != 1e-6:
        warnings.warn(f"this encoder uses LayerNorm eps {kw['norm_eps']:g} (written before abvid used timm's 1e-6): "
                      f"build timm's VisionTransformer with norm_layer=partial(nn.LayerNorm, eps={kw['norm_eps']:g}) "
                      "to get the same features", stacklevel=2)
    meta = {TIMM_METADATA_KEY: json.dumps(kw, sort_keys=True), "format": "pt"}
    return _write_safetensors(to_timm(encoder.state_dict()), meta, Path(path)), kw


def _write_safetensors(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    """Atomic safetensors write (temp name in the same folder, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared / non-contiguous storage: give each tensor its own contiguous copy.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``; any failure (random bytes, a truncated file, a pickle with
    objects outside torch's allow-list) becomes an error naming the file and what it should be."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises anything from IndexError to UnpicklingError here
        text = str(e).splitlines()[0][:160] if str(e) else ""
        # torch's own advice for a refused pickle is to load with weights_only=False: not ours to give
        why = "not a torch file, or it holds objects a weights-only load refuses" if (
            "weights_only" in text or not text) else text
        raise EncoderFileError(f"{path}: cannot read as a training checkpoint ({type(e).__name__}: {why}); pass a "
                               "checkpoint written by `abvid pretrain` (RUN/checkpoints/ckpt-*.pt) or a .safetensors "
                               "from `abvid export`") from e


def read_checkpoint(path: str | Path, which: Which = "ema",
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder state dict, encoder kwargs) of one encoder inside a training checkpoint.

    ``which="ema"`` on a checkpoint without an EMA encoder (its objective keeps no teacher)
    falls back to the student encoder with a warning; ``read_checkpoint.used`` is not kept:
    callers that must know call :func:`checkpoint_encoder`.
    """
    state, kwargs, _ = checkpoint_encoder(path, which, map_location)
    return state, kwargs


def checkpoint_encoder(path: str | Path, which: Which = "ema", map_location: str | torch.device = "cpu"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Which]:
    """(state dict, kwargs, the encoder actually read: 'ema' or 'student') of a training checkpoint."""
    path = Path(path)
    if which not in PREFIXES:
        raise EncoderFileError(f"which must be one of {sorted(PREFIXES)}, got '{which}'")
    ckpt = _torch_load(path, map_location)
    checkpoint_format(ckpt, path)
    if not isinstance(ckpt["model"], dict):
        raise CheckpointFormatError(f"{path}: its 'model' entry is a {type(ckpt['model']).__name__}, not a state dict")
    used: Which = which
    state = {k[len(PREFIXES[which]):]: v for k, v in ckpt["model"].items() if k.startswith(PREFIXES[which])}
    if not state and which == "ema":
        state = {k[len(PREFIXES["student"]):]: v for k, v in ckpt["model"].items()
                 if k.startswith(PREFIXES["student"])}
        if state:
            used = "student"
            warnings.warn(f"{path} has no EMA (teacher) encoder (its objective keeps none, e.g. a base method "
                          "without a target network): using the student encoder", stacklevel=3)
    if not state:
        found = sorted({k.split(".", 1)[0] + "." for k in ckpt["model"]})
        other = "student" if which == "ema" else "ema"
        raise EncoderFileError(f"{path}: no '{PREFIXES[which]}*' weights (found prefixes {found}); "
                               f"this objective may keep no {which} encoder: try which='{other}' (--which {other})")
    return state, with_norm_eps(dict(ckpt["encoder_kwargs"])), used


def _check_file(path: Path) -> None:
    """The path must be a file: a missing path or a folder gets an error saying what to pass."""
    if path.is_dir():
        found = sorted(path.glob("ckpt-*.pt")) or sorted(path.glob("checkpoints/ckpt-*.pt"))
        hint = f" (the newest checkpoint there is {found[-1]})" if found else ""
        raise EncoderFileError(f"{path} is a folder; pass a file: a training checkpoint (RUN/checkpoints/ckpt-*.pt)"
                               f"{hint} or an exported .safetensors")
    if not path.is_file():
        raise EncoderFileError(f"{path} does not exist; pass an exported .safetensors or a training checkpoint")


def _read_safetensors(path: Path, map_location: str | torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    device = str(map_location) if not isinstance(map_location, torch.device) else map_location.type
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 -- SafetensorError (header too large, bad JSON), OSError
        raise EncoderFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                               "re-export it with `abvid export`") from e


def read_encoder_file(path: str | Path, which: Which = "ema",
                      map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, kwargs) from an exported .safetensors file or a training checkpoint."""
    state, kwargs, _ = _read_any(Path(path), which, map_location)
    return state, kwargs


def _read_any(path: Path, which: Which, map_location: str | torch.device
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    _check_file(path)
    if not _is_safetensors(path):
        return checkpoint_encoder(path, which, map_location)
    state, meta = _read_safetensors(path, map_location)
    if METADATA_KEY not in meta:
        from abvid.model.timm_layout import TIMM_METADATA_KEY
        hint = (" It is in timm's layout (`abvid export --format timm`): load it with timm, or start pre-training "
                "from it with --set model.init_from=PATH." if TIMM_METADATA_KEY in meta else
                " To start pre-training from other ViT weights use --set model.init_from=PATH.")
        raise EncoderFileError(f"{path}: safetensors file without '{METADATA_KEY}' metadata; it was not written "
                               f"by `abvid export` (re-export the checkpoint).{hint}")
    return state, with_norm_eps(json.loads(meta[METADATA_KEY])), "exported"


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu", which: Which = "ema") -> nn.Module:
    """An eval-mode encoder (with ``embed()``) from an exported file or a training checkpoint.

    ``which`` picks the EMA (teacher, default) or the student encoder of a checkpoint; a
    checkpoint without an EMA encoder gives its student (with a warning). An exported file
    holds one encoder and ignores ``which``. The module keeps the kwargs it was built with as
    ``encoder.encoder_kwargs`` and where its weights came from as ``encoder.encoder_source``
    ('ema', 'student' or 'exported').
    """
    from abvid.model import build_encoder  # late: abvid.model re-exports this function

    state, kwargs, source = _read_any(Path(path), which, map_location)
    encoder = build_encoder(**kwargs)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderFileError(f"{path}: weights do not fit build_encoder(**{kwargs}): missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}; the file was written by another version of abvid")
    encoder.encoder_kwargs = dict(kwargs)
    encoder.encoder_source = source
    return encoder.to(map_location).eval()


# ---- model.init_from: start a run from exported abvid or timm ViT weights ---------------------------

def read_init_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Encoder weights in abvid's layout from any ViT file a user may hold, and a word on what it was.

    Accepts an ``abvid export`` file (either layout), a timm ViT state dict as .safetensors or as a
    ``torch.save`` file (optionally nested under 'state_dict' or 'model'), or an abvid training
    checkpoint (its EMA encoder, else its student). Only safetensors or ``torch.load(weights_only=True)``:
    a pickle that needs arbitrary code is refused.
    """
    from abvid.model.timm_layout import TimmLayoutError, from_timm, is_timm_layout

    path = Path(path)
    _check_file(path)
    if _is_safetensors(path):
        state, meta = _read_safetensors(path, "cpu")
        kind = "abvid export" if METADATA_KEY in meta else "safetensors"
    else:
        obj = _torch_load(path, "cpu")
        if isinstance(obj, dict) and "model" in obj and "encoder_kwargs" in obj:
            state, _, used = checkpoint_encoder(path, "ema", "cpu")
            return state, f"abvid training checkpoint ({used} encoder)"
        for nest in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
                obj = obj[nest]
        if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
            raise EncoderFileError(f"{path}: not a state dict of tensors (found {type(obj).__name__}); model.init_from "
                                   "takes an `abvid export` file, a timm ViT state dict (.safetensors or .pth) or a "
                                   "training checkpoint")
        state, kind = obj, "state dict"
    if is_timm_layout(state):
        try:
            return from_timm(state), f"timm ViT ({kind})"
        except TimmLayoutError as e:
            raise EncoderFileError(f"{path}: {e}") from e
    if "patch_embed.weight" not in state:
        raise EncoderFileError(f"{path}: no ViT patch embedding in it (neither 'patch_embed.weight' nor timm's "
                               f"'patch_embed.proj.weight'; keys {sorted(state)[:6]}); model.init_from takes ViT weights")
    return state, kind


def init_encoder_from(encoder: nn.Module, path: str | Path) -> str:
    """Load ViT weights from ``path`` into ``encoder`` (in place); returns a one-line description.

    The position embedding is resized (bicubic, as the encoder does for other input sizes) when only
    its grid differs; any other difference in keys or shapes is an error naming the keys, both shapes
    and the ``model.*`` settings of the file's network.
    """
    state, kind = read_init_weights(path)
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape and k != "pos_embed"]
    if missing or unexpected or wrong:
        dim = state["cls_token"].shape[-1] if "cls_token" in state else "?"
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        patch = state["patch_embed.weight"].shape[-1] if "patch_embed.weight" in state else "?"
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:4])
        raise EncoderFileError(
            f"{path} ({kind}) does not fit the encoder built from model.*: "
            + (f"shapes differ ({shapes}); " if wrong else "") + (f"missing {missing[:4]}; " if missing else "")
            + (f"unexpected {unexpected[:4]}; " if unexpected else "")
            + f"the file holds a ViT with embed_dim={dim}, depth={depth}, patch_size={patch}: set model.embed_dim, "
              "model.depth, model.num_heads and model.patch_size to match it")
    pos = state["pos_embed"]
    if pos.shape != own["pos_embed"].shape:
        n_file, n_own = pos.shape[1] - 1, own["pos_embed"].shape[1] - 1
        g_file, g_own = round(n_file ** 0.5), round(n_own ** 0.5)
        if g_file * g_file != n_file or pos.shape[-1] != own["pos_embed"].shape[-1]:
            raise EncoderFileError(f"{path}: pos_embed {tuple(pos.shape)} is not a square grid plus a class token "
                                   f"of width {own['pos_embed'].shape[-1]}; cannot resize it to {tuple(own['pos_embed'].shape)}")
        from abvid.model.vit import resize_pos_embed
        resized = resize_pos_embed(pos.float(), g_file, g_own, g_own).to(pos.dtype)
        state = {**state, "pos_embed": resized}
        kind += f", position embedding resized from {g_file}x{g_file} to {g_own}x{g_own}"
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return f"{path} ({kind})"
