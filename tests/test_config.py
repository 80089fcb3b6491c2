from dataclasses import dataclass, field
from typing import Literal

import pytest

from abvid.pipeline.config import ConfigError, load_config, merge, parse_overrides, save_config, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: Literal["dino", "simclr"] = "dino"
    sizes: tuple[int, ...] = (224, 96)
    scale: tuple[float, float] = (0.3, 1.0)


@dataclass(frozen=True)
class Outer:
    train: Inner = field(default_factory=Inner)
    shards: str | None = None
    flag: bool = False


def test_overrides_merge_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  steps: 3\n")
    cfg = load_config(Outer, p, ["train.steps=7", "flag=true", "shards=/x/{0..3}.tar"])
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7 and cfg.flag is True
    assert cfg.shards == "/x/{0..3}.tar"
    assert cfg.train.sizes == (224, 96)


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"train\.stesp.*Did you mean 'steps'"):
        merge(Outer(), parse_overrides(["train.stesp=3"]))


def test_wrong_types_rejected():
    with pytest.raises(ConfigError, match="train.steps"):
        merge(Outer(), {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="train.name"):
        merge(Outer(), {"train": {"name": "byol"}})
    with pytest.raises(ConfigError, match="flag"):
        merge(Outer(), {"flag": 1})


def test_int_accepted_for_float_and_list_for_tuple():
    cfg = merge(Outer(), {"train": {"lr": 1, "sizes": [64, 32]}})
    assert isinstance(cfg.train.lr, float) and cfg.train.sizes == (64, 32)


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (yaml.safe_load) reads "3e-4" as a string; users write it in files and --set alike.
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 3e-4\n")
    assert load_config(Outer, p).train.lr == 3e-4
    assert merge(Outer(), parse_overrides(["train.lr=1E-3"])).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr"):
        merge(Outer(), parse_overrides(["train.lr=3e-4x"]))


def test_fixed_length_tuple():
    cfg = merge(Outer(), parse_overrides(["train.scale=[0.1, 1]"]))
    assert cfg.train.scale == (0.1, 1.0) and all(isinstance(v, float) for v in cfg.train.scale)
    with pytest.raises(ConfigError, match="2 items"):
        merge(Outer(), {"train": {"scale": [0.1]}})


@dataclass(frozen=True)
class Checked:
    lo: float = 0.0
    hi: float = 1.0

    def __post_init__(self):
        if self.lo > self.hi:
            raise ValueError(f"need lo <= hi, got {self.lo} > {self.hi}")


@dataclass(frozen=True)
class WithChecked:
    range: Checked = field(default_factory=Checked)


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match=r"range: need lo <= hi"):
        merge(WithChecked(), parse_overrides(["range.lo=2"]))


def test_roundtrip_save(tmp_path):
    cfg = merge(Outer(), {"train": {"steps": 5}})
    save_config(cfg, tmp_path / "r.yaml")
    assert load_config(Outer, tmp_path / "r.yaml") == cfg
    assert to_dict(cfg)["train"]["sizes"] == [224, 96]


def test_yaml_must_be_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, p)
