"""abvid.model: pure nn.Modules (ViT encoder, heads, text encoder, value decoder); no I/O here.

    from abvid.model import ModelConfig, build_encoder, encoder_kwargs
    enc = build_encoder("vit_small", patch_size=16)             # 21.67M params (22.05M with a 1000-way head)
    enc = build_encoder(**encoder_kwargs(ModelConfig(arch="vit_tiny", depth=4)))

``encoder_kwargs(cfg)`` is what checkpoints store under ``"encoder_kwargs"``
(INTERFACES.md), so ``build_encoder(**ckpt["encoder_kwargs"])`` rebuilds the
same network. ``load_encoder(path, which="ema")`` (model/io.py) reads an exported
encoder or a training checkpoint (its EMA or student encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .vit import ARCHS, VisionTransformer, num_params, vit_base, vit_large, vit_small, vit_tiny

NORM_EPS = 1e-6   # LayerNorm eps of encoders built now; recorded in encoder_kwargs (older files: 1e-5, model/io.py)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder settings (``model.*`` in the training config).

    ``embed_dim`` / ``depth`` / ``num_heads`` override the named variant when set
    (toy runs: e.g. ``arch=vit_tiny, embed_dim=128, depth=4, num_heads=4``).
    ``img_size`` is the grid the position embedding is stored for; other input
    sizes (local crops) interpolate it. ``init_from`` starts a new run from ViT weights
    (an ``abvid export`` file in either layout, a timm ViT state dict as .safetensors or
    .pth, or a training checkpoint; model/io.py ``init_encoder_from``): student and
    teacher encoders start from them, the heads from scratch. A resumed run ignores it.
    """
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    drop_path: float = 0.0
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    init_from: str = ""


def build_encoder(arch: str, patch_size: int = 16, **kw: Any) -> VisionTransformer:
    """Build a ViT variant by name; ``kw`` goes to VisionTransformer (img_size, drop_path, embed_dim, ...)."""
    if arch not in ARCHS:
        import difflib
        close = difflib.get_close_matches(arch, list(ARCHS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown encoder arch '{arch}'.{hint} Known: {', '.join(ARCHS)}")
    kw = {k: v for k, v in kw.items() if v is not None}       # None = the variant's own value
    return ARCHS[arch](patch_size=patch_size, **kw)


def encoder_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of ``build_encoder`` for ``cfg`` (stored in checkpoints; Nones dropped)."""
    out = {"arch": cfg.arch, "patch_size": cfg.patch_size, "img_size": cfg.img_size, "drop_path": cfg.drop_path,
           "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "norm_eps": NORM_EPS}
    return {k: v for k, v in out.items() if v is not None}


def load_encoder(path, map_location="cpu", which: Literal["ema", "student"] = "ema"):
    """Read an exported encoder (.safetensors with kwargs in its metadata) or a training checkpoint.

    ``which`` picks a checkpoint's EMA (teacher, default) or student encoder; see model/io.py.
    """
    from .io import load_encoder as _f
    return _f(path, map_location, which)


__all__ = ["ModelConfig", "VisionTransformer", "build_encoder", "encoder_kwargs", "load_encoder", "num_params",
           "vit_tiny", "vit_small", "vit_base", "vit_large"]
