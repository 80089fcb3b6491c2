"""Action tokeniser and value decoder: phi_AB(x, a) of annotation bootstrapping (docs/METHOD.md section 3).

The value head ``Q(l | x, a)`` reads the source view's patch tokens and an
action ``a`` (pipeline/actions.py, ``ACTION_FIELDS``) and outputs one vector
``phi_AB(x, a)`` that the objective scores against the annotations.

Tokens (``ActionTokenizer``): ``dy, dx, log_sh, log_sw`` give one token each,
``dt`` one token (one embedding per integer frame offset ``-max_dt..max_dt``;
dropped when ``temporal=False``), and the target's augmentation parameters one
token together (the sum of one bin embedding per augmentation field) -- 6 tokens
per action, 5 without time. The place fields are encoded in one of two ways
(``encoding``):

* ``"fourier"`` (default): the value and ``sin / cos(2 pi 2^k v)`` for
  ``k = -2..5`` (periods from 4 box sizes down to 1/32 of one), mapped to a token
  by a linear layer per field. A local crop inside a global view is placed to a
  small fraction of the box, wherever in [-4, 4] the move lands.
* ``"bins"``: the value clamped to [-4, 4] (``GEOM_RANGES``) and cut into
  ``num_bins`` uniform bins, one learned embedding each. With 16 bins (the first
  design) a bin is half a source box wide, so a local crop inside a global view
  falls into about 2 bins per axis: Q knows the quadrant, not the place.

The choice between them was made on validation runs (docs/EXPERIMENTS.md, "Choices
made on validation"). With ``action_tokens=False`` every action becomes the same learned mask
tokens, so ``Q`` no longer depends on the action (the paper's invariant ablation).

Decoder (``ValueDecoder``): ``depth`` pre-norm layers of self-attention among a
pair's tokens, cross-attention from the tokens to the source's patch tokens,
and an MLP; mean-pooled, projected to the annotation space of the family
(DINO's bottleneck, the SimCLR / CLIP projection width) and L2-normalised, so
``Q = softmax(t_AB * phi_AB . psi)`` scores it directly against the same
unit-norm annotations ``psi`` as the base method. It is cheap by construction: keys/values of a source view are computed once and shared by all
``M`` actions leaving it (queries of shape ``(S, M*T)`` against ``(S, N)`` keys),
and it runs at its own small width.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from abvid.pipeline.actions import ACTION_FIELDS, AUG_FIELDS, GEOM_FIELDS

# Clamp ranges of the continuous fields; values outside land in the edge bins.
# dy/dx reach about +-4 when a small local crop looks at a full-frame global one.
GEOM_RANGES = {"dy": (-4.0, 4.0), "dx": (-4.0, 4.0), "log_sh": (-2.5, 2.5), "log_sw": (-2.5, 2.5)}
# Augmentation fields as pipeline/views.py records them (0 = unaugmented): colour factors as
# "factor - 1" (defaults +-0.4 / +-0.2), hue in turns (+-0.1), blur sigma in pixels (0.1-2), flags 0/1.
# Symmetric ranges put "no change" (0) on a bin edge's right side, shared with small positive changes.
AUG_RANGES = {"flip": (0.0, 1.0), "brightness": (-0.5, 0.5), "contrast": (-0.5, 0.5), "saturation": (-0.5, 0.5),
              "hue": (-0.2, 0.2), "grey": (0.0, 1.0), "blur_sigma": (0.0, 2.0), "solarize": (0.0, 1.0)}


FOURIER_OCTAVES = tuple(range(-2, 6))     # frequencies 2^k cycles per box size: periods 4 .. 1/32


def fourier_features(v: torch.Tensor) -> torch.Tensor:
    """(...,) -> (..., 1 + 2 * len(FOURIER_OCTAVES)): v itself, then sin and cos of 2 pi 2^k v (fp32)."""
    v = v.float()
    f = torch.tensor([2.0 ** k for k in FOURIER_OCTAVES], device=v.device) * (2 * math.pi)
    ang = v[..., None] * f
    return torch.cat([v[..., None], ang.sin(), ang.cos()], dim=-1)


def discretise(v: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """Uniform bins over [lo, hi] -> int64 in [0, bins - 1] (out-of-range values clamp to the edge bins)."""
    idx = torch.floor((v.float() - lo) / (hi - lo) * bins)
    return idx.clamp_(0, bins - 1).long()


class ActionTokenizer(nn.Module):
    """actions (..., ACTION_DIM) -> tokens (..., T, dim); T = 6 (5 with ``temporal=False``)."""

    def __init__(self, dim: int, num_bins: int = 16, max_dt: int = 16, temporal: bool = True,
                 action_tokens: bool = True, encoding: Literal["fourier", "bins"] = "fourier"):
        super().__init__()
        if encoding not in ("fourier", "bins"):
            raise ValueError(f"action encoding must be 'fourier' or 'bins', got {encoding!r}")
        self.num_bins, self.max_dt, self.encoding = num_bins, max_dt, encoding
        self.temporal, self.action_tokens = temporal, action_tokens
        self.num_tokens = len(GEOM_RANGES) + int(temporal) + 1
        # Only the tables in use exist: a parameter that never gets a gradient would upset DDP.
        self.mask_tokens = self.geom = self.geom_proj = self.dt = self.aug = None
        if not action_tokens:
            self.mask_tokens = nn.Parameter(torch.zeros(self.num_tokens, dim))
        else:
            if encoding == "bins":
                self.geom = nn.Embedding(len(GEOM_RANGES) * num_bins, dim)     # one slice of bins per field
            else:                                                           # one linear map per field
                self.geom_proj = nn.Parameter(torch.empty(len(GEOM_RANGES), 1 + 2 * len(FOURIER_OCTAVES), dim))
            self.dt = nn.Embedding(2 * max_dt + 1, dim) if temporal else None
            self.aug = nn.Embedding(len(AUG_FIELDS) * num_bins, dim)
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def _geometry(self, actions: torch.Tensor) -> torch.Tensor:
        """(..., ACTION_DIM) -> (..., 4, dim): one token per place field (dy, dx, log_sh, log_sw)."""
        cols = [ACTION_FIELDS.index(f) for f in GEOM_RANGES]
        if self.geom is not None:
            nb = self.num_bins
            idx = torch.stack([discretise(actions[..., c], lo, hi, nb) + k * nb
                               for k, (c, (lo, hi)) in enumerate(zip(cols, GEOM_RANGES.values()))], -1)
            return self.geom(idx)
        feats = fourier_features(actions[..., cols])                               # (..., 4, F)
        return torch.einsum("...kf,kfd->...kd", feats.to(self.geom_proj.dtype), self.geom_proj)

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        lead = actions.shape[:-1]
        if self.mask_tokens is not None:                                # invariant ablation
            return self.mask_tokens.expand(*lead, -1, -1)
        nb = self.num_bins
        tokens = [self._geometry(actions)]                                                    # (..., 4, dim)
        if self.dt is not None:
            dt = actions[..., ACTION_FIELDS.index("dt")].round().clamp(-self.max_dt, self.max_dt).long()
            tokens.append(self.dt(dt + self.max_dt)[..., None, :])                           # (..., 1, dim)
        aug = torch.stack([discretise(actions[..., len(GEOM_FIELDS) + k], *AUG_RANGES.get(f, (0.0, 1.0)), nb)
                           + k * nb for k, f in enumerate(AUG_FIELDS)], -1)                 # (..., AUG_DIM)
        tokens.append(self.aug(aug).sum(-2, keepdim=True))                                   # (..., 1, dim)
        return torch.cat(tokens, dim=-2)


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, C / nh)."""
    B, T, C = x.shape
    return x.view(B, T, nh, C // nh).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, nh * hs)."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)


class DecoderLayer(nn.Module):
    """Self-attention within each action's tokens, cross-attention to the source patches, MLP (pre-norm)."""

    def __init__(self, dim: int, enc_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.nh = num_heads
        self.norm1, self.qkv, self.proj1 = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.q, self.proj2 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv = nn.Linear(enc_dim, 2 * dim)                      # applied once per source view
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (S, M, T, dim) action tokens; memory: (S, N, enc_dim) normed patch tokens of each source."""
        S, M, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(S * M, T, 3 * C).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(_heads(q, self.nh), _heads(k, self.nh), _heads(v, self.nh))
        x = x + self.proj1(_merge(y)).view(S, M, T, C)
        # All M*T queries of a source attend to that source's keys/values, computed once.
        q = _heads(self.q(self.norm2(x)).view(S, M * T, C), self.nh)      # (S, nh, M*T, hs)
        k, v = self.kv(memory).chunk(2, dim=-1)                            # (S, N, dim) each
        y = F.scaled_dot_product_attention(q, _heads(k.contiguous(), self.nh), _heads(v.contiguous(), self.nh))
        x = x + self.proj2(_merge(y)).view(S, M, T, C)
        return x + self.mlp(self.norm3(x))


class ValueDecoder(nn.Module):
    """phi_AB: patches (S, N, enc_dim) + actions (S, M, ACTION_DIM) -> unit vectors (S, M, out_dim).

    ``logit_scale`` is the learned temperature ``t_AB`` of ``Q`` (stored as a log,
    read through ``scale()``, clamped to at most 100 as in CLIP).
    """

    def __init__(self, enc_dim: int, out_dim: int, dim: int = 128, depth: int = 2, num_heads: int = 4,
                 num_bins: int = 16, max_dt: int = 16, temporal: bool = True, action_tokens: bool = True,
                 init_temp: float = 0.1, encoding: Literal["fourier", "bins"] = "fourier"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by its {num_heads} heads")
        self.tokenizer = ActionTokenizer(dim, num_bins, max_dt, temporal, action_tokens, encoding)
        self.memory_norm = nn.LayerNorm(enc_dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, enc_dim, num_heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temp)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, patches: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        memory = self.memory_norm(patches)                         # (S, N, enc_dim)
        x = self.tokenizer(actions)                                # (S, M, T, dim)
        if x.shape[0] != memory.shape[0]:
            raise ValueError(f"{x.shape[0]} action rows for {memory.shape[0]} source views")
        for layer in self.layers:
            x = layer(x, memory)
        phi = self.out(self.out_norm(x.mean(dim=2)))               # (S, M, out_dim): pooled over tokens
        return F.normalize(phi, dim=-1, eps=1e-6)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "tokenizer.mask_tokens"}


def field_names(temporal: bool) -> Sequence[str]:
    """Names of the tokens, in order (for logging and docs)."""
    return (*GEOM_RANGES, *(("dt",) if temporal else ()), "aug")
