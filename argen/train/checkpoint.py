"""Training checkpoints: one atomic directory per step (safetensors + weights-only tensors + JSON), a `latest` pointer, RNG capture."""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir

FORMAT_VERSION = 1
STATE_NAME = "state.json"  # written last inside the temp dir; its presence marks a complete checkpoint
LATEST_NAME = "latest"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass
class LoadedCheckpoint:
    """What a checkpoint holds besides the tensors loaded in place: its directory, JSON state, EMA, RNG, scaler."""

    path: Path
    state: dict[str, Any]
    ema: dict[str, dict[str, Tensor]]
    rng: list[dict[str, Any]]
    scaler: dict[str, Any] | None


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def check_name(kind: str, name: str) -> None:
    """Module and optimizer names become file names; allow only [A-Za-z0-9_.-]."""
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must match [A-Za-z0-9_.-]+ (it names checkpoint files).")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory `checkpoints/latest` points at, or None when there is no complete checkpoint."""
    root = checkpoints_dir(out_dir)
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint (no {STATE_NAME}).")
    return path


def save_checkpoint(
    out_dir: str | Path,
    *,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    ema: dict[str, dict[str, Tensor]],
    rng: list[dict[str, Any]],
    scaler: dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `checkpoints/step_XXXXXXXX` atomically, then point `latest` at it, then prune to `keep_last`.

    Call on the main process only. A crash anywhere leaves the previous `latest` and its directory intact.
    """
    root = checkpoints_dir(out_dir)
    name = f"step_{step:08d}"

    def write(tmp: Path) -> None:
        for mod_name, m in modules.items():
            save_model(m, str(tmp / f"module.{mod_name}.safetensors"))
        for mod_name, shadow in ema.items():
            save_file({k: v.contiguous() for k, v in shadow.items()}, str(tmp / f"ema.{mod_name}.safetensors"))
        for opt_name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"optimizer.{opt_name}.pt")
            torch.save(schedulers[opt_name].state_dict(), tmp / f"scheduler.{opt_name}.pt")
        torch.save(rng, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler, tmp / "scaler.pt")
        body = {"format_version": FORMAT_VERSION, "step": step, **state}
        (tmp / STATE_NAME).write_text(json.dumps(body, indent=2))

    path = atomic_write_dir(root / name, write)
    atomic_write_bytes(root / LATEST_NAME, name.encode())
    _prune(root, keep=max(keep_last, 1), current=name)
    return path


def _prune(root: Path, *, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file())
    for p in done[:-keep]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    device: torch.device | str = "cpu",
) -> LoadedCheckpoint:
    """Load module, optimizer and scheduler state in place (strictly); return the rest. Nothing is unpickled."""
    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format {state.get('format_version')}, this code reads {FORMAT_VERSION}.")
    for name, m in modules.items():
        f = path / f"module.{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: the checkpoint has no weights for module '{name}'.")
        missing, unexpected = load_model(m, str(f), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{f} does not match module '{name}': missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}.")
    for name, opt in optimizers.items():
        opt.load_state_dict(torch.load(path / f"optimizer.{name}.pt", map_location=device, weights_only=True))
        schedulers[name].load_state_dict(torch.load(path / f"scheduler.{name}.pt", weights_only=True))
    ema = {f.name[len("ema."):-len(".safetensors")]: load_file(str(f), device=str(device)) for f in path.glob("ema.*.safetensors")}
    rng = torch.load(path / "rng.pt", weights_only=True)
    scaler = torch.load(path / "scaler.pt", weights_only=True) if (path / "scaler.pt").is_file() else None
    return LoadedCheckpoint(path=path, state=state, ema=ema, rng=rng, scaler=scaler)


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and current CUDA device) RNG states as weights-only-loadable data."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
