"""AdamW parameter groups: no weight decay on norms, biases, position embeddings, prototypes (train/optim.py)."""
from __future__ import annotations

import torch
from torch import nn

from abvid.train.optim import build_optimizer, param_groups, set_hparams


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.prototypes = nn.Linear(8, 16, bias=False)
        self.temperature = nn.Parameter(torch.tensor(0.0))
        self.special = nn.Linear(8, 8, bias=False)
        self.teacher = nn.Linear(8, 8)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return {"special.weight"}


def _names(groups, apply_wd):
    return {n for g in groups if g["apply_wd"] == apply_wd for n in g["names"]}


def test_groups_split_as_documented():
    groups = param_groups(Toy())
    assert _names(groups, True) == {"proj.weight"}
    assert _names(groups, False) == {"pos_embed", "cls_token", "proj.bias", "norm.weight", "norm.bias",
                                     "prototypes.weight", "temperature", "special.weight"}


def test_frozen_parameters_are_not_optimised():
    opt = build_optimizer(Toy(), lr=1e-3)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    m = Toy()
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert len(ids) == sum(p.requires_grad for p in m.parameters())


def test_set_hparams_applies_wd_only_where_allowed():
    model = Toy()
    opt = build_optimizer(model, lr=1.0)
    set_hparams(opt, lr=0.5, weight_decay=0.1)
    for g in opt.param_groups:
        assert g["lr"] == 0.5
        assert g["weight_decay"] == (0.1 if g["apply_wd"] else 0.0)


def test_weight_decay_leaves_no_decay_params_alone():
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model, lr=0.1)
    set_hparams(opt, lr=0.1, weight_decay=0.5)
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    before_norm, before_proj = model.norm.weight.clone(), model.proj.weight.clone()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)                   # zero gradient: only decay could move a weight
    opt.step()
    assert torch.equal(model.norm.weight, before_norm)
    assert not torch.equal(model.proj.weight, before_proj)
    assert torch.allclose(model.proj.weight, before_proj * (1 - 0.1 * 0.5))
