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

# Every directory argen writes holds this file, and every file it writes at a path the user names carries one of
# FILE_MARKS near its start (a PNG text chunk, a JSON key, a Markdown comment). argen replaces or deletes only
# what carries them, so pointing an output at a folder of one's own never loses it.
OUTPUT_MARKER = ".argen-output"
PNG_MARK = ("Software", "argen")
JSON_MARK = ("written_by", "argen")
MARKDOWN_MARK = "<!-- written by argen -->"
FILE_MARKS = (f"{PNG_MARK[0]}\0{PNG_MARK[1]}".encode(), f'"{JSON_MARK[0]}": "{JSON_MARK[1]}"'.encode(),
              MARKDOWN_MARK.encode())

M = TypeVar("M", bound="PretrainedMixin")


class NotArgenOutputError(FileExistsError):
    """A path argen was asked to replace or delete holds something argen did not write; it is left alone."""


def is_argen_output(path: str | Path) -> bool:
    """Whether `path` is a directory holding OUTPUT_MARKER, or a file carrying one of FILE_MARKS."""
    path = Path(path)
    if path.is_dir():
        return (path / OUTPUT_MARKER).is_file()
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return any(mark in head for mark in FILE_MARKS)


def check_replaceable(path: str | Path) -> None:
    """Raise NotArgenOutputError unless `path` is absent, an empty directory, or an argen output (see OUTPUT_MARKER)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if is_argen_output(path):
        return
    what = "directory" if path.is_dir() else "file"
    hint = (f"it has no {OUTPUT_MARKER} marker" if path.is_dir() else "it does not carry argen's mark")
    raise NotArgenOutputError(
        f"{path} is a {what} that argen did not write ({hint}); refusing to replace or delete it. "
        "Choose another output path, or move it away yourself.")


def claim_output_dir(path: str | Path, *, kind: str) -> Path:
    """Make `path` an argen output directory of `kind` (e.g. "run", "code-shard") and return it.

    It is created when absent; an existing one must be empty or already an argen output (NotArgenOutputError
    otherwise), so files argen writes into it never replace a user's own.
    """
    path = Path(path)
    check_replaceable(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OUTPUT_MARKER).is_file():
        atomic_write_bytes(path / OUTPUT_MARKER, json.dumps({JSON_MARK[0]: JSON_MARK[1], "kind": kind}).encode())
    return path


def remove_output(path: str | Path) -> None:
    """Delete an argen output (directory or file); anything else raises NotArgenOutputError and is kept."""
    path = Path(path)
    check_replaceable(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `target` in one rename; an old `target` is replaced.

    A crash at any point leaves either the old directory or the new one, never a half-written one. The new
    directory holds OUTPUT_MARKER; an existing `target` that is not an argen output is refused, not replaced.
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        (tmp / OUTPUT_MARKER).write_text(json.dumps({JSON_MARK[0]: JSON_MARK[1], "kind": "directory"}))
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
