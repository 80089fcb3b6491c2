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
from abvid.pipeline.actions import actions_between, pairwise_actions

from .bootstrap import Encoded, bootstrap_loss, next_values

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
                 num_next_actions: int = 4, default_teacher_temp: float = 0.04, annotation_grad: bool = True):
        super().__init__()
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if gamma > 0.0 and num_next_actions < 1:
            raise ValueError(f"gamma > 0 needs num_next_actions >= 1, got {num_next_actions}")
        self.family = family
        self.student_encoder, self.student_head, self.student_value = encoder, head, value
        self.bootstrap = value is not None
        self.target_network = target_network
        # A teacher exists only where something reads it: the base method (DINO's momentum teacher) or the
        # bootstrap targets with a target network. Plain SimCLR / CLIP build and update none.
        has_teacher = family.needs_teacher_for_base or (self.bootstrap and target_network)
        self.teacher_encoder = _frozen_copy(encoder) if has_teacher else None
        self.teacher_head = _frozen_copy(head) if has_teacher else None
        self.teacher_value = _frozen_copy(value) if self.bootstrap and target_network else None
        self.bootstrap_weight, self.gamma, self.num_next_actions = bootstrap_weight, gamma, num_next_actions
        self.default_teacher_temp = default_teacher_temp
        # False: Q's loss reaches the encoder through the value decoder only, not the annotation vectors psi
        # (the student's head outputs / prototypes), whose geometry then comes from the base loss alone
        self.annotation_grad = annotation_grad
        self._pending_state: tuple | None = None   # family state of the last training step, see update_teacher

    def forward(self, batch: dict[str, Any], teacher_temp: float | None = None):
        return self.loss(batch, teacher_temp)

    def _targets(self, encoder: nn.Module, head: nn.Module, batch: dict[str, Any], with_local: bool,
                 tt: float) -> tuple[Encoded, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Target-network pass (no grad): encodings, z (B, n_t, d), psi, exclude and p(l | view) (B, n_t, L).

        The head runs on the globals alone -- exactly the base method's teacher -- and, when the locals
        are needed (bootstrapping), on the locals in a call of their own (own normalisation statistics,
        and ``group="local"`` for family state such as DINO's centre).
        """
        fam, ng = self.family, batch["global"].shape[1]
        enc = encode(encoder, batch, with_local=with_local)
        z = head(enc.cls[:, :ng])
        if enc.cls.shape[1] > ng:
            z = torch.cat([z, head(enc.cls[:, ng:])], dim=1)
        psi, exclude = fam.annotations(head, z, batch)
        p = fam.target_probs(head, z[:, :ng], psi, None if exclude is None else exclude[:, :ng], tt, "global")
        if z.shape[1] > ng:
            p_loc = fam.target_probs(head, z[:, ng:], psi, None if exclude is None else exclude[:, ng:], tt, "local")
            p = torch.cat([p, p_loc], dim=1)
        return enc, z, psi, exclude, p

    def loss(self, batch: dict[str, Any], teacher_temp: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Total loss = base + bootstrap_weight * bootstrap, and metrics for logging: 0-d tensors left on the
        device (no host sync here; ``to_floats`` brings them over) and plain floats."""
        tt = self.default_teacher_temp if teacher_temp is None else float(teacher_temp)
        fam, ng = self.family, batch["global"].shape[1]
        enc_s = encode(self.student_encoder, batch)
        z_s = self.student_head(enc_s.cls)                             # (B, n, d) unit vectors, all views at once
        psi_s, exclude = fam.annotations(self.student_head, z_s, batch)

        teacher = None
        if self.teacher_encoder is not None:
            with torch.no_grad():   # bootstrapping with a target network reads the teacher on the locals too
                teacher = self._targets(self.teacher_encoder, self.teacher_head, batch,
                                        self.bootstrap and self.target_network, tt)
        p_base = teacher[4][:, :ng] if teacher is not None and fam.needs_teacher_for_base else None
        base, metrics = fam.base_loss(self.student_head, z_s, psi_s, p_base, batch)
        total = base
        metrics["loss_base"] = base.detach()

        if self.bootstrap and psi_s.shape[0] > 0:
            if self.target_network:
                value_t, (enc_t, z_t, psi_t, _, p_t) = self.teacher_value, teacher
            else:                   # the paper's ablation: targets from the online network of this step, detached
                with torch.no_grad():
                    enc_t, z_t, psi_t = enc_s.detach(), z_s.detach(), psi_s.detach()
                    p_t = torch.cat([fam.target_probs(self.student_head, z_t[:, :ng], psi_t,
                                                      None if exclude is None else exclude[:, :ng], tt, "global"),
                                     fam.target_probs(self.student_head, z_t[:, ng:], psi_t,
                                                      None if exclude is None else exclude[:, ng:], tt, "local")], 1)
                value_t = self.student_value
            _entropy_metrics(metrics, p_t)
            q_next = None
            if self.gamma > 0.0:
                with torch.no_grad():
                    q_next = next_values(value_t, enc_t, psi_t, self._next_actions(batch))
            psi_q = psi_s if self.annotation_grad else psi_s.detach()
            ab, ab_metrics = bootstrap_loss(value_s=self.student_value, enc_s=enc_s, psi_s=psi_q, exclude=exclude,
                                            actions=pairwise_actions(batch["boxes"], batch["frame_idx"], batch["aug"]),
                                            p_next=p_t, q_next=q_next, gamma=self.gamma, boxes=batch["boxes"])
            total = total + self.bootstrap_weight * ab
            metrics["loss_bootstrap"] = ab.detach()
            metrics.update(ab_metrics)
        elif teacher is not None:
            _entropy_metrics(metrics, teacher[4])
        if psi_s.shape[0] == 0:
            # No annotation in this batch (CLIP without texts): keep every trainable parameter in the
            # graph with a zero gradient, so DDP (find_unused_parameters=False) still syncs.
            total = total + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        if teacher is not None and self.training:
            # family state (DINO's centres: globals, and locals when the teacher saw them), applied by
            # update_teacher, i.e. only after a step the loop found finite
            z_t = teacher[1].detach()
            self._pending_state = (z_t[:, :ng], teacher[2].detach(), z_t[:, ng:] if z_t.shape[1] > ng else None)
        if getattr(fam, "uses_teacher_temp", False):
            metrics["teacher_temp"] = tt
        metrics["loss"] = total.detach()
        return total, {k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()}

    def _next_actions(self, batch: dict[str, Any]) -> torch.Tensor:
        """A': actions from every view to the clip's first ``num_next_actions`` fresh views (B, n, M, A)."""
        if "next_boxes" not in batch:
            raise ValueError("objective.gamma > 0 needs fresh next views in the batch (next_boxes, next_frame_idx, "
                             "next_aug): build the loader with next_views=objective.num_next_actions")
        M = self.num_next_actions
        if batch["next_boxes"].shape[1] < M:
            raise ValueError(f"the batch has {batch['next_boxes'].shape[1]} next views per clip, "
                             f"objective.num_next_actions={M}")
        return actions_between(batch["boxes"], batch["frame_idx"], batch["aug"], batch["next_boxes"][:, :M],
                               batch["next_frame_idx"][:, :M], batch["next_aug"][:, :M])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """After a finite step: the family's state update of that step (DINO's centres), then the EMA
        t = m * t + (1 - m) * s for encoder, head and value decoder (no EMA without a teacher)."""
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.family.update_state(*pending)
        pairs = [(self.student_encoder, self.teacher_encoder), (self.student_head, self.teacher_head),
                 (self.student_value, self.teacher_value)]
        for s_mod, t_mod in pairs:
            if s_mod is None or t_mod is None:
                continue
            s_params, t_params = list(s_mod.parameters()), list(t_mod.parameters())
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)   # t + (1-m)(s - t)
            for sb, tb in zip(s_mod.buffers(), t_mod.buffers()):
                tb.copy_(sb)

    def no_weight_decay(self) -> set[str]:
        """Names of trainable parameters without weight decay: norms, biases, pos-embed, prototypes, scales."""
        return {name for name, p in self.named_parameters()
                if p.requires_grad and (p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)}


def _entropy_metrics(metrics: dict[str, Any], p_t: torch.Tensor) -> None:
    """Collapse watch on the targets: per-view entropy (ln K = uniform) and the batch marginal's (0 = one
    annotation for everything)."""
    if p_t.shape[-1] <= 1:
        return
    ent = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1)
    marginal = p_t.mean(dim=(0, 1))
    metrics["target_entropy"] = ent.mean()
    metrics["target_marginal_entropy"] = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    metrics["target_entropy_max"] = math.log(p_t.shape[-1])
