"""Projection heads on top of the encoder: DINO prototype head and SimCLR / CLIP projector.

DINOHead follows DINO (Caron et al. 2021, ``dino_head.py``): an MLP to a
bottleneck, L2 normalisation, then K prototypes in a weight-normalised linear
layer with the gain FIXED at 1 (DINO's ``norm_last_layer=True``). Here the fixed
gain is structural: the prototypes are stored as plain vectors and normalised
on every call, so there is no gain parameter that weight decay could shrink
(METHOD.md section 2, "known traps": a decayed trainable gain drives every
logit to 0 and the teacher to uniform). Logits are therefore cosines in
[-1, 1]; the objective divides them by a temperature.

ProjectionHead is SimCLR's projector (Chen et al. 2020): Linear -> norm -> GELU
-> Linear, L2-normalised output, used for instance (SimCLR) and image-text (CLIP)
scoring.

Both heads return L2-normalised embeddings ``z``; annotations ``psi`` are
L2-normalised too, so every annotation score is ``scale * z . psi``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Norm = Literal["none", "ln", "bn"]


class BatchNormAnyShape(nn.BatchNorm1d):
    """BatchNorm1d over the last axis of (..., C): statistics over every leading position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def _norm(kind: Norm, dim: int) -> nn.Module:
    if kind == "bn":
        return BatchNormAnyShape(dim)
    return nn.LayerNorm(dim) if kind == "ln" else nn.Identity()


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """h (..., in_dim) -> z (..., bottleneck) unit vectors; ``prototypes()`` (K, bottleneck) unit vectors.

    ``norm`` goes after each hidden linear layer. ``"bn"`` (batch statistics)
    is what keeps DINO from collapsing at toy scale: it removes the direction
    all images share at initialisation, so the head's outputs differ across
    images from the first step (train/objectives/dino.py has the measurements).
    """

    def __init__(self, in_dim: int, num_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm: Norm = "none"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least 1 layer, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), _norm(norm, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        # Direction-only prototypes = weight norm with gain fixed at 1.
        self.prototype_weight = nn.Parameter(torch.randn(num_prototypes, bottleneck_dim) / bottleneck_dim ** 0.5)

    @property
    def num_prototypes(self) -> int:
        return self.prototype_weight.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(h), dim=-1, eps=1e-6)          # (..., bottleneck)

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototype_weight, dim=-1, eps=1e-6)  # (K, bottleneck)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Cosine logits (..., K) in [-1, 1], before any temperature."""
        return self(h) @ self.prototypes().t()

    def no_weight_decay(self) -> set[str]:
        return {"prototype_weight"}


class ProjectionHead(nn.Module):
    """SimCLR projector: h (..., in_dim) -> Linear -> norm -> GELU -> Linear -> unit vector (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, norm: Norm = "ln"):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), _norm(norm, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim))
        self.mlp.apply(_init_linear)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(h), dim=-1, eps=1e-6)
