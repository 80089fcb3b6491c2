"""Tests of model/io.py and `abvid export`: safetensors round trip, checkpoint reading, EMA vs student."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abvid.model import build_encoder
from abvid.model.io import EncoderFileError, load_encoder, read_encoder_file, save_encoder

TINY = {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2,
        "norm_eps": 1e-6}


def tiny_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(**TINY).eval()


def write_checkpoint(path: Path, *, teacher: bool = True, **extra) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A training checkpoint in the INTERFACES.md layout: student + EMA teacher + a head, in one 'model' dict."""
    student, ema = tiny_encoder(1), tiny_encoder(2)
    model = {f"student_encoder.{k}": v for k, v in student.state_dict().items()}
    if teacher:
        model.update({f"teacher_encoder.{k}": v for k, v in ema.state_dict().items()})
    model["head.weight"] = torch.randn(8, 64)
    ckpt = {"model": model, "optimizer": {}, "scaler": None, "step": 10, "epoch": 0, "loader_state": None,
            "rng": {}, "config": {"model": {"arch": "vit_tiny"}}, "encoder_kwargs": dict(TINY), "format_version": 1,
            **extra}
    torch.save(ckpt, path)
    return student, ema


def frames(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_safetensors_round_trip(tmp_path):
    enc = tiny_encoder(0)
    path = save_encoder(enc, TINY, tmp_path / "enc.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))
    loaded = load_encoder(path)
    assert not loaded.training and loaded.encoder_kwargs == TINY
    with torch.no_grad():
        assert torch.equal(loaded.embed(frames()), enc.embed(frames()))
    state, kwargs = read_encoder_file(path)
    assert kwargs == TINY and set(state) == set(enc.state_dict())


def test_checkpoint_reads_ema_by_default_and_student_on_request(tmp_path):
    student, ema = write_checkpoint(tmp_path / "ckpt.pt")
    with torch.no_grad():
        x = frames()
        assert torch.equal(load_encoder(tmp_path / "ckpt.pt").embed(x), ema.embed(x))
        assert torch.equal(load_encoder(tmp_path / "ckpt.pt", which="student").embed(x), student.embed(x))
        assert not torch.equal(student.embed(x), ema.embed(x))
    # abvid.model re-exports the loader (no training config needed)
    from abvid.model import load_encoder as model_load
    assert isinstance(model_load(tmp_path / "ckpt.pt"), torch.nn.Module)


def test_model_load_encoder_forwards_which(tmp_path):
    """abvid.model.load_encoder passes ``which`` (and map_location) through to model/io.py."""
    import abvid.model
    student, ema = write_checkpoint(tmp_path / "ckpt.pt")
    x = frames()
    with torch.no_grad():
        got = abvid.model.load_encoder(tmp_path / "ckpt.pt", which="student")
        assert torch.equal(got.embed(x), student.embed(x))
        assert torch.equal(abvid.model.load_encoder(tmp_path / "ckpt.pt", "cpu", "ema").embed(x), ema.embed(x))
    write_checkpoint(tmp_path / "student_only.pt", teacher=False)
    assert isinstance(abvid.model.load_encoder(tmp_path / "student_only.pt", which="student"), torch.nn.Module)


def test_export_cli_reproduces_checkpoint_embeddings(tmp_path, capsys):
    from abvid.tools.cli import main
    _, ema = write_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 0
    assert "ema encoder" in capsys.readouterr().out
    x = frames(4)
    with torch.no_grad():
        a = load_encoder(out).embed(x)
        b = load_encoder(tmp_path / "ckpt.pt").embed(x)
    assert torch.equal(a, b) and torch.equal(a, ema.embed(x))
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "s.safetensors"),
                 "--which", "student"]) == 0
    assert main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "x.pt")]) == 2


