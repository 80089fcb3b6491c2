"""The Objective module: student, EMA teacher, base loss of one family, optional bootstrapping.

One module owns everything the loss needs (DINOv2's ``SSLMetaArch`` idea); the
training loop only calls ``loss`` (or ``forward``, the same, for DDP),
``update_teacher`` and ``no_weight_decay``. The family (dino.py, simclr.py,
clip.py) supplies the annotations and the base loss through four methods:

    annotations(head, z, batch) -> (psi (L, d), exclude (B, n, L) bool | None)
    target_probs(head, z, psi, exclude, teacher_temp) -> p_ema(l | view) (B, n_t, L)
    base_loss(head, z, psi, p_t, batch) -> (loss, metrics)
    update_state(z, psi) -> None            # e.g. DINO's centre, after the loss (training only)

``z`` are the head's unit vectors per view (B, n, d). With bootstrapping, the
value decoder's unit vectors phi_AB (B, n, n-1, d) are scored against the same
``psi`` (bootstrap.py). ``teacher_temp`` only matters to DINO.

Submodules and checkpoint prefixes (INTERFACES.md): ``student_encoder``,
``teacher_encoder``, ``student_head``, ``teacher_head``, ``student_value``,
``teacher_value``, ``family``. With ``target_network=False`` there is no
teacher copy (``teacher_encoder`` etc. are None): targets come from the student's
own outputs of the same step, detached, and export must pick ``student_encoder.``.
The teacher copies have no stochastic depth and ``requires_grad=False``; they
follow train/eval mode, so a BatchNorm head uses batch statistics like DINO's
teacher. ``update_teacher(m)`` sets ``t = m*t + (1-m)*s`` (buffers copied).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from abvid.model.vit import DropPath
from abvid.pipeline.actions import pairwise_actions

from .bootstrap import Encoded, bootstrap_loss

# Parameter name endings that get no weight decay besides every 0-/1-d tensor (norms, biases, scales).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "prototype_weight", "mask_tokens", "logit_scale")


def encode(encoder: nn.Module, batch: dict[str, Any], with_local: bool = True) -> Encoded:
    """Run the encoder once per view size: globals (B, ng, 3, G, G) and locals (B, nl, 3, L, L)."""
    groups = [batch["global"]]
    if with_local and "local" in batch and batch["local"].shape[1] > 0:
        groups.append(batch["local"])
    cls, patches = [], []
    for views in groups:
        B, nv = views.shape[:2]
        tokens = encoder.forward_features(views.flatten(0, 1))   # (B*nv, 1+N, D)
        tokens = tokens.view(B, nv, *tokens.shape[1:])
        cls.append(tokens[:, :, 0])
        patches.append(tokens[:, :, 1:])
    return Encoded(torch.cat(cls, dim=1), patches)


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Tensor metrics -> floats with one device transfer; NaN entries (empty buckets) are dropped."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: v for k, v in out.items() if not math.isnan(v)}


def _frozen_copy(module: nn.Module | None) -> nn.Module | None:
    """EMA twin: no gradients, no stochastic depth (DINO's teacher); BatchNorm keeps batch statistics."""
    if module is None:
        return None
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():
        if isinstance(m, DropPath):
            m.p = 0.0
    return twin


class Objective(nn.Module):
    """Base method of one family (+ annotation bootstrapping when ``value`` is given)."""

    def __init__(self, family: nn.Module, encoder: nn.Module, head: nn.Module, value: nn.Module | None = None, *,
                 target_network: bool = True, bootstrap_weight: float = 1.0, gamma: float = 0.0,
                 num_next_actions: int = 4, default_teacher_temp: float = 0.04):
        super().__init__()
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        self.family = family
        self.student_encoder, self.student_head, self.student_value = encoder, head, value
        self.target_network = target_network
        self.teacher_encoder = _frozen_copy(encoder) if target_network else None
        self.teacher_head = _frozen_copy(head) if target_network else None
        self.teacher_value = _frozen_copy(value) if target_network else None
        self.bootstrap = value is not None
        self.bootstrap_weight, self.gamma, self.num_next_actions = bootstrap_weight, gamma, num_next_actions
        self.default_teacher_temp = default_teacher_temp
        self._pending_state: tuple[torch.Tensor, torch.Tensor] | None = None   # see update_teacher

    def forward(self, batch: dict[str, Any], teacher_temp: float | None = None):
        return self.loss(batch, teacher_temp)

    def loss(self, batch: dict[str, Any], teacher_temp: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss = base + bootstrap_weight * bootstrap, and float metrics for logging."""
        tt = self.default_teacher_temp if teacher_temp is None else float(teacher_temp)
        fam = self.family
        enc_s = encode(self.student_encoder, batch)
        z_s = self.student_head(enc_s.cls)                             # (B, n, d) unit vectors
        psi_s, exclude = fam.annotations(self.student_head, z_s, batch)

        need_teacher = self.bootstrap or fam.needs_teacher_for_base
        p_t = enc_t = z_t = psi_t = None
        if need_teacher:
            with torch.no_grad():
                if self.target_network:
                    # Teacher sees the globals (base); the locals too when bootstrapping (targets for every view).
                    enc_t = encode(self.teacher_encoder, batch, with_local=self.bootstrap)
                    z_t = self.teacher_head(enc_t.cls)
                    psi_t, _ = fam.annotations(self.teacher_head, z_t, batch)
                else:
                    enc_t, z_t, psi_t = enc_s.detach(), z_s.detach(), psi_s.detach()
                head_t = self.teacher_head if self.target_network else self.student_head
                ex_t = None if exclude is None else exclude[:, :z_t.shape[1]]
                p_t = fam.target_probs(head_t, z_t, psi_t, ex_t, tt)    # (B, n_t, L)

        base, metrics = fam.base_loss(self.student_head, z_s, psi_s, p_t, batch)
        total = base
        metrics["loss_base"] = base.detach()
        if p_t is not None and p_t.shape[-1] > 1:                      # collapse watch: ln K = uniform
            ent = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1)
            marginal = p_t.mean(dim=(0, 1))
            metrics["target_entropy"] = ent.mean()
            metrics["target_marginal_entropy"] = -(marginal * marginal.clamp_min(1e-12).log()).sum()
            metrics["target_entropy_max"] = math.log(p_t.shape[-1])
        if self.bootstrap and p_t is not None and p_t.shape[-1] > 0:
            value_t = self.teacher_value if self.target_network else self.student_value
            actions = pairwise_actions(batch["boxes"], batch["frame_idx"], batch["aug"])
            ab, ab_metrics = bootstrap_loss(
                value_s=self.student_value, value_t=value_t, enc_s=enc_s, enc_t=enc_t, psi_s=psi_s, psi_t=psi_t, exclude=exclude, p_t=p_t, actions=actions,
                boxes=batch["boxes"], gamma=self.gamma, num_next_actions=self.num_next_actions)
            total = total + self.bootstrap_weight * ab
            metrics["loss_bootstrap"] = ab.detach()
            metrics.update(ab_metrics)
        if psi_s.shape[0] == 0:
            # No annotation in this batch (CLIP without texts): keep every trainable parameter in the
            # graph with a zero gradient, so DDP (find_unused_parameters=False) still syncs.
            total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        if need_teacher and self.training:
            # family state (DINO's centre) from the global views only, the same with or without bootstrapping;
            # applied by update_teacher, i.e. only after a step the loop found finite
            self._pending_state = (z_t[:, :batch["global"].shape[1]].detach(), psi_t.detach())
        if getattr(fam, "uses_teacher_temp", False):
            metrics["teacher_temp"] = tt
        metrics["loss"] = total.detach()
        return total, to_floats(metrics)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """After a finite step: the family's state update of that step (DINO's centre), then the EMA
        t = m * t + (1 - m) * s for encoder, head and value decoder (no EMA without a target network)."""
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.family.update_state(*pending)
        if not self.target_network:
            return
        pairs = [(self.student_encoder, self.teacher_encoder), (self.student_head, self.teacher_head),
                 (self.student_value, self.teacher_value)]
        for s_mod, t_mod in pairs:
            if s_mod is None:
                continue
            s_params, t_params = list(s_mod.parameters()), list(t_mod.parameters())
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)   # t + (1-m)(s - t)
            for sb, tb in zip(s_mod.buffers(), t_mod.buffers()):
                tb.copy_(sb)

    def no_weight_decay(self) -> set[str]:
        """Names of trainable parameters without weight decay: norms, biases, pos-embed, prototypes, scales."""
        return {name for name, p in self.named_parameters()
                if p.requires_grad and (p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)}
