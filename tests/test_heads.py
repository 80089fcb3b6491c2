"""model/heads.py and model/text.py: DINO head (fixed gain), projector, bag-of-tokens text encoder."""
import pytest
import torch

from abvid.model.heads import DINOHead, ProjectionHead
from abvid.model.text import TextEncoder, build_vocab, tokenize
from abvid.train.objectives.clip import batch_texts


@pytest.mark.parametrize("norm", ["none", "ln", "bn"])
def test_dino_head_shapes_and_unit_vectors(norm):
    head = DINOHead(32, num_prototypes=50, hidden_dim=64, bottleneck_dim=16, num_layers=3, norm=norm)
    h = torch.randn(4, 3, 32)                                  # (B, n, D): any leading shape
    z = head(h)
    assert z.shape == (4, 3, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4, 3))
    assert head.prototypes().shape == (50, 16)
    torch.testing.assert_close(head.prototypes().norm(dim=-1), torch.ones(50))
    logits = head.logits(h)
    assert logits.shape == (4, 3, 50) and logits.abs().max() <= 1.0 + 1e-5


def test_dino_head_gain_is_fixed_at_one():
    head = DINOHead(16, num_prototypes=10, hidden_dim=32, bottleneck_dim=8)
    h = torch.randn(5, 16)
    before = head.logits(h)
    with torch.no_grad():
        head.prototype_weight.mul_(0.01)                       # what weight decay does to a weight
    torch.testing.assert_close(head.logits(h), before)        # ... cannot shrink the logits
    names = {n for n, _ in head.named_parameters()}
    assert not any(n.endswith(("weight_g", "original0")) for n in names)   # no trainable gain exists
    assert head.no_weight_decay() == {"prototype_weight"}


def test_projection_head():
    proj = ProjectionHead(32, out_dim=12, hidden_dim=48)
    z = proj(torch.randn(7, 32))
    assert z.shape == (7, 12)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(7))


def test_vocab_and_tokens():
    assert tokenize("A red-Car, 2 dogs!") == ["a", "red", "car", "2", "dogs"]
    assert build_vocab(["cat on a mat", "a dog", "Cat"]) == ["a", "cat", "dog", "mat", "on"]
    assert build_vocab(["cat on a mat", "a dog", "Cat"], min_count=2) == ["a", "cat"]


def test_text_encoder_embeds_texts():
    enc = TextEncoder(build_vocab(["cat", "dog", "red car"]), out_dim=8, embed_dim=16, oov_buckets=4)
    psi = enc(["cat", "dog", "red car", "unseen words", ""])
    assert psi.shape == (5, 8)
    torch.testing.assert_close(psi.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(psi[0], psi[1])
    torch.testing.assert_close(enc(["cat"])[0], psi[0])        # a text's embedding does not depend on the batch
    # Out-of-vocabulary words hash to stable buckets after the vocabulary; empty texts get their own id.
    ids = enc.token_ids("zebra")
    assert len(ids) == 1 and 4 <= ids[0] < 4 + 4 and ids == enc.token_ids("ZEBRA")
    assert enc.token_ids("") == [enc.empty_id]
    assert enc([]).shape == (0, 8)
    enc(["cat", "zebra"]).sum().backward()
    assert enc.embedding.weight.grad is not None


def test_batch_texts_multi_hot():
    texts, hot = batch_texts([["dog"], [], ["cat", "dog"]])
    assert texts == ["cat", "dog"]
    assert hot.tolist() == [[False, True], [False, False], [True, True]]


def _bn_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    from abvid.model.heads import BatchNormAnyShape
    from abvid.train import dist
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = dist.init("cpu", timeout_s=60)
    try:
        x, w = _bn_data()
        half = x.shape[0] // world
        x = x[rank * half:(rank + 1) * half].clone().requires_grad_(True)
        bn = _bn_module(BatchNormAnyShape)
        y = bn(x)
        (y * w[rank * half:(rank + 1) * half]).sum().backward()       # this rank's share of the total loss
        torch.save({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var}, f"{out}/r{rank}.pt")
    finally:
        dist.shutdown(ctx)


def _bn_data():
    g = torch.Generator().manual_seed(0)
    return 3 + 2 * torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)   # (..., C=5)


def _bn_module(cls):
    torch.manual_seed(1)
    bn = cls(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.train()


def test_batchnorm_under_ddp_uses_the_global_batch(tmp_path):
    """2 gloo ranks with half the rows each == one process with all rows: outputs, gradients, running stats."""
    import torch.multiprocessing as mp
    from test_dist import free_port

    from abvid.model.heads import BatchNormAnyShape
    mp.spawn(_bn_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{k}.pt", weights_only=True) for k in (0, 1)]
    x, w = _bn_data()
    x.requires_grad_(True)
    bn = _bn_module(BatchNormAnyShape)
    y = bn(x)
    (y * w).sum().backward()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r[0]["dx"], r[1]["dx"]]), x.grad, **close)
    torch.testing.assert_close(r[0]["dw"] + r[1]["dw"], bn.weight.grad, **close)    # summed, as the losses are
    torch.testing.assert_close(r[0]["db"] + r[1]["db"], bn.bias.grad, **close)
    for k in (0, 1):
        torch.testing.assert_close(r[k]["rm"], bn.running_mean, **close)
        torch.testing.assert_close(r[k]["rv"], bn.running_var, **close)
