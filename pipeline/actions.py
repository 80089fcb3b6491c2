"""Pairwise actions between views: the "a" of a transition (view i -> action -> view j).

METHOD.md section 1: an action is the change from one view to another: the
target box in the source view's coordinates, the temporal offset, and the
augmentation applied to the target. For a batch of clips with ``n`` views each
we build every ordered pair at once: ``(B, n, n, A)``, entry ``[b, i, j]`` is
the action that leads from view ``i`` to view ``j``.

Layout of the last axis (``ACTION_FIELDS``):

    dy, dx        top-left corner of box j in box i's coordinates
                  (0, 0) = i's top-left, (1, 1) = i's bottom-right
    log_sh, log_sw  log of j's height / width relative to i's
    dt            frame offset (j - i) at the corpus fps; may be negative
    aug_*         the target view's augmentation parameters (AUG_FIELDS)

Coordinates are those of what the model sees: when source view i is
horizontally flipped, x runs right-to-left inside box i, so ``dx`` is measured
from i's (mirrored) left edge. The identity pair (i -> i, unflipped) is the
zero move ``(0, 0, 0, 0, 0)``. For unflipped views boxes compose like affine
maps: ``compose(rel(i, j), rel(j, k)) == rel(i, k)`` (tested).
"""
from __future__ import annotations

import torch

# Augmentation parameters recorded per view, in this order (pipeline/views.py fills them).
AUG_FIELDS = ("flip", "brightness", "contrast", "saturation", "hue", "grey", "blur_sigma", "solarize")
AUG_DIM = len(AUG_FIELDS)
GEOM_FIELDS = ("dy", "dx", "log_sh", "log_sw", "dt")
ACTION_FIELDS = GEOM_FIELDS + tuple(f"aug_{f}" for f in AUG_FIELDS)
ACTION_DIM = len(ACTION_FIELDS)


def relative_boxes(boxes: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Box of every view j in the coordinates of every view i.

    boxes: (B, n, 4) as (y0, x0, h, w) normalised to the frame; flip: (B, n) of 0/1 or None.
    Returns (B, n, n, 4) as (dy, dx, log_sh, log_sw).
    """
    y0, x0, h, w = boxes.unbind(-1)                      # each (B, n)
    src = lambda t: t[:, :, None]                         # (B, n, 1): view i
    dst = lambda t: t[:, None, :]                         # (B, 1, n): view j
    dy = (dst(y0) - src(y0)) / src(h)
    dx = (dst(x0) - src(x0)) / src(w)
    sw = dst(w) / src(w)
    if flip is not None:
        f = src(flip.to(boxes.dtype))
        dx = f * (1.0 - dx - sw) + (1.0 - f) * dx       # mirror inside a flipped source view
    log_sh = torch.log(dst(h) / src(h))
    log_sw = torch.log(sw)
    return torch.stack([dy, dx, log_sh, log_sw], dim=-1)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compose relative boxes (..., 4): ``a`` = j in i's coordinates, ``b`` = k in j's -> k in i's."""
    dy = a[..., 0] + torch.exp(a[..., 2]) * b[..., 0]
    dx = a[..., 1] + torch.exp(a[..., 3]) * b[..., 1]
    return torch.stack([dy, dx, a[..., 2] + b[..., 2], a[..., 3] + b[..., 3]], dim=-1)


def pairwise_actions(boxes: torch.Tensor, frame_idx: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """All ordered-pair actions of a batch.

    boxes: (B, n, 4) float; frame_idx: (B, n) int; aug: (B, n, AUG_DIM) float.
    Returns (B, n, n, ACTION_DIM) float32 laid out as ACTION_FIELDS.
    """
    B, n, _ = boxes.shape
    if aug.shape[-1] != AUG_DIM:
        raise ValueError(f"aug has {aug.shape[-1]} fields, expected {AUG_DIM} ({', '.join(AUG_FIELDS)})")
    boxes = boxes.float()
    rel = relative_boxes(boxes, flip=aug[..., AUG_FIELDS.index("flip")])    # (B, n, n, 4)
    dt = (frame_idx[:, None, :] - frame_idx[:, :, None]).to(rel.dtype)      # (B, n, n): j - i
    target_aug = aug.float()[:, None, :, :].expand(B, n, n, AUG_DIM)        # aug of view j
    return torch.cat([rel, dt[..., None], target_aug], dim=-1)
