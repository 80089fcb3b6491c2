"""train/objectives/bootstrap.py: the bootstrapped target, pair indexing, IoU buckets (pure functions)."""
import math

import pytest

import torch

from abvid.train.objectives.bootstrap import (agreement_metrics, bootstrap_target, off_diagonal_targets, pair_iou,
                                              scored)


def test_gamma_zero_target_is_the_teacher_distribution():
    p = torch.softmax(torch.randn(2, 3, 5), -1)
    q = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    assert torch.equal(bootstrap_target(p, q, 0.0), p)
    assert torch.equal(bootstrap_target(p, None, 0.0), p)


def test_gamma_positive_hand_built_max_and_renormalisation():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([[0.6, 0.3, 0.1],      # Q_ema(. | x', a'_1)
                      [0.1, 0.1, 0.8],      # Q_ema(. | x', a'_2)
                      [0.2, 0.5, 0.3]])     # Q_ema(. | x', a'_3)
    # per-annotation max = (0.6, 0.5, 0.8), sum 1.9 -> renormalised (6/19, 5/19, 8/19)
    q_max = torch.tensor([0.6, 0.5, 0.8]) / 1.9
    y = bootstrap_target(p, q, 0.25)
    torch.testing.assert_close(y, 0.75 * p + 0.25 * q_max)
    assert math.isclose(y.sum().item(), 1.0, rel_tol=1e-6)
    # not the max over actions of the whole distribution (that would pick one row)
    assert not torch.allclose(y, 0.75 * p + 0.25 * q[2])


def test_off_diagonal_targets():
    assert off_diagonal_targets(3, torch.device("cpu")).tolist() == [[1, 2], [0, 2], [0, 1]]


def test_pair_iou_hand_case():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]])
    iou = pair_iou(boxes)
    torch.testing.assert_close(iou[0].diagonal(), torch.ones(3))
    assert abs(iou[0, 0, 1].item() - (0.125 / 0.375)) < 1e-6    # half overlap: 1/3
    assert iou[0, 0, 2].item() == 0.0 and torch.equal(iou, iou.transpose(1, 2))


def test_agreement_buckets():
    L = 4
    p = torch.eye(L)[torch.tensor([[[0, 1, 2, 3]]])]                       # (1, 1, 4, L) teacher top-1 = 0..3
    q = torch.eye(L)[torch.tensor([[[0, 2, 2, 3]]])] * 5                   # Q right on pairs 0, 2, 3
    iou = torch.tensor([[[0.05, 0.2, 0.9, 0.5]]])
    dt = torch.tensor([[[0.0, 0.0, 0.0, 3.0]]])
    m = {k: float(v) for k, v in agreement_metrics(q, p, iou, dt).items()}
    assert m["q_agree"] == 0.75
    assert m["q_agree_iou_lt0.1"] == 1.0 and m["q_agree_iou_0.1-0.4"] == 0.0
    assert m["q_agree_iou_gt0.4"] == 1.0 and m["q_agree_dt"] == 1.0
    empty = agreement_metrics(q, p, iou, torch.zeros_like(dt))["q_agree_dt"]
    assert math.isnan(float(empty))                                  # the objective drops empty buckets


def test_scored_masks_excluded_annotations():
    z = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    psi = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    ex = torch.tensor([[True, False, False, False], [False, False, False, True]])
    out = scored(z, psi, 2.0, ex)
    assert torch.isinf(out[ex]).all() and torch.allclose(out[~ex], (2.0 * z @ psi.t())[~ex])
    assert torch.allclose(out.softmax(-1)[ex], torch.zeros(2))


# ---- reference: the loss written out as an explicit loop over (clip, i, j, a') ---------------------------

