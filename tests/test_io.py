"""Tests of model/io.py and `abvid export`: safetensors round trip, checkpoint reading, EMA vs student."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abvid.model import build_encoder
from abvid.model.io import EncoderFileError, load_encoder, read_encoder_file, save_encoder

TINY = {"arch": "vit_tiny", "patch_size": 16, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder(**TINY).eval()


def write_checkpoint(path: Path, *, teacher: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A training checkpoint in the INTERFACES.md layout: student + EMA teacher + a head, in one 'model' dict."""
    student, ema = tiny_encoder(1), tiny_encoder(2)
    model = {f"student_encoder.{k}": v for k, v in student.state_dict().items()}
    if teacher:
        model.update({f"teacher_encoder.{k}": v for k, v in ema.state_dict().items()})
    model["head.weight"] = torch.randn(8, 64)
    ckpt = {"model": model, "optimizer": {}, "scaler": None, "step": 10, "epoch": 0, "loader_state": None,
            "rng": {}, "config": {"model": {"arch": "vit_tiny"}}, "encoder_kwargs": dict(TINY)}
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
    write_checkpoint(tmp_path / "student_only.pt", teacher=False)
    with pytest.warns(UserWarning, match="no EMA .teacher. encoder.*using the student"):   # plain SimCLR: no teacher
        fallback = load_encoder(tmp_path / "student_only.pt")
    student = load_encoder(tmp_path / "student_only.pt", which="student")
    assert all(torch.equal(a, b) for a, b in zip(fallback.state_dict().values(), student.state_dict().values()))
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
