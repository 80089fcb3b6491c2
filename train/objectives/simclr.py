"""SimCLR as an annotation source: instance discrimination over the batch (Chen et al. 2020; METHOD.md section 2).

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
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .bootstrap import scored


def self_mask(B: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, n, B*n) bool: True at view (b, j)'s own column."""
    return torch.eye(B * n, dtype=torch.bool, device=device).view(B, n, B * n)


class SimCLRFamily(nn.Module):
    """Annotations = the batch's views; InfoNCE base loss with temperature ``temperature``."""

    needs_teacher_for_base = False

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def annotations(self, head: nn.Module, z: torch.Tensor, batch: dict[str, Any]):
        B, n = z.shape[:2]
        return z.reshape(B * n, -1), self_mask(B, n, z.device)        # psi (B*n, d), exclude (B, n, B*n)

    def target_probs(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, exclude, teacher_temp: float):
        return scored(z, psi, 1.0 / self.temperature, exclude).softmax(-1)

    def base_loss(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, p_t, batch: dict[str, Any]):
        B, n = z.shape[:2]
        exclude = self_mask(B, n, z.device)
        logp = scored(z, psi, 1.0 / self.temperature, exclude).log_softmax(-1).masked_fill(exclude, 0.0)
        clip = batch["clip_id"].to(z.device)
        same = (clip[:, None] == clip[None, :])                        # (B, B): same clip
        pos = same[:, None, :, None].expand(B, n, B, n).reshape(B, n, B * n) & ~exclude
        target = pos.float() / pos.sum(-1, keepdim=True).clamp_min(1)  # uniform over positives
        loss = -(target * logp).sum(-1).mean()
        with torch.no_grad():                                          # top-1 retrieval of a positive
            top = logp.masked_fill(exclude, float("-inf")).argmax(-1)
            acc = pos.gather(-1, top[..., None]).float().mean()
        return loss, {"instance_acc": acc, "temperature": self.temperature}

    def update_state(self, z: torch.Tensor, psi: torch.Tensor) -> None:
        pass