def _perturb_teacher(obj) -> None:
    """Teacher != student (and non-zero DINO centres), so a mix-up of the two cannot pass."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in obj.named_parameters():
            if name.startswith("teacher_"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name in ("centre", "centre_local"):
            if hasattr(obj.family, name):
                getattr(obj.family, name).copy_(0.1 * torch.randn(getattr(obj.family, name).shape, generator=g))


def _reference_pair_losses(obj, batch, gamma, M, tt):
    """CE(y_j, Q(. | x_i, a_ij)) for every clip b and ordered pair i != j, one view / action at a time.

    Heads use LayerNorm here (no batch statistics), so a view's annotation can be computed alone.
    Returns {(b, i, j): ce}.
    """
    from abvid.pipeline.actions import actions_between, pairwise_actions

    B, ng = batch["global"].shape[:2]
    views = [[batch["global"][b, k] if k < ng else batch["local"][b, k - ng] for k in range(4)] for b in range(B)]
    dino = obj.family.__class__.__name__ == "DINOFamily"
    t_enc, t_head, t_val = obj.teacher_encoder, obj.teacher_head, obj.teacher_value

    def tokens(enc, x):
        return enc.forward_features(x[None])[0]                       # (1 + N, D)

    z_s = [[obj.student_head(tokens(obj.student_encoder, views[b][k])[0]) for k in range(4)] for b in range(B)]
    z_t = [[t_head(tokens(t_enc, views[b][k])[0]) for k in range(4)] for b in range(B)]
    if dino:
        psi_s, psi_t = obj.student_head.prototypes(), t_head.prototypes()
    else:                                                             # SimCLR: the batch's views, b-major
        psi_s = torch.stack([z for row in z_s for z in row])
        psi_t = torch.stack([z for row in z_t for z in row])
    col = lambda b, k: b * 4 + k                                       # SimCLR column of view (b, k)

    def p_target(b, j):                                               # p_ema(l | view j)
        if dino:
            centre = obj.family.centre if j < ng else obj.family.centre_local
            return ((z_t[b][j] @ psi_t.t() - centre[0]) / tt).softmax(-1)
        logits = z_t[b][j] @ psi_t.t() / obj.family.target_temperature
        logits[col(b, j)] = float("-inf")
        return logits.softmax(-1)

    pairs = pairwise_actions(batch["boxes"], batch["frame_idx"], batch["aug"])
    out = {}
    for b in range(B):
        for j in range(4):
            y = p_target(b, j)
            if gamma > 0:
                q_max = None
                for m in range(M):                                    # A': j -> fresh view m
                    a = actions_between(batch["boxes"][b:b + 1, j:j + 1], batch["frame_idx"][b:b + 1, j:j + 1],
                                        batch["aug"][b:b + 1, j:j + 1], batch["next_boxes"][b:b + 1, m:m + 1],
                                        batch["next_frame_idx"][b:b + 1, m:m + 1],
                                        batch["next_aug"][b:b + 1, m:m + 1])[0, 0, 0]
                    phi = t_val(tokens(t_enc, views[b][j])[None, 1:], a[None, None])[0, 0]
                    q = (t_val.scale() * phi @ psi_t.t()).softmax(-1)     # a fresh view: nothing masked
                    q_max = q if q_max is None else torch.maximum(q_max, q)
                if not dino:
                    q_max[col(b, j)] = 0.0                            # y for (i, j) cannot name view j
                y = (1 - gamma) * y + gamma * q_max / q_max.sum()
            for i in range(4):
                if i == j:
                    continue
                phi = obj.student_value(tokens(obj.student_encoder, views[b][i])[None, 1:], pairs[b, i, j][None, None])
                logits = obj.student_value.scale() * phi[0, 0] @ psi_s.t()
                keep = torch.ones_like(logits, dtype=torch.bool)
                if not dino:
                    keep[col(b, j)] = False                           # Q never scores the reached view itself
                logp = logits.masked_fill(~keep, float("-inf")).log_softmax(-1)
                out[(b, i, j)] = -(y[keep] * logp[keep]).sum()
    return out


@pytest.mark.parametrize("name", ["dino", "simclr"])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_bootstrap_loss_equals_an_explicit_loop_over_clips_pairs_and_next_actions(monkeypatch, name, gamma):
    import abvid.train.objectives.bootstrap as bootstrap_mod
    from test_objectives import make, toy_batch

    extra = {"simclr_target_temp": 0.05} if name == "simclr" else {}   # targets sharper than the base loss
    obj = make(name, bootstrap=True, gamma=gamma, num_next_actions=3, **extra).eval()
    _perturb_teacher(obj)
    batch = toy_batch(B=3)
    captured = {}
    real = bootstrap_mod.pair_losses

    def spy(*args, **kw):
        ce, logits = real(*args, **kw)
        captured["ce"] = ce
        return ce, logits
    monkeypatch.setattr(bootstrap_mod, "pair_losses", spy)
    with torch.no_grad():
        _, metrics = obj.loss(batch, teacher_temp=0.05)
        ref = _reference_pair_losses(obj, batch, gamma, 3, 0.05)
    ce = captured["ce"]                                               # (B, n, n-1): [b, i, k] is pair (i, tgt[i, k])
    tgt = off_diagonal_targets(4, torch.device("cpu"))
    for (b, i, j), want in ref.items():
        k = int((tgt[i] == j).nonzero())
        torch.testing.assert_close(ce[b, i, k], want, rtol=1e-4, atol=1e-5)
    mean = torch.stack(list(ref.values())).mean().item()
    assert math.isclose(metrics["loss_bootstrap"], mean, rel_tol=1e-4)


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_base_term_of_ab_equals_the_base_method(name):
    """AB_x = x + lambda * bootstrap: the base term of AB_x is x's own loss on the same batch and weights.
    BatchNorm heads (batch statistics) make the test sensitive to which views the teacher head sees."""
    from test_objectives import make, toy_batch

    kw = dict(head_norm="bn", proj_norm="bn")
    base, ab = make(name, bootstrap=False, **kw), make(name, bootstrap=True, gamma=0.5, **kw)
    shared = {k: v for k, v in ab.state_dict().items() if k in base.state_dict()}
    assert shared.keys() == base.state_dict().keys()                  # same seed: the same shared weights
    base.load_state_dict(shared)
    batch = toy_batch()
    loss_base, m_base = base.train().loss(batch, teacher_temp=0.05)
    _, m_ab = ab.train().loss(batch, teacher_temp=0.05)
    assert math.isclose(m_ab["loss_base"], loss_base.item(), rel_tol=1e-6)
    assert m_ab["loss"] > m_ab["loss_base"]                           # and the bootstrap term on top
    if name == "dino":                                                # the globals' centre moves alike
        base.update_teacher(0.99)
        ab.update_teacher(0.99)
        torch.testing.assert_close(ab.family.centre, base.family.centre)
        assert base.family.centre_local.abs().sum() == 0 < ab.family.centre_local.abs().sum()


def test_scored_is_float32_under_autocast():
    """DINO teacher logits are cosines / 0.04: the matmul must not fall back to bf16 under autocast."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    psi = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=-1)
    exact = (z.double() @ psi.double().t()) / 0.04
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scored(z, psi, 1 / 0.04, None)
        bf16 = (z @ psi.t()) / 0.04                                   # what an unguarded matmul gives
    assert out.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() < 1e-4 < (bf16.double() - exact).abs().max()
