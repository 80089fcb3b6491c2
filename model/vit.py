"""A compact Vision Transformer encoder (Dosovitskiy et al. 2021; timm's API and variants).

One file, timm-style: size variants are small functions (``vit_tiny``, ``vit_small``,
``vit_base``, ``vit_large``), attention uses ``F.scaled_dot_product_attention``, and the learned
position embedding is stored for ``img_size`` and interpolated (bicubic) to any
input size, so global (224 px) and local (96 px) crops share every weight.

The encoder takes raw pixels: uint8 ``(B, 3, H, W)`` in [0, 255] or float in
[0, 1]; it normalises internally with ImageNet mean/std buffers, so an exported
encoder is self-contained (INTERFACES.md, "Model / objectives").

    enc = vit_small(patch_size=16)
    tokens = enc.forward_features(images)   # (B, 1 + N, D): CLS then patches, after the final norm
    emb = enc.embed(images)                 # (B, D): the CLS token

Parameter count: ``vit_small(patch_size=16)`` has 21.67M parameters without a
classifier and 22.05M with ``num_classes=1000`` (timm's ``vit_small_patch16_224``);
``vit_large(patch_size=16)`` (1024 wide, 24 deep, 16 heads) 303.30M without and 304.33M
with (timm's ``vit_large_patch16_224``). Large variants can be built on the meta device
(``with torch.device("meta"): ...``), e.g. to count FLOPs or shard before materialising.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (Huang et al. 2016).

    The rate lives in a non-persistent 0-d buffer (not in state dicts), so ``torch.compile`` sees it as an
    input and every block of an encoder shares one compiled graph; a Python float would be baked into the
    graph, one per distinct rate, i.e. per block (train/compile.py). ``p`` reads and sets it.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)
        self._p, self.active = float(p), p > 0.0

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self.rate.fill_(float(value))
        self._p, self.active = float(value), value > 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        keep = 1.0 - self.rate.to(x.dtype)
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) < keep
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])     # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder: patchify -> [CLS] + pos-embed -> blocks -> final norm (-> optional linear head)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 num_classes: int = 0, norm_layer: Callable[[int], nn.Module] | None = None,
                 norm_eps: float = 1e-6):
        super().__init__()
        # LayerNorm eps 1e-6 as timm, DINO and MAE use (so an export runs identically in timm); files
        # written before checkpoints carried a format version used torch's default 1e-5 (model/io.py).
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = img_size // patch_size                     # pos-embed is stored for this grid
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        # stochastic depth grows with depth; computed on the CPU so the model can be built on the meta device
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], norm_layer) for i in range(depth))
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Not persistent: constants, so state dicts hold learned weights only.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that should get no weight decay (timm convention)."""
        return {"pos_embed", "cls_token"}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] pixels (B, 3, H, W) -> ImageNet-normalised float."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding (1, 1 + gh*gw, D) for a gh x gw patch grid (bicubic resize of the stored grid)."""
        if gh == self.grid and gw == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, self.grid, gh, gw)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> tokens (B, 1 + N, D) after the final norm; token 0 is CLS."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch size {self.patch_size}")
        x = self.patch_embed(self.normalize(x))                 # (B, D, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                        # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed_for(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> the CLS embedding (B, D)."""
        return self.forward_features(x)[:, 0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS embedding, or class logits when built with ``num_classes > 0``."""
        return self.forward_head(self.forward_features(x))


def resize_pos_embed(pos: torch.Tensor, grid: int, gh: int, gw: int) -> torch.Tensor:
    """(1, 1 + grid*grid, D) class + square-grid position embedding -> (1, 1 + gh*gw, D), bicubic."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)          # (1, D, grid, grid)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)


def vit_tiny(patch_size: int = 16, **kw) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, **{"embed_dim": 192, "depth": 12, "num_heads": 3, **kw})


def vit_small(patch_size: int = 16, **kw) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


def vit_base(patch_size: int = 16, **kw) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, **{"embed_dim": 768, "depth": 12, "num_heads": 12, **kw})


def vit_large(patch_size: int = 16, **kw) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, **{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kw})


ARCHS: dict[str, Callable[..., VisionTransformer]] = {"vit_tiny": vit_tiny, "vit_small": vit_small,
                                                      "vit_base": vit_base, "vit_large": vit_large}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

