"""DINO at toy scale: the recommended recipe keeps the teacher's targets informative (docs/METHOD.md section 2).

A fixed synthetic stream: 8 distinct patterns (oriented stripes in a class
colour), random crops of them as 2 global (32 px) + 2 local (16 px) views,
pixel noise. Healthy targets are confident per view (entropy well below ln K)
yet spread over prototypes across the batch (marginal entropy well above the
per-view entropy). Uniform targets (entropy ~ ln K) or one prototype for
everything (both ~ 0) mean collapse.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from abvid.model import ModelConfig
from abvid.pipeline.actions import AUG_DIM
from abvid.train.objectives import ObjectiveConfig, build_objective

MODEL = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)
RECIPE = dict(num_prototypes=256, head_hidden_dim=256, head_bottleneck_dim=64, head_norm="bn",
              teacher_temp=0.04, student_temp=0.1, centre_momentum=0.9, decoder_dim=32, decoder_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """40 training steps of small matmuls: on the shared 2-core machine (load ~8) two torch threads
    spin-wait and took 70-95 s per test, one thread 2-4 s. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def patterns(k: int, size: int) -> torch.Tensor:
    """(k, 3, size, size) floats in [0, 1]: stripes at k orientations, each with its own colour."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for c in range(k):
        ang, freq = math.pi * c / k, 0.25 + 0.1 * (c % 3)
        stripes = torch.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)))
        col = torch.tensor([(c * 53) % 256, (c * 97) % 256, (c * 151) % 256]).float() / 255
        out.append(0.5 + 0.4 * stripes[None] * col[:, None, None] + 0.1 * col[:, None, None])
    return torch.stack(out).clamp(0, 1)


def crop_batch(pats: torch.Tensor, B: int, g: torch.Generator, ng: int = 2, nl: int = 2) -> dict:
    S = pats.shape[-1]
    n = ng + nl
    cls = torch.randint(0, len(pats), (B,), generator=g)
    views, boxes = [], []
    for i in range(n):
        out = 32 if i < ng else 16
        lo, hi = (int(0.75 * S), S) if i < ng else (S // 4, S // 2)
        size = torch.randint(lo, hi + 1, (B,), generator=g)
        y = (torch.rand(B, generator=g) * (S - size + 1)).long()
        x = (torch.rand(B, generator=g) * (S - size + 1)).long()
        crops = [F.interpolate(pats[cls[b], None, :, y[b]:y[b] + size[b], x[b]:x[b] + size[b]], size=(out, out),
                               mode="bilinear", align_corners=False)[0] for b in range(B)]
        views.append((torch.stack(crops) + 0.05 * torch.randn(B, 3, out, out, generator=g)).clamp(0, 1))
        boxes.append(torch.stack([y / S, x / S, size / S, size / S], -1))
    to8 = lambda v: (v * 255).to(torch.uint8)
    return {"global": to8(torch.stack(views[:ng], 1)), "local": to8(torch.stack(views[ng:], 1)),
            "boxes": torch.stack(boxes, 1).float(), "frame_idx": torch.zeros(B, n, dtype=torch.long),
            "time_s": torch.zeros(B, n), "aug": torch.zeros(B, n, AUG_DIM), "key": [str(b) for b in range(B)],
            "labels": [[] for _ in range(B)], "clip_id": torch.arange(B)}


def train_dino(steps: int = 40, B: int = 32, lr: float = 1e-3, **overrides) -> list[dict]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pats = patterns(8, 48)
    obj = build_objective(ObjectiveConfig(name="dino", **{**RECIPE, **overrides}), MODEL).train()
    decay = obj.no_weight_decay()
    params = [p for n, p in obj.named_parameters() if p.requires_grad and n not in decay]
    no_decay = [p for n, p in obj.named_parameters() if p.requires_grad and n in decay]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    history = []
    for _ in range(steps):
        loss, metrics = obj.loss(crop_batch(pats, B, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.update_teacher(0.99)
        history.append(metrics)
    return history


def last(history: list[dict], key: str, k: int = 5) -> float:
    return sum(m[key] for m in history[-k:]) / k


@pytest.mark.parametrize("bootstrap", [False, True])
def test_dino_toy_recipe_does_not_collapse(bootstrap):
    hist = train_dino(bootstrap=bootstrap)
    ln_k = hist[-1]["target_entropy_max"]
    per_view, marginal = last(hist, "target_entropy"), last(hist, "target_marginal_entropy")
    # Measured (torch 2.14 CPU): base ~1.4 per view / ~3.4 marginal after 40 steps, ln K = 5.55;
    # going on, per-view entropy falls towards 0 while the marginal settles near ln 8 (the 8 patterns).
    assert 0.05 * ln_k < per_view < 0.6 * ln_k, (per_view, ln_k)
    assert marginal > per_view + 1.0, (marginal, per_view)
    assert hist[-1]["loss_base"] < hist[0]["loss_base"]


def test_naive_recipe_collapses():
    """Without normalisation in the head the same run loses all per-image signal (the known trap)."""
    hist = train_dino(head_norm="none", bootstrap=False)
    per_view, marginal = last(hist, "target_entropy"), last(hist, "target_marginal_entropy")
    assert marginal - per_view < 0.3, (per_view, marginal)      # every view gets the same target
