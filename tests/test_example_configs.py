"""examples/configs/*.yaml: every config loads, validates, and states its command and expected outcome."""
from __future__ import annotations

from pathlib import Path

import pytest

from abvid.pipeline.config import load_config
from abvid.train.config import PretrainConfig, check_sizes, validate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(PretrainConfig, path, ["data.shards=/data/shards"])
    validate(cfg.train)
    assert check_sizes(cfg) == []
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "abvid pretrain" in header or "abvid.tools.cli pretrain" in header
    assert "Expect" in header
    if "multinode" in path.stem:
        assert "torchrun" in header and ("throughput" in header.lower() or "views/s" in header)


def test_large_configs_shard():
    assert {p.stem for p in CONFIGS} >= {"vit_b16_multinode", "vit_l16_multinode"}
    big = load_config(PretrainConfig, CONFIGS[[p.stem for p in CONFIGS].index("vit_l16_multinode")])
    assert (big.model.arch, big.train.strategy) == ("vit_large", "fsdp")
