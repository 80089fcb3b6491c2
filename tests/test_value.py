"""model/value.py: action tokens (bins, ablations) and the batched value decoder."""
import pytest
import torch

from abvid.model.value import AUG_RANGES, ActionTokenizer, ValueDecoder, discretise, field_names
from abvid.pipeline.actions import ACTION_DIM, ACTION_FIELDS

DT = ACTION_FIELDS.index("dt")


def random_actions(*lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, ACTION_DIM, generator=g)
    a[..., DT] = torch.randint(-5, 6, lead, generator=g).float()
    return a


def test_discretise_bins_and_clamps():
    v = torch.tensor([-10.0, -1.0, -0.99, 0.0, 0.49, 0.5, 0.99, 1.0, 10.0])
    assert discretise(v, -1.0, 1.0, 4).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]


def test_aug_ranges_resolve_what_views_records():
    """pipeline/views.py: colour as factor - 1 (+-0.4), hue in turns (+-0.1), blur sigma 0.1-2, flags 0/1."""
    for field, values in {"brightness": [-0.4, 0.0, 0.4], "saturation": [-0.2, 0.0, 0.2], "hue": [-0.1, 0.0, 0.1],
                          "blur_sigma": [0.0, 1.0, 2.0], "flip": [0.0, 1.0]}.items():
        bins = discretise(torch.tensor(values), *AUG_RANGES[field], 16).tolist()
        assert len(set(bins)) == len(values), (field, bins)


def test_tokenizer_shapes_and_temporal_switch():
    a = random_actions(3, 5)
    tok = ActionTokenizer(16, num_bins=8, max_dt=4)
    assert tok(a).shape == (3, 5, 6, 16) and field_names(True) == ("dy", "dx", "log_sh", "log_sw", "dt", "aug")
    no_t = ActionTokenizer(16, num_bins=8, max_dt=4, temporal=False)
    assert no_t(a).shape == (3, 5, 5, 16)
    b = a.clone()
    b[..., DT] += 3.0
    assert not torch.equal(tok(a), tok(b))                     # dt is seen ...
    assert torch.equal(no_t(a), no_t(b))                       # ... unless temporal=False


def test_fourier_place_tokens_resolve_a_tenth_of_a_box_where_16_bins_do_not():
    """A local crop inside a global view: dy 0.30 vs 0.40 (and 0.05 vs 0.15) must not look alike to Q."""
    torch.manual_seed(0)
    fourier, bins = ActionTokenizer(16, num_bins=16, encoding="fourier"), ActionTokenizer(16, num_bins=16,
                                                                                          encoding="bins")
    a = torch.zeros(4, ACTION_DIM)
    a[:, ACTION_FIELDS.index("dy")] = torch.tensor([0.30, 0.40, 0.05, 0.15])
    for tok, distinct in ((fourier, True), (bins, False)):
        t = tok(a)[:, 0]                                               # the dy token
        assert (not torch.allclose(t[0], t[1])) == distinct and (not torch.allclose(t[2], t[3])) == distinct
    assert fourier(a).shape == bins(a).shape == (4, 6, 16)
    with pytest.raises(ValueError, match="fourier"):
        ActionTokenizer(16, encoding="sine")


def test_tokenizer_mask_tokens_ignore_the_action():
    tok = ActionTokenizer(16, num_bins=8, action_tokens=False)
    a, b = random_actions(2, 4, seed=0), random_actions(2, 4, seed=1)
    assert tok(a).shape == (2, 4, 6, 16) and torch.equal(tok(a), tok(b))
    assert tok.geom is None and tok.mask_tokens is not None    # no unused tables (DDP)


def decoder(**kw) -> ValueDecoder:
    torch.manual_seed(0)
    return ValueDecoder(enc_dim=24, out_dim=12, dim=16, depth=2, num_heads=2, num_bins=8, max_dt=4, **kw)


def test_decoder_shape_and_dependencies():
    dec = decoder()
    patches, a = torch.randn(3, 10, 24), random_actions(3, 4)
    phi = dec(patches, a)
    assert phi.shape == (3, 4, 12)
    torch.testing.assert_close(phi.norm(dim=-1), torch.ones(3, 4))          # unit vectors, like psi
    assert not torch.allclose(phi, dec(patches, random_actions(3, 4, seed=5)))     # depends on the action
    assert not torch.allclose(phi, dec(torch.randn(3, 10, 24), a))                   # and on the source
    phi.sum().backward()
    assert all(p.grad is not None for n, p in dec.named_parameters() if n != "logit_scale")  # scale: used by Q


def test_decoder_actions_do_not_interact():
    """Batching M actions per source must equal decoding each action alone (keys shared, queries independent)."""
    dec = decoder().eval()
    patches, a = torch.randn(2, 7, 24), random_actions(2, 5)
    joint = dec(patches, a)
    alone = torch.cat([dec(patches, a[:, m:m + 1]) for m in range(5)], dim=1)
    torch.testing.assert_close(joint, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switch", ["action_tokens", "temporal"])
def test_decoder_ablations(switch):
    dec = decoder(**{switch: False})
    patches, a = torch.randn(2, 7, 24), random_actions(2, 3)
    b = random_actions(2, 3, seed=9) if switch == "action_tokens" else a.clone()
    b[..., DT] += 2.0
    torch.testing.assert_close(dec(patches, a), dec(patches, b))


def test_decoder_scale_is_learned_temperature():
    dec = decoder(init_temp=0.1)
    assert dec.scale().item() == pytest.approx(10.0)
    assert "logit_scale" in dec.no_weight_decay()
    with pytest.raises(ValueError, match="source views"):
        dec(torch.randn(2, 7, 24), random_actions(3, 1))
