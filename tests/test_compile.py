"""train/compile.py: per-module compile keeps the losses, compiles a depth-independent number of graphs,
recompiles nothing in steady state; the cache dir. (Inductor end to end: tests/test_pretrain.py.)"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from abvid.model import ModelConfig
from abvid.tools.bench.train import random_batch
from abvid.train import compile as tcompile
from abvid.train.objectives import ObjectiveConfig, build_objective

OBJ = ObjectiveConfig(name="dino", num_prototypes=32, head_hidden_dim=64, head_bottleneck_dim=16, decoder_dim=32,
                      decoder_depth=1, decoder_heads=2)


def _objective(depth: int):
    torch.manual_seed(0)
    mcfg = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=depth, num_heads=2,
                       drop_path=0.2)                     # a distinct stochastic-depth rate per block
    return build_objective(OBJ, mcfg)


def _steps(obj, batch, n: int) -> list[float]:
    out = []
    for step in range(n):
        torch.manual_seed(step)
        loss, _ = obj.loss(batch, teacher_temp=0.04)
        loss.backward()
        obj.update_teacher(0.9)
        out.append(float(loss.detach()))
    return out


def _graphs_for_depth(depth: int) -> int:
    """Compile an objective of ``depth`` blocks per module (a counting backend), check it against eager over
    three steps, and return how many graphs were compiled."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    obj = _objective(depth)
    ref = copy.deepcopy(obj)
    done = tcompile.compile_modules(obj, backend=counting_backend)
    assert f"student_encoder.blocks.{depth - 1}" in done and "teacher_value" in done and "family.base_loss" in done
    batch = random_batch(3, 2, 32, 2, 16, "cpu")
    assert _steps(obj, batch, 1) == _steps(ref, batch, 1)         # same math, same random numbers
    n_graphs = len(graphs)
    assert _steps(obj, batch, 2) == _steps(ref, batch, 2)
    assert len(graphs) == n_graphs, "steady-state steps recompiled"
    assert obj.state_dict().keys() == ref.state_dict().keys()      # in-place compile: same checkpoint keys
    return n_graphs


@pytest.mark.slow
def test_module_compile_keeps_losses_and_shares_block_graphs():
    # Every block shares one block's graphs, so the count does not grow with depth. With the stochastic-depth
    # rate as a Python float (baked into each block's graph) it grew: 16 graphs at depth 4, 24 at depth 8.
    assert _graphs_for_depth(2) == _graphs_for_depth(5)


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert tcompile.set_cache_dir("") is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert tcompile.set_cache_dir(str(tmp_path / "c")) == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c")
    assert tcompile.set_cache_dir("") == tmp_path / "c"                          # "": whatever is there
    assert tcompile.set_cache_dir(str(tmp_path / "d")) == tmp_path / "d"         # the setting wins


def test_fsdp_with_step_compile_is_refused():
    from abvid.pipeline.config import ConfigError
    from abvid.train.config import TrainConfig, validate

    with pytest.raises(ConfigError, match="compile_scope=modules"):
        validate(TrainConfig(compile=True, compile_scope="step", strategy="fsdp"))
    validate(TrainConfig(compile=True, strategy="fsdp"))
