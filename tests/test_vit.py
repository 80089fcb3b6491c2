"""model/vit.py and model/__init__.py: variants, shapes, pixel normalisation, pos-embed interpolation."""
import pytest
import torch

from abvid.model import ModelConfig, build_encoder, encoder_kwargs, num_params
from abvid.model.vit import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small", "vit_base", "vit_large"])
def test_variant_shapes_at_toy_width(arch):
    enc = build_encoder(arch, patch_size=8, **TINY).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = enc.forward_features(x)
    assert tokens.shape == (2, 1 + 16, 32)
    assert enc.embed(x).shape == (2, 32)
    assert torch.equal(enc.embed(x), tokens[:, 0])


@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_variant_full_width_one_image(arch, dim):
    enc = build_encoder(arch, patch_size=16).eval()
    with torch.no_grad():
        out = enc.forward_features(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 1 + 4, dim) and torch.isfinite(out).all()


def test_vit_small_param_count_matches_timm():
    # timm vit_small_patch16_224: 22,050,664 with its 1000-way classifier, 21,665,664 without.
    with_head = num_params(build_encoder("vit_small", patch_size=16, num_classes=1000))
    without = num_params(build_encoder("vit_small", patch_size=16))
    assert abs(with_head - 22.05e6) / 22.05e6 < 0.01
    assert without == 21_665_664


def test_vit_large_matches_timm_and_builds_on_meta():
    # timm vit_large_patch16_224: 304,326,632 with its 1000-way classifier (1024 wide, 24 deep, 16 heads).
    with torch.device("meta"):                                  # 300M parameters, no memory
        enc = build_encoder("vit_large", patch_size=16, drop_path=0.1)
        with_head = build_encoder("vit_large", patch_size=16, num_classes=1000)
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (1024, 24, 16)
    assert num_params(with_head) == 304_326_632 and num_params(enc) == 303_301_632
    assert enc.blocks[-1].drop_path.p == pytest.approx(0.1) and enc.blocks[0].drop_path.p == 0.0


def test_uint8_and_float_inputs_agree():
    enc = build_encoder("vit_tiny", patch_size=8, **TINY).eval()
    x8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(enc.embed(x8), enc.embed(x8.float() / 255), rtol=1e-5, atol=1e-5)
    # Normalisation is ImageNet mean/std: a mean-coloured image becomes all zeros.
    img = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert enc.normalize(img).abs().max() < 1e-6
    torch.testing.assert_close(enc.normalize(torch.ones(1, 3, 1, 1)).flatten(),
                               (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_pos_embed_interpolates_to_other_sizes():
    enc = build_encoder("vit_tiny", patch_size=8, **TINY).eval()
    assert enc.forward_features(torch.rand(1, 3, 48, 48)).shape == (1, 1 + 36, 32)
    assert enc.forward_features(torch.rand(1, 3, 16, 24)).shape == (1, 1 + 6, 32)
    assert enc.pos_embed_for(4, 4) is enc.pos_embed          # stored grid: used as is
    # The CLS position is shared, the patch grid is resized; gradients reach the one stored table.
    enc.forward_features(torch.rand(1, 3, 48, 48)).sum().backward()
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad[:, 1:].abs().sum() > 0


def test_bad_inputs_raise():
    enc = build_encoder("vit_tiny", patch_size=8, **TINY)
    with pytest.raises(ValueError, match="multiple of patch size"):
        enc.forward_features(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="Did you mean 'vit_small'"):
        build_encoder("vit_smal")


def test_encoder_kwargs_round_trip():
    cfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)
    kw = encoder_kwargs(cfg)
    assert kw == {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "drop_path": 0.0,
                  "embed_dim": 32, "depth": 2, "num_heads": 2, "norm_eps": 1e-6}
    a, b = build_encoder(**kw), build_encoder(**kw)
    b.load_state_dict(a.state_dict())                          # same architecture, strict load
    assert "mean" not in a.state_dict()                        # normalisation constants are not state


def test_drop_path_only_in_training():
    enc = build_encoder("vit_tiny", patch_size=8, drop_path=0.5, **TINY)
    x = torch.rand(4, 3, 32, 32)
    enc.eval()
    torch.testing.assert_close(enc.embed(x), enc.embed(x))
    enc.train()
    torch.manual_seed(0)
    a = enc.embed(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, enc.embed(x))
