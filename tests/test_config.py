"""Typed config loading: YAML + overrides into dataclasses, strict keys and types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tokenizers_img.config import ConfigError, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Model:
    width: int = 64
    ch_mult: tuple[int, ...] = (1, 2)
    kind: Literal["vq", "fsq"] = "vq"
    path: str | None = None

    @property
    def depth(self) -> int:  # derived, never typed
        return len(self.ch_mult)

    def __post_init__(self) -> None:
        if self.width % 8:
            raise ValueError(f"width={self.width} must be a multiple of 8")


@dataclass
class Experiment:
    name: str = "x"
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)


def test_yaml_and_overrides_parse_into_nested_dataclasses(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nmodel:\n  width: 32\n  ch_mult: [1, 2, 4]\n")
    cfg = load_config(p, Experiment, ["optim.lr=3e-4", "model.kind=fsq", "model.path=/data"])
    assert cfg.model.width == 32 and cfg.model.ch_mult == (1, 2, 4) and cfg.model.depth == 3
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.kind == "fsq" and cfg.model.path == "/data"
    assert cfg.optim.betas == (0.9, 0.99)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config({"model": {"width": 16}}, Experiment, ["optim.betas=[0.5, 0.9]"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml", Experiment) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.5, 0.9]


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({"modle": {}}, [], "unknown config key 'modle'. Did you mean 'model'?"),
        ({"model": {"widht": 8}}, [], "unknown config key 'model.widht'. Did you mean 'model.width'?"),
        ({}, ["optim.lrr=1"], "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
        ({"model": {"width": "big"}}, [], "'model.width' must be an int, got 'big'"),
        ({"model": {"width": 8.5}}, [], "'model.width' must be an int"),
        ({"optim": {"lr": True}}, [], "'optim.lr' must be a float"),
        ({"model": {"kind": "lfq"}}, [], "choose one of 'vq', 'fsq'"),
        ({"optim": {"betas": [0.9]}}, [], "'optim.betas' must have 2 items"),
        ({"model": {"width": 12}}, [], "width=12 must be a multiple of 8"),
        ({}, ["optim.lr"], "must look like key.path=value"),
        ({}, ["name.sub=1"], "'name' is not a section"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(data, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(data, Experiment, overrides)
    assert needle in str(err.value)


def test_unknown_key_error_lists_valid_choices():
    with pytest.raises(ConfigError, match=r"Valid keys here: ch_mult, kind, path, width"):
        from_dict(Model, {"zzz": 1})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", Experiment)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, Experiment)


def test_every_shipped_prior_config_names_its_kind():
    """`argen train prior` dispatches on the top-level `kind`; a shipped prior config without it cannot be run."""
    import yaml

    from argen.configs import ROOT
    from argen.unclip.priors import PRIORS

    configs = sorted([*(ROOT / "unclip").glob("*prior*.yaml"), *(Path(__file__).resolve().parent / "configs").glob("*prior*.yaml")])
    assert len(configs) >= 4  # the shipped presets and the tests' tiny ones
    for path in configs:
        kind = yaml.safe_load(path.read_text()).get("kind")
        assert kind in PRIORS and (kind == "ar") == ("_ar" in path.stem), f"{path.name}: kind {kind!r}"
    assert {PRIORS[k].preset for k in PRIORS} <= {p.stem for p in configs}  # every kind's preset ships


def test_an_unquoted_no_is_the_string_no_where_a_choice_expects_it(tmp_path):
    from argen.train.loop import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")  # YAML 1.1 reads this as False
    assert load_config(path, TrainConfig).mixed_precision == "no"
    assert load_config({}, TrainConfig, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config({}, TrainConfig, ["mixed_precision=bf16"]).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="'mixed_precision' = True is not valid"):
        load_config({}, TrainConfig, ["mixed_precision=yes"])
