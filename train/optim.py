"""AdamW with two parameter groups: decayed weights, and everything weight decay would harm.

No weight decay (DINO / timm convention) on:

* every parameter with ``ndim <= 1``: norm gains and biases, scalar
  temperatures / logit scales (decay would pull a learned temperature to 0);
* position embeddings, class / register / mask tokens;
* prototypes and temperatures, matched by name (``prototype``, ``temperature``,
  ``logit_scale``, and a weight-norm gain ``weight_g`` / ``parametrizations...original0``);
* whatever the model lists itself: ``model.no_weight_decay()`` returning names
  (timm's hook), relative to the module passed in.

Only parameters with ``requires_grad`` are optimised, so a frozen EMA teacher
inside the same module is left out. The weight-decay *schedule* is applied by
the loop: groups carry ``apply_wd`` and the loop sets ``weight_decay`` only on
those.
"""
from __future__ import annotations

import torch
from torch import nn

NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token", "reg_token", "register", "mask_token", "prototype",
                       "temperature", "logit_scale", "weight_g", "original0")


def _listed_no_decay(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    if fn is None:
        return set()
    names = fn() if callable(fn) else fn
    return set(names)


def is_no_decay(name: str, param: torch.Tensor, listed: set[str] = frozenset()) -> bool:
    """True when ``param`` (full dotted ``name``) must not get weight decay."""
    if name in listed or param.ndim <= 1:
        return True
    return any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` (apply_wd) and ``no_decay``."""
    listed = _listed_no_decay(model)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p, listed):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "apply_wd": True, "weight_decay": 0.0, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "apply_wd": False, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    fused: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; lr and weight decay are set every step by the loop's schedules."""
    groups = param_groups(model)
    # Names are for logging/debugging; the optimizer state dict stores them with each group.
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0, **kwargs)


def set_hparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's scheduled lr (times a group's ``lr_scale``) and weight decay (``apply_wd`` groups)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = weight_decay if g.get("apply_wd", True) else 0.0