def test_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(EncoderFileError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(EncoderFileError, match="junk.pt"):
        load_encoder(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(EncoderFileError, match="not an abvid checkpoint"):
        load_encoder(tmp_path / "other.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(EncoderFileError, match="abvid export"):
        load_encoder(tmp_path / "foreign.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any class outside torch's allow-list: weights_only=True must refuse to build it
    ckpt = {"model": {}, "encoder_kwargs": dict(TINY), "x": argparse.Namespace(a=1)}
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(EncoderFileError, match="evil.pt"):
        load_encoder(tmp_path / "evil.pt")


def test_checkpoint_without_ema_falls_back_to_the_student_and_says_so(tmp_path, capsys):
    student, _ = write_checkpoint(tmp_path / "student_only.pt", teacher=False)
    with pytest.warns(UserWarning, match="no EMA .teacher. encoder.*using the student"):
        enc = load_encoder(tmp_path / "student_only.pt")          # which="ema", the default
    assert enc.encoder_source == "student"
    with torch.no_grad():
        assert torch.equal(enc.embed(frames()), student.embed(frames()))
    from abvid.tools.cli import main
    with pytest.warns(UserWarning, match="using the student"):
        assert main(["export", str(tmp_path / "student_only.pt"), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert "student encoder" in capsys.readouterr().out
    torch.save({"model": {"teacher_encoder.x": torch.zeros(1)}, "encoder_kwargs": dict(TINY)}, tmp_path / "t.pt")
    with pytest.raises(EncoderFileError, match="--which ema"):
        load_encoder(tmp_path / "t.pt", which="student")


def test_a_folder_or_random_bytes_is_a_usage_error_naming_it(tmp_path):
    from abvid.pipeline.errors import UsageError
    run = tmp_path / "run"
    write_checkpoint((run / "checkpoints").mkdir(parents=True) or run / "checkpoints" / "ckpt-00000010.pt")
    with pytest.raises(UsageError, match=r"run is a folder.*newest checkpoint there is .*ckpt-00000010.pt"):
        load_encoder(run)
    (tmp_path / "rand.pt").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(UsageError, match=r"rand.pt: cannot read as a training checkpoint"):
        load_encoder(tmp_path / "rand.pt")
    (tmp_path / "rand.safetensors").write_bytes((200).to_bytes(8, "little") + b"{" + bytes(range(250)))
    with pytest.raises(UsageError, match=r"rand.safetensors"):
        load_encoder(tmp_path / "rand.safetensors")


def test_format_versions_newer_older_and_legacy(tmp_path, monkeypatch):
    import abvid.model.io as io
    write_checkpoint(tmp_path / "new.pt", format_version=io.CHECKPOINT_FORMAT + 1)
    with pytest.raises(io.CheckpointFormatError, match="newer abvid.*upgrade abvid"):
        load_encoder(tmp_path / "new.pt")
    write_checkpoint(tmp_path / "cur.pt")
    monkeypatch.setattr(io, "OLDEST_READABLE_FORMAT", io.CHECKPOINT_FORMAT + 1)
    with pytest.raises(io.CheckpointFormatError, match="older than this abvid reads.*abvid export"):
        load_encoder(tmp_path / "cur.pt")
    monkeypatch.undo()
    # format 0 (no version, kwargs without norm_eps): LayerNorm eps 1e-5, the features it always gave
    torch.manual_seed(3)
    old = build_encoder(**{**TINY, "norm_eps": 1e-5}).eval()
    legacy = {k: v for k, v in TINY.items() if k != "norm_eps"}
    torch.save({"model": {f"teacher_encoder.{k}": v for k, v in old.state_dict().items()}, "step": 1,
                "encoder_kwargs": legacy}, tmp_path / "legacy.pt")
    enc = load_encoder(tmp_path / "legacy.pt")
    assert enc.norm.eps == 1e-5 and enc.encoder_kwargs["norm_eps"] == 1e-5
    with torch.no_grad():
        assert torch.equal(enc.embed(frames()), old.embed(frames()))
    torch.save(old.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(io.CheckpointFormatError, match="bare state dict.*model.init_from"):
        load_encoder(tmp_path / "bare.pt")


def timm_vit(kw: dict):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=kw["img_size"], patch_size=kw["patch_size"], embed_dim=kw["embed_dim"],
                             depth=kw["depth"], num_heads=kw["num_heads"], num_classes=0, global_pool="token").eval()


def test_timm_export_loads_strictly_and_gives_the_same_features(tmp_path, capsys):
    """Must-show: `abvid export --format timm` -> timm's VisionTransformer loads it strict, features equal to 1e-5."""
    from safetensors.torch import load_file

    from abvid.model.vit import IMAGENET_MEAN, IMAGENET_STD
    from abvid.tools.cli import main
    kw = {**TINY, "patch_size": 8, "depth": 3, "num_heads": 4}
    torch.manual_seed(0)
    enc = build_encoder(**kw).eval()
    with torch.no_grad():     # trained-looking weights: non-trivial norms and biases, not the init's
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_encoder(enc, kw, tmp_path / "enc.safetensors")
    out = tmp_path / "vit_timm.safetensors"
    assert main(["export", str(tmp_path / "enc.safetensors"), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4" in printed
    vit = timm_vit(kw)
    vit.load_state_dict(load_file(str(out)), strict=True)
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = enc.embed(x), vit((x - mean) / std)
        assert theirs.shape == ours.shape == (4, 64)
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
        x8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)   # uint8 input: abvid normalises itself
        assert torch.allclose(vit((x8.float() / 255 - mean) / std), enc.embed(x8), atol=1e-5, rtol=0)


def test_init_weights_from_timm_and_shape_errors(tmp_path):
    from safetensors.torch import save_file

    from abvid.model.io import init_encoder_from
    kw = {**TINY, "patch_size": 8}
    torch.manual_seed(1)
    vit = timm_vit(kw)
    sd = vit.state_dict()
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 64), torch.zeros(10)     # a classifier is dropped
    torch.save(sd, tmp_path / "timm.pth")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    for f in ("timm.pth", "timm.safetensors"):
        enc = build_encoder(**kw).eval()
        assert "timm ViT" in init_encoder_from(enc, tmp_path / f)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(enc.embed(x), vit((x - enc.mean) / enc.std), atol=1e-5, rtol=0)
    bigger = build_encoder(**{**kw, "img_size": 48})          # another grid: the position embedding is resized
    assert "resized from 4x4 to 6x6" in init_encoder_from(bigger, tmp_path / "timm.pth")
    with torch.no_grad():                                     # as the 32 px encoder itself resizes for a 48 px input
        assert torch.allclose(bigger.pos_embed, enc.pos_embed_for(6, 6), atol=1e-6, rtol=0)
    wider = build_encoder(**{**kw, "embed_dim": 96, "num_heads": 4})
    with pytest.raises(EncoderFileError, match=r"shapes differ.*embed_dim=64, depth=2, patch_size=8.*model.embed_dim"):
        init_encoder_from(wider, tmp_path / "timm.pth")
    import argparse
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "pickle.pth")            # never unpickled
    with pytest.raises(EncoderFileError, match="pickle.pth"):
        init_encoder_from(build_encoder(**kw), tmp_path / "pickle.pth")


def test_timm_export_of_a_legacy_encoder_states_its_eps(tmp_path):
    from abvid.model.io import save_timm
    legacy = build_encoder(**{**TINY, "norm_eps": 1e-5})
    with pytest.warns(UserWarning, match=r"LayerNorm eps 1e-05.*norm_layer=partial\(nn.LayerNorm, eps=1e-05\)"):
        _, kw = save_timm(legacy, {**TINY, "norm_eps": 1e-5}, tmp_path / "t.safetensors")
    assert kw["norm_eps"] == 1e-5 and kw["global_pool"] == "token" and kw["num_classes"] == 0
