"""Checkpoints: a plain dict, written atomically, the last k kept, read back safely.

nanoGPT / DINOv2 style: a checkpoint is a plain dict and resuming goes through
the same code path as a fresh start (build everything, then load the dict).
The dict (docs/INTERFACES.md):

    {"model": objective.state_dict(),   # student, heads and EMA teacher in one dict
     "optimizer": ..., "scaler": None, "step": int, "epoch": int,
     "loader_state": {"world_size": W, "ranks": [StatefulDataLoader.state_dict() per rank]} | None,
     "rng": {"world_size": W, "ranks": [capture_rng() per rank]},
     "config": to_dict(PretrainConfig), "encoder_kwargs": {...},
     "format_version": CHECKPOINT_FORMAT}   # added by save_checkpoint (model/io.py defines it)

Loader and RNG states are stored per rank (gathered to rank 0) because every
rank reads different data and draws different random numbers; a resume with
the same world size continues each rank exactly where it stopped.

Writing: ``torch.save`` into ``<name>.tmp`` in the same folder, ``fsync``,
``os.replace`` onto ``ckpt-<step:08d>.pt``, then ``fsync`` of the folder, so a
crash at any moment leaves either the old or the new file, never half of one.
Reading: ``torch.load(..., weights_only=True)`` always (no arbitrary code from a
checkpoint file); a newest file that fails to load (truncated copy, disk full
on a filesystem without atomic rename) gives a warning and the previous one.
A checkpoint of a format version this abvid does not read (model/io.py
``checkpoint_format``: newer, too old, or no abvid checkpoint at all) is not
damage: it stops the resume with what to do, instead of falling back to an
older file that would fail the same way.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abvid.model.io import CHECKPOINT_FORMAT, CheckpointFormatError, checkpoint_format
from abvid.pipeline.errors import UsageError

log = logging.getLogger("abvid.train")

CKPT_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")


class CheckpointError(UsageError, RuntimeError):
    """No usable checkpoint: unreadable, truncated, not a training checkpoint, or another run's (exit 2)."""


class UnsafeCheckpointError(CheckpointError):
    """A well-formed checkpoint holding a type ``torch.load(weights_only=True)`` refuses (a bug, not damage)."""


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint of another format version, or a dict that is no abvid checkpoint."""


def ckpt_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files in ``ckpt_dir``, oldest first (by the step in the name)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep_last: int = 3) -> Path:
    """Write ``state`` atomically as ``ckpt_dir/ckpt-<step>.pt``; delete all but the newest ``keep_last``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    state = {**state, "format_version": CHECKPOINT_FORMAT}
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; errors name the file and what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for bad files
        if "Unsupported global" in str(e):  # a well-formed file with a type the safe unpickler refuses
            raise UnsafeCheckpointError(
                f"{path} holds objects that torch.load(weights_only=True) refuses (a non-tensor, non-builtin "
                f"type, e.g. a numpy array in the loader state). Store plain Python/tensor values instead. ({e})"
            ) from e
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt?): {type(e).__name__}: {e}") from e
    try:
        checkpoint_format(state, path, needs=("step",))
    except CheckpointFormatError as e:
        raise IncompatibleCheckpointError(f"{e} (to resume: move it out of the checkpoints folder, or start "
                                          "over with --no-resume)") from e
    return state


def load_latest(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest loadable checkpoint in ``ckpt_dir`` (corrupt newer ones are skipped with a warning)."""
    paths = list_checkpoints(ckpt_dir)
    for path in reversed(paths):
        try:
            return load_checkpoint(path, map_location), path
        except CheckpointError as e:
            if isinstance(e, (UnsafeCheckpointError, IncompatibleCheckpointError)):
                raise  # not corruption: an older file would fail the same way
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, e)
    if paths:
        raise CheckpointError(f"no loadable checkpoint in {ckpt_dir} ({len(paths)} files, all corrupt); "
                              f"delete them or start over with --no-resume")
    return None


# ---- RNG state: python, numpy, torch CPU, torch CUDA --------------------------------------------

def capture_rng() -> dict[str, Any]:
    """RNG states of this process in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`. CUDA states are restored only when the device count matches."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; not restored",
                        len(cuda), torch.cuda.device_count())
