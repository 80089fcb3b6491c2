"""Pairwise actions between views: the "a" of a transition (view i -> action -> view j).

docs/METHOD.md section 1: an action is the change from one view to another: the
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

``dt`` is counted in frames of the corpus (the ``--fps`` of ``abvid preprocess``,
stored as ``fps`` in every clip's JSON): one frame is ``1 / fps`` seconds. Its range
follows from the view sampler (``max_abs_dt``): up to ``data.max_dt`` between the
anchor and a view, so up to twice that between two views in ``symmetric`` mode.

``actions_between`` is the general form: from each of ``n`` source views to each
of ``m`` target views, which need not be views of the batch -- the next actions
``A'`` of annotation bootstrapping go to freshly sampled views that are never rendered.
"""
from __future__ import annotations

import torch

# Augmentation parameters recorded per view, in this order (pipeline/views.py fills them).
AUG_FIELDS = ("flip", "brightness", "contrast", "saturation", "hue", "grey", "blur_sigma", "solarize")
AUG_DIM = len(AUG_FIELDS)
GEOM_FIELDS = ("dy", "dx", "log_sh", "log_sw", "dt")
ACTION_FIELDS = GEOM_FIELDS + tuple(f"aug_{f}" for f in AUG_FIELDS)
ACTION_DIM = len(ACTION_FIELDS)


def relative_boxes(boxes: torch.Tensor, flip: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """Box of every target view j in the coordinates of every source view i.

    boxes: (B, n, 4) source boxes as (y0, x0, h, w) normalised to the frame; flip: (B, n) of 0/1 or None
    (the sources' flips); targets: (B, m, 4) target boxes, default the sources themselves.
    Returns (B, n, m, 4) as (dy, dx, log_sh, log_sw).
    """
    targets = boxes if targets is None else targets
    y0, x0, h, w = boxes.unbind(-1)                      # each (B, n)
    ty0, tx0, th, tw = targets.unbind(-1)                # each (B, m)
    src = lambda t: t[:, :, None]                         # (B, n, 1): view i
    dst = lambda t: t[:, None, :]                         # (B, 1, m): view j
    dy = (dst(ty0) - src(y0)) / src(h)
    dx = (dst(tx0) - src(x0)) / src(w)
    sw = dst(tw) / src(w)
    if flip is not None:
        f = src(flip.to(boxes.dtype))
        dx = f * (1.0 - dx - sw) + (1.0 - f) * dx       # mirror inside a flipped source view
    log_sh = torch.log(dst(th) / src(h))
    log_sw = torch.log(sw)
    return torch.stack([dy, dx, log_sh, log_sw], dim=-1)


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compose relative boxes (..., 4): ``a`` = j in i's coordinates, ``b`` = k in j's -> k in i's."""
    dy = a[..., 0] + torch.exp(a[..., 2]) * b[..., 0]
    dx = a[..., 1] + torch.exp(a[..., 3]) * b[..., 1]
    return torch.stack([dy, dx, a[..., 2] + b[..., 2], a[..., 3] + b[..., 3]], dim=-1)


def actions_between(boxes: torch.Tensor, frame_idx: torch.Tensor, aug: torch.Tensor, to_boxes: torch.Tensor,
                    to_frame_idx: torch.Tensor, to_aug: torch.Tensor) -> torch.Tensor:
    """Actions from each of n source views to each of m target views.

    boxes (B, n, 4) float, frame_idx (B, n) int, aug (B, n, AUG_DIM) float describe the sources;
    to_boxes (B, m, 4), to_frame_idx (B, m), to_aug (B, m, AUG_DIM) the targets.
    Returns (B, n, m, ACTION_DIM) float32 laid out as ACTION_FIELDS.
    """
    for name, a in (("aug", aug), ("to_aug", to_aug)):
        if a.shape[-1] != AUG_DIM:
            raise ValueError(f"{name} has {a.shape[-1]} fields, expected {AUG_DIM} ({', '.join(AUG_FIELDS)})")
    B, n, m = boxes.shape[0], boxes.shape[1], to_boxes.shape[1]
    rel = relative_boxes(boxes.float(), flip=aug[..., AUG_FIELDS.index("flip")], targets=to_boxes.float())
    dt = (to_frame_idx[:, None, :] - frame_idx[:, :, None]).to(rel.dtype)     # (B, n, m): j - i
    target_aug = to_aug.float()[:, None, :, :].expand(B, n, m, AUG_DIM)        # aug of view j
    return torch.cat([rel, dt[..., None], target_aug], dim=-1)


def pairwise_actions(boxes: torch.Tensor, frame_idx: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """All ordered-pair actions between the n views of each clip: (B, n, n, ACTION_DIM)."""
    return actions_between(boxes, frame_idx, aug, boxes, frame_idx, aug)
