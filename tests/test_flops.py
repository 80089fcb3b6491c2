"""train/flops.py: FLOP counts against the closed form, the step count, the peak table and MFU."""
from __future__ import annotations

import pytest
import torch

from abvid.model import build_encoder
from abvid.train import flops


@pytest.mark.parametrize("arch,size,patch", [("vit_small", 224, 16), ("vit_tiny", 96, 16), ("vit_base", 64, 8)])
def test_vit_forward_count_matches_closed_form(arch, size, patch):
    with torch.device("meta"):                        # shapes only: no memory, no compute
        enc = build_encoder(arch, patch_size=patch, img_size=size)
        x = torch.empty(3, 3, size, size)
        counted = flops.count_flops(lambda: enc.forward_features(x))
    closed = flops.vit_forward_flops(3, size, size, patch, enc.embed_dim, len(enc.blocks))
    assert abs(counted - closed) / closed <= 0.02, (counted, closed)


def test_cpu_attention_is_counted():
    """Without the CPU flash-attention formula, attention (4 T^2 D per block) would be missing on CPU."""
    enc = build_encoder("vit_tiny", patch_size=8, img_size=64, embed_dim=32, depth=1, num_heads=2)
    x = torch.rand(2, 3, 64, 64)
    with_attn = flops.count_flops(lambda: enc.forward_features(x))
    t = 65
    closed = flops.vit_forward_flops(2, 64, 64, 8, 32, 1)
    assert abs(with_attn - closed) / closed <= 0.02
    assert closed - 2 * 4 * t * t * 32 < with_attn            # the attention term is in the count


def test_vit_large_flops_on_meta():
    """ViT-L/16 at 224 px: 2 x 61.6 GMACs forward per image (timm's vit_large_patch16_224 profile)."""
    with torch.device("meta"):
        enc = build_encoder("vit_large", patch_size=16)
        n = flops.count_flops(lambda: enc.forward_features(torch.empty(1, 3, 224, 224)))
    assert 2 * 59e9 < n < 2 * 63e9


def test_step_flops_are_about_three_forwards_of_the_student():
    """A base SimCLR step without teacher: forward + backward ~ 3x the encoder forward (heads are small)."""
    from abvid.model import ModelConfig
    from abvid.tools.bench.train import random_batch
    from abvid.train.objectives import ObjectiveConfig, build_objective

    torch.manual_seed(0)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=64, depth=2, num_heads=2)
    ocfg = ObjectiveConfig(name="simclr", bootstrap=False, target_network=False, proj_dim=16, proj_hidden_dim=32)
    obj = build_objective(ocfg, mcfg)
    batch = random_batch(4, 2, 32, 2, 16, "cpu")
    n = flops.step_flops(obj, batch)
    fwd = flops.vit_forward_flops(8, 32, 32, 8, 64, 2) + flops.vit_forward_flops(8, 16, 16, 8, 64, 2)
    # backward = 2x forward for matmuls; the first layer's input gradient is skipped (pixels need none)
    assert 2.7 * fwd < n < 3.3 * fwd, (n, fwd)
    assert all(p.grad is None for p in obj.parameters())      # gradients cleared after counting
    ab = build_objective(ObjectiveConfig(name="simclr", bootstrap=True, proj_dim=16, proj_hidden_dim=32,
                                         decoder_dim=16, decoder_depth=1, decoder_heads=2), mcfg)
    assert flops.step_flops(ab, batch) > n + fwd              # + teacher forward over all views + value decoder


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                       ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
                                       ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla T4", None)])
def test_peak_table(name, peak):
    got, source = flops.peak_bf16_tflops(name)
    assert got == peak, (name, got)
    assert ("PEAK_TFLOPS" in source) == (peak is None) and source


def test_mfu_definition():
    assert flops.mfu(989e12 * 0.35, 1.0, 989.0) == pytest.approx(0.35)
    assert flops.mfu(1e12, 0.5, None) is None
    assert flops.device_peak("cpu")[0] is None
    assert flops.device_peak("cpu", 100.0)[0] == 100.0
