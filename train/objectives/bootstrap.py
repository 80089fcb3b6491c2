"""Annotation bootstrapping loss on top of any annotation source (docs/METHOD.md section 3).

For every ordered pair of views (i -> j, i != j) of a clip -- the transition
``(x = view i, a = action i->j, x' = view j)`` -- the value head predicts the
annotation distribution of x' from x and a:

    Q(l | x, a)  = softmax_l(t_AB * phi_AB(x, a) . psi(l))
    y(l)         = (1 - gamma) * p_ema(l | x')  +  gamma * norm(max_{a' in A'} Q_ema(l | x', a'))
    loss         = CE(y, Q(. | x, a)),  y computed under no_grad

``norm`` renormalises the per-annotation max to a distribution, so y is a
mixture of two distributions (sums to 1 for any gamma). Identity pairs (i == i)
are excluded: their target is the view's own teacher distribution, which the
base method already covers.

``A'`` (gamma > 0) is a sample of the action distribution out of x', not the moves
to the batch's other views: the loader draws ``M`` fresh views per clip by the
rules that make its views (``ViewSampler.sample_next``: box, time offset and
augmentation; never rendered), and ``A'`` for view j is the M actions j -> fresh
view. So the return move j -> i is never in ``A'`` (with it, y for (i, j) would
hold gamma * Q(x_j, a_ji) ~ p(. | x_i): the target would copy the source's own
annotation), and A' is not limited to n - 1 moves.

Masks. Whatever Q scores must be an annotation it was trained to score. For
SimCLR an annotation is a view of the batch and a view cannot be its own
positive: Q(. | x_i, a_ij) never scores column j (``exclude``), so the target y
for (i, j) lives on the columns other than j. The fresh views of A' are not in
the batch, so Q_ema(. | x_j, a') scores every column (its source x_j is a
positive of the view it reaches, as x_i is of x_j in training); column j is then
removed from the per-annotation max and the max renormalised, before mixing.

Batching: the encoder has run once per view; the decoder's keys/values are
computed once per source view and shared by its outgoing actions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# IoU buckets of a pair's boxes for the agreement metric (dt != 0 pairs get their own bucket).
IOU_EDGES = (0.1, 0.4)


@dataclass
class Encoded:
    """Encoder outputs of all views of a batch, views ordered globals first, then locals."""
    cls: torch.Tensor                  # (B, n, D)
    patches: list[torch.Tensor]        # one (B, n_g, N_g, D) per view size group, in view order

    def detach(self) -> "Encoded":
        return Encoded(self.cls.detach(), [p.detach() for p in self.patches])


def off_diagonal_targets(n: int, device: torch.device) -> torch.Tensor:
    """(n, n-1) int64: row i lists every target view j != i, in order."""
    k = torch.arange(n - 1, device=device)[None]                    # closed form: no boolean index, so
    i = torch.arange(n, device=device)[:, None]                        # no data-dependent shape to compile
    return k + (k >= i).long()


def bootstrap_target(p_next: torch.Tensor, q_next: torch.Tensor | None, gamma: float,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """y = (1-gamma) p_next + gamma * renorm(max over A' of q_next), per target view.

    p_next: (..., L) distributions; q_next: (..., M, L) distributions (M next actions) or None when gamma = 0;
    exclude: (..., L) bool, annotations the target view cannot have (dropped from the max before renorm).
    """
    if gamma == 0.0 or q_next is None:
        return p_next
    q_max = q_next.max(dim=-2).values                               # (..., L): per-annotation max over A'
    if exclude is not None:
        q_max = q_max.masked_fill(exclude, 0.0)
    q_max = q_max / q_max.sum(-1, keepdim=True).clamp_min(1e-12)    # back to a distribution
    return (1.0 - gamma) * p_next + gamma * q_max


def run_value(value: nn.Module, enc: Encoded, actions: torch.Tensor) -> torch.Tensor:
    """phi for M actions out of every view: actions (B, n, M, A) -> (B, n, M, d), one decoder call per size."""
    B, _, M, _ = actions.shape
    outs, start = [], 0
    for patches in enc.patches:                                     # (B, n_g, N_g, D)
        ng = patches.shape[1]
        acts = actions[:, start:start + ng].reshape(B * ng, M, -1)
        outs.append(value(patches.reshape(B * ng, *patches.shape[2:]), acts).view(B, ng, M, -1))
        start += ng
    return torch.cat(outs, dim=1)


def scored(z: torch.Tensor, psi: torch.Tensor, scale: torch.Tensor | float,
           exclude: torch.Tensor | None) -> torch.Tensor:
    """Logits scale * z . psi (..., L) in float32, -inf where ``exclude`` (broadcastable to (..., L)) is True.

    Autocast is switched off here: under it the matmul would run in bf16 again whatever its inputs, and
    cosines divided by a temperature of 0.04 (DINO's teacher) would carry bf16's 3 significant digits.
    """
    with torch.autocast(z.device.type, enabled=False):
        logits = scale * (z.float() @ psi.float().t())
    return logits if exclude is None else logits.masked_fill(exclude, float("-inf"))


def pair_iou(boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of boxes: (B, n, 4) as (y0, x0, h, w) -> (B, n, n)."""
    y0, x0, h, w = boxes.float().unbind(-1)
    y1, x1 = y0 + h, x0 + w
    ih = (torch.minimum(y1[:, :, None], y1[:, None]) - torch.maximum(y0[:, :, None], y0[:, None])).clamp_min(0)
    iw = (torch.minimum(x1[:, :, None], x1[:, None]) - torch.maximum(x0[:, :, None], x0[:, None])).clamp_min(0)
    inter = ih * iw
    area = h * w
    return inter / (area[:, :, None] + area[:, None] - inter).clamp_min(1e-12)


def agreement_metrics(q_logits: torch.Tensor, p_next: torch.Tensor, iou: torch.Tensor,
                      dt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 agreement of Q with the teacher on x', by pair IoU bucket (NaN for an empty bucket).

    q_logits, p_next: (B, n, n-1, L); iou, dt: (B, n, n-1). Values stay tensors (no device sync here).
    """
    agree = (q_logits.argmax(-1) == p_next.argmax(-1)).float()
    still = dt == 0
    buckets = {"q_agree_dt": ~still,
               f"q_agree_iou_lt{IOU_EDGES[0]}": still & (iou < IOU_EDGES[0]),
               f"q_agree_iou_{IOU_EDGES[0]}-{IOU_EDGES[1]}": still & (iou >= IOU_EDGES[0]) & (iou <= IOU_EDGES[1]),
               f"q_agree_iou_gt{IOU_EDGES[1]}": still & (iou > IOU_EDGES[1])}
    out = {"q_agree": agree.mean()}
    for name, mask in buckets.items():
        out[name] = (agree * mask).sum() / mask.sum()            # 0 / 0 = NaN: dropped by the objective
    return out


def next_values(value_t: nn.Module, enc_t: Encoded, psi_t: torch.Tensor, next_actions: torch.Tensor) -> torch.Tensor:
    """Q_ema(. | x_j, a') for the M next actions out of every view j: (B, n, M, A) -> (B, n, M, L).

    The reached views are fresh (not in the batch), so no annotation is masked here (module docstring).
    """
    phi = run_value(value_t, enc_t, next_actions)                   # (B, n, M, d)
    return scored(phi, psi_t, value_t.scale(), None).softmax(-1)


def pair_losses(value_s: nn.Module, enc_s: Encoded, psi_s: torch.Tensor, exclude: torch.Tensor | None,
                actions: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(y_j, Q(. | x_i, a_ij)) for every ordered pair i != j: (B, n, n-1), and the logits (B, n, n-1, L).

    Entry [b, i, k] is the pair (i, j = off_diagonal_targets(n)[i, k]): the decoder reads view i's patches and
    the action i -> j, and is trained toward view j's target y[b, j]. exclude: (B, n, L), the annotations
    view j cannot have (SimCLR: itself), masked in Q and absent from y.
    """
    B, n = actions.shape[:2]
    tgt = off_diagonal_targets(n, actions.device)                   # (n, n-1)
    src = torch.arange(n, device=actions.device)[:, None]
    ex_pair = None if exclude is None else exclude[:, tgt]          # (B, n, n-1, L)
    phi = run_value(value_s, enc_s, actions[:, src, tgt])           # (B, n, n-1, d) unit vectors
    logits = scored(phi, psi_s, value_s.scale(), ex_pair)           # (B, n, n-1, L)
    logp = logits.log_softmax(-1)
    if ex_pair is not None:                                         # -inf * 0 would be NaN
        logp = logp.masked_fill(ex_pair, 0.0)
    return -(y[:, tgt] * logp).sum(-1), logits


def bootstrap_loss(*, value_s: nn.Module, enc_s: Encoded, psi_s: torch.Tensor, exclude: torch.Tensor | None,
                   actions: torch.Tensor, p_next: torch.Tensor, q_next: torch.Tensor | None, gamma: float,
                   boxes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean soft-target CE of Q(. | view i, a_ij) against y(view j) over all ordered pairs i != j.

    psi_s: (L, d) student annotations; exclude: (B, n, L) bool or None; actions: (B, n, n, A) from
    ``pipeline.actions.pairwise_actions``; p_next: (B, n, L) target-network p(l | view j); q_next:
    (B, n, M, L) target-network Q over the next actions out of view j (``next_values``), or None at
    gamma = 0; boxes: (B, n, 4) for the agreement metrics.
    """
    with torch.no_grad():
        y = bootstrap_target(p_next, q_next, gamma, exclude)        # (B, n, L): target of view j
    ce, logits = pair_losses(value_s, enc_s, psi_s, exclude, actions, y)
    loss = ce.mean()
    with torch.no_grad():
        n = actions.shape[1]
        tgt = off_diagonal_targets(n, actions.device)
        src = torch.arange(n, device=actions.device)[:, None]
        iou = pair_iou(boxes)[:, src, tgt]
        dt = actions[:, src, tgt, 4]                                # ACTION_FIELDS[4] == "dt"
        metrics = agreement_metrics(logits, p_next[:, tgt], iou, dt)
        metrics["q_temp"] = 1.0 / value_s.scale()
        if gamma > 0.0:
            metrics["bootstrap_target_entropy"] = -(y * y.clamp_min(1e-12).log()).sum(-1).mean()
    return loss, metrics
