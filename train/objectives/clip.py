"""CLIP-style labels / weak captions as an annotation source (Radford et al. 2021; docs/METHOD.md section 2).

Annotations ``l`` are the distinct label or caption strings of the batch
(``batch["labels"]``, one list per clip; sorted, so every rank and rerun agrees),
embedded by the bag-of-tokens text encoder (model/text.py); views are embedded by
a projector on the CLS token. ``p(l | x) = softmax_l(t * z_x . psi_l)`` with a
learned temperature ``t`` (CLIP's ``logit_scale``).

Base loss (symmetric, multi-positive CLIP loss over all views of labelled clips):
image -> text: soft-target CE against the clip's labels as a normalised
multi-hot vector; text -> image: each text against all B*n views, uniform over
the views of clips that carry it. Clips without labels still get bootstrapping
targets (the teacher scores them against the batch's texts), which is how
AB_CLIP uses unlabelled video; a batch without any text gives a zero loss.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from abvid.model.heads import Norm, ProjectionHead
from abvid.model.text import TextEncoder

from .bootstrap import scored


def batch_texts(labels: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Distinct texts of a batch (sorted) and the (B, L) bool multi-hot of which clip carries which."""
    texts = sorted({t for row in labels for t in row})
    index = {t: i for i, t in enumerate(texts)}
    hot = torch.zeros(len(labels), len(texts), dtype=torch.bool)
    for b, row in enumerate(labels):
        for t in row:
            hot[b, index[t]] = True
    return texts, hot


class CLIPHead(nn.Module):
    """Image projector + text encoder + learned logit scale; ``forward(h)`` embeds views (unit vectors)."""

    def __init__(self, in_dim: int, vocab: Sequence[str], out_dim: int = 128, hidden_dim: int = 2048,
                 text_embed_dim: int = 256, init_temp: float = 0.07, norm: Norm = "ln"):
        super().__init__()
        self.image = ProjectionHead(in_dim, out_dim, hidden_dim, norm)
        self.text = TextEncoder(vocab, out_dim, text_embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temp)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.image(h)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


class CLIPFamily(nn.Module):
    """Annotations = the batch's label / caption texts, scored CLIP-style."""

    needs_teacher_for_base = False

    def annotations(self, head: CLIPHead, z: torch.Tensor, batch: dict[str, Any]):
        texts, _ = batch_texts(batch["labels"])
        return head.text(texts), None                                  # (L, d)

    def target_probs(self, head: CLIPHead, z: torch.Tensor, psi: torch.Tensor, exclude, teacher_temp: float,
                     group: str = "global"):
        return scored(z, psi, head.scale(), None).softmax(-1)          # (B, n_t, L)

    def base_loss(self, head: CLIPHead, z: torch.Tensor, psi: torch.Tensor, p_t, batch: dict[str, Any]):
        B, n = z.shape[:2]
        _, hot = batch_texts(batch["labels"])                          # (B, L) on the CPU: no device sync
        if psi.shape[0] == 0 or not hot.any():
            return z.sum() * 0.0 + head.logit_scale * 0.0, {"clip_temp": 1.0 / head.scale().detach()}
        labelled = hot.any(-1).to(z.device)                            # (B,)
        hot = hot.to(z.device)
        logits = scored(z, psi, head.scale(), None)                    # (B, n, L)
        # image -> text: multi-hot target of the view's clip
        i2t_target = hot.float() / hot.sum(-1, keepdim=True).clamp_min(1)
        i2t = -(i2t_target[:, None] * logits.log_softmax(-1)).sum(-1)  # (B, n)
        i2t = i2t[labelled].mean()
        # text -> image: every text against all B*n views, uniform over views of clips that carry it
        t_logits = logits.reshape(B * n, -1).t()                       # (L, B*n)
        t_pos = hot.t()[:, :, None].expand(-1, B, n).reshape(-1, B * n).float()
        t2i = -((t_pos / t_pos.sum(-1, keepdim=True)) * t_logits.log_softmax(-1)).sum(-1).mean()
        with torch.no_grad():
            acc = hot[:, None].expand(B, n, -1).gather(-1, logits.argmax(-1, keepdim=True))[labelled].float().mean()
        return 0.5 * (i2t + t2i), {"clip_temp": 1.0 / head.scale().detach(), "label_acc": acc,
                                   "num_texts": float(psi.shape[0])}

    def update_state(self, z_global: torch.Tensor, psi: torch.Tensor, z_local: torch.Tensor | None = None) -> None:
        pass
