"""timm's ViT key layout: convert an abvid encoder's state dict to and from it.

abvid's encoder (model/vit.py) is timm's ``VisionTransformer`` with a class token, absolute
position embedding, pre-norm blocks and a final LayerNorm; the tensors match one to one
except for the patch embedding, which timm wraps in a ``PatchEmbed`` module:

    abvid                          timm
    patch_embed.{weight,bias}  ->  patch_embed.proj.{weight,bias}
    everything else            ->  the same name (cls_token, pos_embed, blocks.i.*, norm.*)

So ``timm.models.vision_transformer.VisionTransformer(img_size, patch_size, embed_dim, depth,
num_heads, num_classes=0, global_pool="token")`` loads an exported dict with ``strict=True``,
and its pre-logits features (``model(x)`` with ``num_classes=0``) equal abvid's ``embed``
(tested to 1e-5) given the same input, with two differences a user must know:

* **input**: abvid's encoder takes uint8 or [0, 1] pixels and normalises them itself
  (ImageNet mean/std, ``IMAGENET_MEAN`` / ``IMAGENET_STD``); timm's model expects the
  normalised tensor. The export's metadata states mean and std.
* **LayerNorm eps**: timm uses 1e-6, as abvid does since checkpoints carry a format
  version; an encoder from an older file (eps 1e-5) exports with a warning and the eps in
  the metadata: build timm with ``norm_layer=partial(nn.LayerNorm, eps=1e-5)`` to match it.

``from_timm`` goes the other way (``model.init_from`` on a timm checkpoint): it drops a
classifier (``head.*``) and refuses layouts abvid has no counterpart for (register tokens,
``fc_norm`` of average pooling, LayerScale, q/k norms), naming the keys.
"""
from __future__ import annotations

from typing import Any

import torch

from abvid.model.vit import IMAGENET_MEAN, IMAGENET_STD

TIMM_METADATA_KEY = "abvid.timm_kwargs"
_RENAMES = (("patch_embed.", "patch_embed.proj."),)
_DROPPED = ("head.", "head_drop.")          # classifier weights of a timm model: not part of the encoder
_UNSUPPORTED = ("reg_token", "fc_norm.", "norm_pre.", ".ls1.", ".ls2.", ".q_norm.", ".k_norm.", "attn_pool.")


class TimmLayoutError(ValueError):
    """A state dict abvid cannot map to or from timm's ViT layout."""


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """abvid encoder state dict -> timm ``VisionTransformer`` state dict (same tensors, renamed)."""
    out = {}
    for k, v in state.items():
        for ours, theirs in _RENAMES:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        out[k] = v
    return out


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` state dict -> abvid encoder state dict; the classifier is dropped."""
    odd = sorted(k for k in state if any(u in f".{k}" or k.startswith(u) for u in _UNSUPPORTED))
    if odd:
        raise TimmLayoutError(f"timm weights with parts abvid's ViT does not have: {odd[:6]}; abvid loads plain "
                              "class-token ViTs (no register tokens, LayerScale, fc_norm or q/k norm)")
    out = {}
    for k, v in state.items():
        if k.startswith(_DROPPED):
            continue
        for ours, theirs in _RENAMES:
            if k.startswith(theirs):
                k = ours + k[len(theirs):]
        out[k] = v
    return out


def is_timm_layout(state: dict[str, Any]) -> bool:
    """True when the keys look like timm's ViT (``patch_embed.proj.weight``) rather than abvid's."""
    return "patch_embed.proj.weight" in state


def timm_kwargs(encoder_kwargs: dict[str, Any], embed_dim: int, depth: int, num_heads: int) -> dict[str, Any]:
    """The ``VisionTransformer(...)`` arguments that rebuild the exported encoder in timm, plus its input norm."""
    return {"img_size": int(encoder_kwargs.get("img_size", 224)), "patch_size": int(encoder_kwargs["patch_size"]),
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "num_classes": 0,
            "global_pool": "token", "norm_eps": float(encoder_kwargs.get("norm_eps", 1e-6)),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
