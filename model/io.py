"""Encoder files: write an encoder alone (safetensors), read it back from that or from a training checkpoint.

Two inputs give the same thing, an eval-mode encoder with ``embed()``:

* an exported ``.safetensors`` file (``abvid export``): the encoder's tensors, and
  ``build_encoder`` kwargs as JSON in the file's metadata (key ``abvid.encoder_kwargs``),
  so loading needs no training config and no pickle;
* a training checkpoint (docs/INTERFACES.md): a plain dict whose ``model`` entry is
  the objective's state dict, with the EMA encoder under ``teacher_encoder.`` and the
  student under ``student_encoder.``, and ``encoder_kwargs``. Read with
  ``torch.load(weights_only=True)``. The EMA (teacher) is the default: it is the
  encoder DINO-style methods evaluate.

    enc = load_encoder("encoder.safetensors")            # or "run/ckpt-001000.pt"
    z = enc.embed(frames_uint8)                           # (B, D)
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

METADATA_KEY = "abvid.encoder_kwargs"
PREFIXES = {"ema": "teacher_encoder.", "student": "student_encoder."}
Which = Literal["ema", "student"]


class EncoderFileError(ValueError):
    """The file is not an abvid encoder or checkpoint, or lacks the requested weights."""


def _is_safetensors(path: Path) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON header starting with '{'."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def save_encoder(encoder: nn.Module, encoder_kwargs: dict[str, Any], path: str | Path) -> Path:
    """Write ``encoder``'s tensors and its ``build_encoder`` kwargs to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared / non-contiguous storage: give each tensor its own contiguous copy.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {METADATA_KEY: json.dumps(encoder_kwargs, sort_keys=True), "format": "pt"}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, which: Which = "ema",
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder state dict, encoder kwargs) of one encoder inside a training checkpoint."""
    path = Path(path)
    if which not in PREFIXES:
        raise EncoderFileError(f"which must be one of {sorted(PREFIXES)}, got '{which}'")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # truncated / foreign file
        raise EncoderFileError(f"{path}: cannot read as a training checkpoint ({e}); pass a checkpoint written "
                               "by `abvid pretrain` or a .safetensors from `abvid export`") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "encoder_kwargs" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EncoderFileError(f"{path}: not an abvid checkpoint (needs 'model' and 'encoder_kwargs', found {keys})")
    prefix = PREFIXES[which]
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state and which == "ema" and any(k.startswith(PREFIXES["student"]) for k in ckpt["model"]):
        # base methods without a teacher (plain SimCLR / CLIP) keep no EMA encoder: the student is the encoder
        warnings.warn(f"{path}: no EMA (teacher) encoder in this checkpoint (its objective builds none); "
                      "using the student encoder", stacklevel=3)
        prefix = PREFIXES["student"]
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        found = sorted({k.split(".", 1)[0] + "." for k in ckpt["model"]})
        other = "student" if which == "ema" else "ema"
        raise EncoderFileError(f"{path}: no '{prefix}*' weights (found prefixes {found}); "
                               f"this objective may keep no {which} encoder: try which='{other}' (--which {other})")
    return state, dict(ckpt["encoder_kwargs"])


def read_encoder_file(path: str | Path, which: Which = "ema",
                      map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, kwargs) from an exported .safetensors file or a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise EncoderFileError(f"{path} does not exist; pass an exported .safetensors or a training checkpoint")
    if not _is_safetensors(path):
        return read_checkpoint(path, which, map_location)
    from safetensors import safe_open

    device = str(map_location) if not isinstance(map_location, torch.device) else map_location.type
    with safe_open(str(path), framework="pt", device=device) as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise EncoderFileError(f"{path}: safetensors file without '{METADATA_KEY}' metadata; "
                                   "it was not written by `abvid export` (re-export the checkpoint)")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(meta[METADATA_KEY])


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu", which: Which = "ema") -> nn.Module:
    """An eval-mode encoder (with ``embed()``) from an exported file or a training checkpoint.

    ``which`` picks the EMA (teacher, default) or the student encoder of a checkpoint;
    an exported file holds one encoder and ignores it. The kwargs it was built with
    are kept on the module as ``encoder.encoder_kwargs``.
    """
    from abvid.model import build_encoder  # late: abvid.model re-exports this function

    state, kwargs = read_encoder_file(path, which, map_location)
    encoder = build_encoder(**kwargs)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderFileError(f"{path}: weights do not fit build_encoder(**{kwargs}): missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}; the file was written by another version of abvid")
    encoder.encoder_kwargs = dict(kwargs)
    return encoder.to(map_location).eval()
