"""train/objectives/bootstrap.py: the bootstrapped target, pair indexing, IoU buckets (pure functions)."""
import math

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
