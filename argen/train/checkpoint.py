"""Training checkpoints: one atomic, hash-verified directory per step (safetensors + weights-only tensors + JSON), a
`latest` pointer, resume from the newest checkpoint that verifies, RNG capture."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from argen.saved import SavedDirError
from tokenizers_img.serialization import (
    NotArgenOutputError,
    atomic_write_bytes,
    atomic_write_dir,
    claim_output_dir,
    remove_output,
)

FORMAT_VERSION = 2  # 2: state.json records every file's size and sha256, and a checksum of its own content
STATE_NAME = "state.json"  # written last inside the temp dir
STATE_CHECKSUM = "state_sha256"  # sha256 of state.json's other keys as compact sorted JSON
LATEST_NAME = "latest"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_STEP_DIR = re.compile(r"step_(\d{8,})")


class BadCheckpointError(SavedDirError):
    """A checkpoint that cannot be used: a file missing, truncated, altered or unreadable, or an unknown format.
    The message names the file."""


@dataclass
class LoadedCheckpoint:
    """What a checkpoint holds besides the weights loaded in place: its directory, JSON state, the optimizer and
    LR-schedule states (by optimizer name, whole: as a 1-process run saves them), EMA, RNG, scaler."""

    path: Path
    state: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    schedulers: dict[str, dict[str, Any]]
    ema: dict[str, dict[str, Tensor]]
    rng: list[dict[str, Any]]
    scaler: dict[str, Any] | None


@dataclass
class ResumePoint:
    """What `find_resume_checkpoint` chose: the newest checkpoint that verifies and its state (None: none does), the
    newer ones it passed over with the reason for each, and what was wrong with the `latest` pointer (if anything)."""

    path: Path | None
    state: dict[str, Any] | None
    skipped: list[str]
    pointer_note: str | None

    def notes(self) -> str:
        """The pointer note and the skipped checkpoints as one line ("" when there is nothing to say)."""
        return "; ".join(([self.pointer_note] if self.pointer_note else []) + self.skipped)


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def check_name(kind: str, name: str) -> None:
    """Module and optimizer names become file names; allow only [A-Za-z0-9_.-]."""
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must match [A-Za-z0-9_.-]+ (it names checkpoint files).")


def step_dirs(out_dir: str | Path) -> list[Path]:
    """The `checkpoints/step_*` directories of a run, oldest first, whether complete or not."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _pointer_target(root: Path) -> Path | None:
    """The step directory `root/latest` names, or None when the pointer is missing or holds no step name."""
    try:
        name = (root / LATEST_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if _STEP_DIR.fullmatch(name) else None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint directory: the one `checkpoints/latest` names, or (that pointer missing or naming no
    complete checkpoint) the newest `step_*` directory holding state.json; None when there is none. Nothing is
    verified here: `find_resume_checkpoint` picks the newest checkpoint that verifies."""
    named = _pointer_target(checkpoints_dir(out_dir))
    if named is not None and (named / STATE_NAME).is_file():
        return named
    complete = [p for p in step_dirs(out_dir) if (p / STATE_NAME).is_file()]
    return complete[-1] if complete else None


def find_resume_checkpoint(out_dir: str | Path) -> ResumePoint:
    """The newest `step_*` checkpoint that passes `verify_checkpoint`, whatever `latest` says (a checkpoint is only
    ever written complete, so a verified newer one is the right one even where the pointer lags behind it)."""
    root = checkpoints_dir(out_dir)
    dirs = step_dirs(out_dir)
    pointer, named = root / LATEST_NAME, _pointer_target(root)
    note = None
    if named is None and (dirs or pointer.exists()):
        note = f"{pointer} {'holds no checkpoint name' if pointer.exists() else 'is missing'}"
    elif named is not None and named not in dirs:
        note = f"{pointer} names {named.name}, which does not exist"
    skipped = []
    for path in reversed(dirs):
        try:
            return ResumePoint(path=path, state=verify_checkpoint(path), skipped=skipped, pointer_note=note)
        except BadCheckpointError as err:
            skipped.append(f"skipped {path.name}: {err}")
    return ResumePoint(path=None, state=None, skipped=skipped, pointer_note=note)


def _sha256(file: Path) -> str:
    with open(file, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _state_checksum(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint directory against the size and sha256 its state.json records; return the state.

    Reads every byte and loads nothing. Raises BadCheckpointError naming the first file that is missing, truncated,
    altered or unreadable; state.json itself is covered by a checksum of its own content.
    """
    path = Path(path)
    file = path / STATE_NAME
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise BadCheckpointError(f"{file} is missing: {path.name} is not a complete checkpoint.") from None
    except (OSError, ValueError, RecursionError) as err:
        raise BadCheckpointError(f"{file} is unreadable ({type(err).__name__}: {err}).") from None
    if not isinstance(state, dict):
        raise BadCheckpointError(f"{file} holds a JSON {type(state).__name__}, not a checkpoint state object.")
    checksum = state.pop(STATE_CHECKSUM, None)
    if checksum is None and state.get("format_version") == 1:
        raise BadCheckpointError(f"{file} is checkpoint format 1, which records no file hashes to verify; this code "
                                 f"resumes format {FORMAT_VERSION}.")
    if checksum != _state_checksum(state):
        raise BadCheckpointError(f"{file} does not match its {STATE_CHECKSUM}: it was altered or damaged.")
    if state.get("format_version") != FORMAT_VERSION:
        raise BadCheckpointError(f"{file} has checkpoint format {state.get('format_version')}, this code reads "
                                 f"{FORMAT_VERSION}.")
    for name, record in state["files"].items():
        f = path / name
        if not f.is_file():
            raise BadCheckpointError(f"{f} is missing.")
        size = f.stat().st_size
        if size != record["bytes"]:
            raise BadCheckpointError(f"{f} has {size} bytes where the checkpoint recorded {record['bytes']} "
                                     "(truncated or damaged).")
        if _sha256(f) != record["sha256"]:
            raise BadCheckpointError(f"{f} does not match its recorded sha256: it was altered or damaged.")
    return state


def save_checkpoint(
    out_dir: str | Path,
    *,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, dict[str, Any]],
    schedulers: dict[str, dict[str, Any]],
    ema: dict[str, dict[str, Tensor]],
    rng: list[dict[str, Any]],
    scaler: dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `checkpoints/step_XXXXXXXX` atomically, then point `latest` at it, then prune to `keep_last`.

    modules: whole (unsharded) modules; optimizers, schedulers: their state dicts by optimizer name; ema: whole
    shadows by module name. state.json, written last, records every other file's size and sha256. Call on the main
    process only. A crash
    anywhere leaves the previous checkpoints intact; temporaries a killed save left are removed by the next one.
    """
    root = claim_output_dir(checkpoints_dir(out_dir), kind="checkpoints")
    name = f"step_{step:08d}"

    def write(tmp: Path) -> None:
        for mod_name, m in modules.items():
            save_model(m, str(tmp / f"module.{mod_name}.safetensors"))
        for mod_name, shadow in ema.items():
            save_file({k: v.contiguous() for k, v in shadow.items()}, str(tmp / f"ema.{mod_name}.safetensors"))
        for opt_name, opt_state in optimizers.items():
            torch.save(opt_state, tmp / f"optimizer.{opt_name}.pt")
            torch.save(schedulers[opt_name], tmp / f"scheduler.{opt_name}.pt")
        torch.save(rng, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler, tmp / "scaler.pt")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
        body = json.loads(json.dumps({"format_version": FORMAT_VERSION, "step": step, **state, "files": files}))
        (tmp / STATE_NAME).write_text(json.dumps({**body, STATE_CHECKSUM: _state_checksum(body)}, indent=2))

    path = atomic_write_dir(root / name, write)
    atomic_write_bytes(root / LATEST_NAME, name.encode())
    _prune(out_dir, keep=max(keep_last, 1), current=path)
    return path


def _prune(out_dir: str | Path, *, keep: int, current: Path) -> None:
    """Delete all but the newest `keep` checkpoints up to `current`, and every one past it: those are the damaged
    ones a resume fell back over, from steps this run has now written again or will."""
    dirs = step_dirs(out_dir)
    at = dirs.index(current)
    for p in dirs[:max(at + 1 - keep, 0)] + dirs[at + 1:]:
        try:
            remove_output(p)
        except NotArgenOutputError as err:
            print(f"note: not pruned: {err}")


def _required(path: Path, name: str, what: str) -> Path:
    file = path / name
    if not file.is_file():
        raise BadCheckpointError(f"{file} not found: the checkpoint has no {what}.")
    return file


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, nn.Module],
    optimizer_names: tuple[str, ...] | list[str] = (),
    device: torch.device | str = "cpu",
) -> LoadedCheckpoint:
    """Verify the checkpoint (`verify_checkpoint`), load the weights of `modules` (whole, unsharded ones) in place,
    strictly, and return the rest, with the state of each named optimizer and its LR schedule. Nothing is unpickled."""
    path = Path(path)
    state = verify_checkpoint(path)
    device = torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device)  # multi-process CPU runs give "cpu:0", which loaders refuse
    for name, m in modules.items():
        f = _required(path, f"module.{name}.safetensors", f"weights for module '{name}'")
        missing, unexpected = load_model(m, str(f), strict=False, device=where)
        if missing or unexpected:
            raise ValueError(f"{f} does not match module '{name}': missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}.")
    optimizers, schedulers = {}, {}
    for name in optimizer_names:
        f = _required(path, f"optimizer.{name}.pt", f"state for optimizer '{name}'")
        optimizers[name] = torch.load(f, map_location=where, weights_only=True)
        f = _required(path, f"scheduler.{name}.pt", f"LR schedule for optimizer '{name}'")
        schedulers[name] = torch.load(f, weights_only=True)
    ema = {f.name[len("ema."):-len(".safetensors")]: load_file(str(f), device=where) for f in path.glob("ema.*.safetensors")}
    rng = torch.load(_required(path, "rng.pt", "RNG state"), weights_only=True)
    scaler = torch.load(path / "scaler.pt", weights_only=True) if (path / "scaler.pt").is_file() else None
    return LoadedCheckpoint(path=path, state=state, optimizers=optimizers, schedulers=schedulers, ema=ema, rng=rng,
                            scaler=scaler)


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
