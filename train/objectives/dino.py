"""DINO as an annotation source: self-distillation with prototypes (Caron et al. 2021; docs/METHOD.md section 2).

Annotations ``l`` are the K prototypes of the DINO head (model/heads.py);
``p(l | x) = softmax((cos(z_x, psi_l) - c) / tau_t)`` on the teacher (centred by
``c``, sharpened by the teacher temperature ``tau_t``) and
``softmax(cos / tau_s)`` on the student. The base loss is DINO's multi-crop
cross-entropy: every teacher global view against every student view of the
same clip except itself.

Groups. DINO's teacher sees the global views only, and its head normalises over
them alone. Annotation bootstrapping also needs teacher targets for the local
views; those come from a second teacher head call over the locals (their own
BatchNorm statistics) centred by a centre of their own (``centre_local``), so the
globals' targets -- and therefore DINO's own loss -- are exactly those of plain
DINO (docs/METHOD.md: the base loss is computed as the base method computes it).

Collapse and the toy-scale recipe (docs/METHOD.md "known traps"). Built in:
prototypes with a weight-norm gain fixed at 1 and no weight decay
(model/heads.py); ``head_norm`` (normalisation in the head's hidden layers);
the centre momentum as a setting; the teacher temperature from the loop
(warm-up 0.04 -> 0.07), else ``ObjectiveConfig.teacher_temp``.

What we measured (tests/test_dino_recipe.py stream: 8 striped patterns, random
crops, 2 x 32 px + 2 x 16 px views, batch 32, K = 256, head 256 -> 64, AdamW
lr 1e-3 wd 0.04, teacher momentum 0.99, teacher temp 0.04; ViT width 32 x 2
layers and width 128 x 4 layers behave alike):

- no normalisation in the head (DINO's ViT default): targets uniform
  (entropy 5.3-5.5 of ln K = 5.55) within 20-25 steps;
- LayerNorm in the head, or LN with a lower lr (3e-4): still uniform; LN with
  teacher temp 0.02: one prototype for ~20 steps, then heading to uniform;
- centre momentum 0.99 without BatchNorm: every view on one prototype (entropy -> 0);
- BatchNorm in the head (``head_norm="bn"``, the default), the teacher using
  batch statistics as in DINO: per-view entropy 2.7 -> 1.4 at step 40 -> ~0
  by step 100-200 while the batch-marginal entropy settles at ~2.0 = ln 8,
  i.e. the 8 patterns are found; the same with bootstrapping on, with
  centre momentum 0.99, and for lr from DINO's 5e-4 x B / 256 (6e-5 here:
  slower, per-view 0.7 / marginal 2.5 after 160 steps) to 3e-3 (faster).
  Batch-standardising the hidden features removes the common direction that
  makes all images look alike at initialisation, which logit centring alone
  cannot recover.

Recommended toy recipe: ``head_norm="bn"``, small head (hidden 256,
bottleneck 64, K 256), teacher temp 0.04 (-> 0.07), centre momentum 0.9,
teacher momentum 0.99, lr 5e-4 x B / 256 up to ~1e-3 for quick toy runs. Watch
``target_entropy`` (per view; ln K = uniform) and ``target_marginal_entropy``
(of the batch mean; near 0 = one prototype for everything): healthy runs keep
the marginal well above the per-view entropy. Under DDP the head's BatchNorm
uses the statistics of the global batch (``model/heads.BatchNormAnyShape``), as
DINO's SyncBatchNorm conversion does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .bootstrap import scored


class DINOFamily(nn.Module):
    """DINO annotations (prototypes), targets (centred + sharpened) and multi-crop loss."""

    needs_teacher_for_base = True
    uses_teacher_temp = True

    def __init__(self, num_prototypes: int, student_temp: float = 0.1, centre_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.centre_momentum = student_temp, centre_momentum
        self.register_buffer("centre", torch.zeros(1, num_prototypes))          # of the global views
        self.register_buffer("centre_local", torch.zeros(1, num_prototypes))    # of the local views (AB only)

    def annotations(self, head: nn.Module, z: torch.Tensor, batch: dict[str, Any]):
        return head.prototypes(), None                                 # (K, d), no exclusions

    def target_probs(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, exclude, teacher_temp: float,
                     group: str = "global"):
        cos = scored(z, psi, 1.0, None)                                # (B, n_t, K)
        centre = self.centre if group == "global" else self.centre_local
        return ((cos - centre) / teacher_temp).softmax(-1)

    def base_loss(self, head: nn.Module, z: torch.Tensor, psi: torch.Tensor, p_t: torch.Tensor,
                  batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        ng = batch["global"].shape[1]
        logp = scored(z, psi, 1.0 / self.student_temp, None).log_softmax(-1)   # (B, n, K)
        q = p_t[:, :ng]                                                # (B, ng, K): teacher on globals
        ce = -torch.einsum("bik,bjk->bij", q, logp)                   # (B, ng, n): teacher i vs student j
        # not a view against itself; a 0/1 weight, not a boolean index (that would be a data-dependent
        # shape: a graph break under torch.compile)
        keep = 1.0 - torch.eye(ng, logp.shape[1], device=z.device, dtype=ce.dtype)
        loss = (ce * keep).sum() / (ce.shape[0] * keep.sum())
        return loss, {"student_temp": self.student_temp}

    @torch.no_grad()
    def update_state(self, z_global: torch.Tensor, psi: torch.Tensor, z_local: torch.Tensor | None = None) -> None:
        """Centre <- m * centre + (1 - m) * mean teacher cosine over the batch (all ranks), per group."""
        for z, centre in ((z_global, self.centre), (z_local, self.centre_local)):
            if z is None or z.shape[1] == 0:
                continue
            mean = scored(z, psi, 1.0, None).mean(dim=(0, 1))[None]   # (1, K)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            centre.mul_(self.centre_momentum).add_(mean, alpha=1.0 - self.centre_momentum)
