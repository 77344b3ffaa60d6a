"""save_pretrained / from_pretrained: self-describing, atomic, strict."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tokenizers_img.serialization import PretrainedMixin, atomic_write_dir


@dataclass
class TinyConfig:
    width: int = 4


class Tiny(PretrainedMixin, nn.Module):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.width, config.width)
        self.register_buffer("count", torch.zeros(()))


class Other(Tiny):
    pass


def test_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyConfig(width=6))
    model.count.fill_(3)
    model.save_pretrained(tmp_path / "m")
    loaded = Tiny.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_loading_another_class_names_both(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="holds a Tiny checkpoint, not a Other"):
        Other.from_pretrained(tmp_path / "m")


def test_mismatched_weights_raise(tmp_path):
    Tiny(TinyConfig(width=4)).save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"width": 4', '"width": 5'))
    with pytest.raises(Exception, match="width|size|shape"):
        Tiny.from_pretrained(tmp_path / "m")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Tiny.from_pretrained(tmp_path)
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        Tiny.from_pretrained(tmp_path / "m")


def test_unknown_config_key_in_checkpoint_is_rejected(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"width"', '"depth": 2, "width"'))
    with pytest.raises(ValueError, match="unknown config key 'depth'"):
        Tiny.from_pretrained(tmp_path / "m")


def test_atomic_write_keeps_old_directory_on_crash(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(tmp_path / "m", crash)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
