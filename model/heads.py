"""Projection heads on top of the encoder: DINO prototype head and SimCLR / CLIP projector.

DINOHead follows DINO (Caron et al. 2021, ``dino_head.py``): an MLP to a
bottleneck, L2 normalisation, then K prototypes in a weight-normalised linear
layer with the gain FIXED at 1 (DINO's ``norm_last_layer=True``). Here the fixed
gain is structural: the prototypes are stored as plain vectors and normalised
on every call, so there is no gain parameter that weight decay could shrink
(docs/METHOD.md section 2, "known traps": a decayed trainable gain drives every
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


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient is summed over ranks too (every rank's loss depends on every input).
    Written out because torch.distributed.nn.functional.all_reduce is deprecated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class BatchNormAnyShape(nn.BatchNorm1d):
    """BatchNorm1d over the last axis of (..., C): statistics over every leading position.

    Training under a process group (DDP), the statistics are those of the global batch, over every
    rank, as SyncBatchNorm computes them (DINO converts its BN heads to SyncBatchNorm; SimCLR uses
    global BN): two differentiable all-reduces of C floats, the mean, then the centred squares, in
    float32. ``nn.SyncBatchNorm.convert_sync_batchnorm`` would not do here: it normalises axis 1,
    this layer the last axis. Evaluation uses the running statistics, identical on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and _world_size() > 1:
            return self._global_batch_norm(flat).view(x.shape)
        return super().forward(flat).view(x.shape)

    def _global_batch_norm(self, flat: torch.Tensor) -> torch.Tensor:
        all_reduce = _AllReduceSum.apply
        f = flat.float()
        sums = all_reduce(torch.cat([f.sum(0), f.new_full((1,), f.shape[0])]))      # sum over ranks
        count = sums[-1]
        mean = sums[:-1] / count
        var = all_reduce(((f - mean) ** 2).sum(0)) / count                             # biased, as BN
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_((var * count / (count - 1).clamp_min(1)).detach(), m)
        out = (f - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(flat.dtype)


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
