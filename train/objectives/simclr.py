"""SimCLR as an annotation source: instance discrimination over the batch (Chen et al. 2020; docs/METHOD.md section 2).

The annotation of a view is "which other view in the batch came from the same
clip". Annotations ``l`` are the batch's views themselves: ``psi_l`` is the
projector output of view l (model/heads.ProjectionHead), and
``p(l | x) = softmax_l(z_x . psi_l / tau)`` over all B*n views of the batch
except x itself (``exclude``). Positives for the base loss are the other views
with the same ``clip_id`` (multi-positive InfoNCE, i.e. soft-target CE with a
uniform target over the positives; with n = 2 views this is SimCLR's NT-Xent).
The negatives rule out DINO's collapse, so SimCLR is the safe toy-scale source.

Bootstrapping (AB_SimCLR) predicts, from view i and action a_ij, the teacher's
distribution over the batch's views for view j; j itself is not a candidate.

Under DDP the batch is the global one, as in SimCLR: every rank's views are gathered
(rank order) and are candidates for every other rank's views, gradients flowing back to
the rank that owns each view (``gather_views``), so W ranks x B clips train like one
process with W*B clips (tests/test_objectives.py checks loss and gradients against that).
Ranks must hold equal batches, which the endless training stream always gives.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .bootstrap import scored


def gather_views(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N, ...) -> ((world * N, ...) rows of every rank in rank order, this rank's first row); identity outside DDP.

    With ``x.requires_grad`` the gather is differentiable (``_AllGatherRows``): each rank's rows get the
    gradients of every rank's loss; DDP's averaging then makes it the gradient of the mean loss.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    rows = _AllGatherRows.apply(x) if x.requires_grad else _gather_rows(x)
    return rows, dist.get_rank() * x.shape[0]


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _AllGatherRows(torch.autograd.Function):
    """Differentiable all_gather (torch.distributed.nn's is deprecated): the gradient of this rank's rows
    is summed over every rank's use of them (an all-reduce of the whole gradient, then this rank's slice;
    the rows are few: B * n embeddings)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return _gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def self_mask(B: int, n: int, device: torch.device, columns: int | None = None, offset: int = 0) -> torch.Tensor:
    """(B, n, columns) bool: True at view (b, j)'s own column ``offset + b*n + j`` (columns defaults to B*n)."""
    columns = B * n if columns is None else columns
    mask = torch.zeros(B * n, columns, dtype=torch.bool, device=device)
    rows = torch.arange(B * n, device=device)
    mask[rows, rows + offset] = True
    return mask.view(B, n, columns)


class SimCLRFamily(nn.Module):
    """Annotations = the batch's views; InfoNCE base loss with temperature ``temperature``."""

    needs_teacher_for_base = False

    def __init__(self, temperature: float = 0.1, target_temperature: float | None = None):
        super().__init__()
        self.temperature = temperature
        # p(l | x') as a bootstrap target: the instance distribution over the batch at its own temperature
        # (the base loss never reads it). A lower one sharpens targets that are near uniform early on.
        self.target_temperature = temperature if target_temperature is None else target_temperature

    def annotations(self, head: nn.Module, z: torch.Tensor, batch: dict[str, Any]):
        B, n = z.shape[:2]
        psi, offset = gather_views(z.reshape(B * n, -1))              # (W*B*n, d): every rank's views
        return psi, self_mask(B, n, z.device, psi.shape[0], offset)   # exclude (B, n, W*B*n)

    def target_probs(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, exclude, teacher_temp: float,
                     group: str = "global"):
        return scored(z, psi, 1.0 / self.target_temperature, exclude).softmax(-1)

    def base_loss(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, p_t, batch: dict[str, Any]):
        B, n = z.shape[:2]
        clip = batch["clip_id"].to(z.device)
        clip_all, first = gather_views(clip)                           # (W*B,) clip ids of every rank
        exclude = self_mask(B, n, z.device, psi.shape[0], first * n)
        logp = scored(z, psi, 1.0 / self.temperature, exclude).log_softmax(-1).masked_fill(exclude, 0.0)
        Bw = clip_all.shape[0]
        same = (clip[:, None] == clip_all[None, :])                    # (B, W*B): same clip
        pos = same[:, None, :, None].expand(B, n, Bw, n).reshape(B, n, Bw * n) & ~exclude
        target = pos.float() / pos.sum(-1, keepdim=True).clamp_min(1)  # uniform over positives
        loss = -(target * logp).sum(-1).mean()
        with torch.no_grad():                                          # top-1 retrieval of a positive
            top = logp.masked_fill(exclude, float("-inf")).argmax(-1)
            acc = pos.gather(-1, top[..., None]).float().mean()
        return loss, {"instance_acc": acc, "temperature": self.temperature}

    def update_state(self, z_global: torch.Tensor, psi: torch.Tensor, z_local: torch.Tensor | None = None) -> None:
        pass
