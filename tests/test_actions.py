import math

import torch

from abvid.pipeline.actions import ACTION_DIM, AUG_DIM, AUG_FIELDS, compose, pairwise_actions, relative_boxes


def _random_boxes(B, n, gen):
    h = torch.rand(B, n, generator=gen) * 0.8 + 0.1
    w = torch.rand(B, n, generator=gen) * 0.8 + 0.1
    y0 = torch.rand(B, n, generator=gen) * (1 - h)
    x0 = torch.rand(B, n, generator=gen) * (1 - w)
    return torch.stack([y0, x0, h, w], -1).double()


def test_identity_pair_is_zero_move():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(3, 5, gen)
    frame_idx = torch.randint(0, 16, (3, 5), generator=gen)
    aug = torch.zeros(3, 5, AUG_DIM)
    a = pairwise_actions(boxes, frame_idx, aug)
    assert a.shape == (3, 5, 5, ACTION_DIM)
    diag = a.diagonal(dim1=1, dim2=2).permute(0, 2, 1)      # (B, n, A)
    assert torch.allclose(diag[..., :5], torch.zeros_like(diag[..., :5]), atol=1e-6)


def test_composition_of_boxes_and_time():
    gen = torch.Generator().manual_seed(1)
    boxes = _random_boxes(4, 6, gen)
    rel = relative_boxes(boxes)                              # (B, n, n, 4)
    for i, j, k in [(0, 1, 2), (3, 5, 4), (2, 2, 1), (5, 0, 3)]:
        assert torch.allclose(compose(rel[:, i, j], rel[:, j, k]), rel[:, i, k], atol=1e-9)
    fi = torch.randint(-10, 10, (4, 6), generator=gen)
    a = pairwise_actions(boxes, fi, torch.zeros(4, 6, AUG_DIM))
    assert torch.equal(a[:, 0, 1, 4] + a[:, 1, 2, 4], a[:, 0, 2, 4])


def test_hand_built_box_and_target_aug():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 0.25, 0.5]]])
    aug = torch.zeros(1, 2, AUG_DIM)
    aug[0, 1, AUG_FIELDS.index("grey")] = 1.0
    a = pairwise_actions(boxes, torch.tensor([[3, 7]]), aug)
    dy, dx, lsh, lsw, dt = a[0, 0, 1, :5].tolist()
    assert (dy, dx, dt) == (0.5, 1.0, 4.0)
    assert math.isclose(lsh, math.log(0.5), abs_tol=1e-6) and math.isclose(lsw, 0.0, abs_tol=1e-6)
    assert a[0, 0, 1, 5 + AUG_FIELDS.index("grey")] == 1.0       # target's aug
    assert a[0, 1, 0, 5 + AUG_FIELDS.index("grey")] == 0.0
    assert a[0, 1, 0, 4] == -4.0


def test_flipped_source_mirrors_dx():
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.25]]])
    aug = torch.zeros(1, 2, AUG_DIM)
    plain = pairwise_actions(boxes, torch.zeros(1, 2, dtype=torch.long), aug)
    aug[0, 0, AUG_FIELDS.index("flip")] = 1.0
    flipped = pairwise_actions(boxes, torch.zeros(1, 2, dtype=torch.long), aug)
    assert plain[0, 0, 1, 1] == 0.0                 # the left quarter, seen unflipped: starts at x = 0
    assert flipped[0, 0, 1, 1] == 0.75              # seen mirrored: it is the right quarter
    assert torch.allclose(flipped[0, 0, 0, :5], torch.zeros(5))  # a flipped view to itself: still no move
