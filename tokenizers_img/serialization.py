"""save_pretrained / from_pretrained: a directory of config.json + model.safetensors, written atomically, loaded strictly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import safetensors.torch
import torch

from tokenizers_img.config import ConfigError, from_dict, to_dict

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `target` in one rename; an old `target` is replaced.

    A crash at any point leaves either the old directory or the new one, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # make the content durable before it becomes visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_pretrained_config(path: str | Path) -> dict:
    """Read a pretrained directory's config.json; raises FileNotFoundError naming the missing file."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {str(path)!r} is not a saved model directory (expected {CONFIG_NAME} + {WEIGHTS_NAME}).")
    return json.loads(cfg_path.read_text())


class PretrainedMixin:
    """Gives an nn.Module built from one dataclass config `self.config` a self-describing directory format.

    Subclasses set `config_class`. The saved config.json records the class name, so loading a directory
    written by another model class (say, a GPT checkpoint given where a VQ tokenizer is expected) fails
    with an error naming both.
    """

    config_class: type
    config: Any

    def save_pretrained(self, path: str | Path, *, extra: dict | None = None) -> Path:
        """Write `config.json` + `model.safetensors` to `path` atomically. `extra` adds metadata keys."""
        meta = {"_class_name": type(self).__name__, "_format_version": FORMAT_VERSION, **(extra or {})}
        body = {**meta, **to_dict(self.config)}

        def write(tmp: Path) -> None:
            (tmp / CONFIG_NAME).write_text(json.dumps(body, indent=2, sort_keys=False))
            safetensors.torch.save_model(self, str(tmp / WEIGHTS_NAME))

        return atomic_write_dir(path, write)

    @classmethod
    def config_from_pretrained(cls, path: str | Path):
        raw = read_pretrained_config(path)
        name = raw.get("_class_name")
        if name != cls.__name__:
            raise ValueError(
                f"{str(path)!r} holds a {name or 'unknown'} checkpoint, not a {cls.__name__}: "
                f"point at a directory saved by {cls.__name__}.save_pretrained."
            )
        body = {k: v for k, v in raw.items() if not k.startswith("_")}
        try:
            return from_dict(cls.config_class, body)
        except ConfigError as err:
            raise ValueError(f"{str(path)!r}/{CONFIG_NAME} does not match {cls.config_class.__name__}: {err}") from err

    @classmethod
    def from_pretrained(cls: type[M], path: str | Path, *, device: str | torch.device = "cpu") -> M:
        """Build the model from `path/config.json` and load `path/model.safetensors` strictly; returns it in eval mode."""
        cfg = cls.config_from_pretrained(path)
        weights = Path(path) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: the directory has a config but no weights.")
        model = cls(cfg)  # type: ignore[call-arg]
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(
                f"weights in {weights} do not match {cls.__name__}({cls.config_class.__name__}): "
                f"missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}. "
                "The checkpoint was written by a different architecture or version."
            )
        return model.to(device).eval()


def pretrained_hash(path: str | Path) -> str:
    """SHA-256 over a saved directory's config.json and model.safetensors: identifies one exact model."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = Path(path) / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: {str(path)!r} is not a saved model directory.")
        digest.update(name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
