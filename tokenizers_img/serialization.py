"""save_pretrained / from_pretrained: a directory of config.json + model.safetensors, written atomically, loaded strictly."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
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


def write_marked_json(path: str | Path, obj: dict) -> None:
    """Write `obj` as JSON (JSON_MARK first) at a path the user named; a file argen did not write there is refused."""
    check_replaceable(path)
    atomic_write_bytes(path, (json.dumps({JSON_MARK[0]: JSON_MARK[1], **obj}, indent=2) + "\n").encode("utf-8"))


def write_marked_markdown(path: str | Path, text: str) -> None:
    """Write Markdown (MARKDOWN_MARK as its first line) at a path the user named; a file argen did not write is refused."""
    check_replaceable(path)
    atomic_write_bytes(path, f"{MARKDOWN_MARK}\n{text}".encode("utf-8"))


def remove_output(path: str | Path) -> None:
    """Delete an argen output (directory or file); anything else raises NotArgenOutputError and is kept.

    A directory is first renamed to a temporary name, so one killed half-way through deleting never stays behind as
    an unmarked remnant that could not be deleted again: the next atomic_write_dir (or clean_stale_temps) in the same
    folder finishes the job."""
    path = Path(path)
    check_replaceable(path)
    if path.is_dir() and not path.is_symlink():
        doomed = _temp_path(path, "tmp")
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then put tmp_dir at `target` in one atomic step; an old `target` is replaced.

    A crash at any point leaves either the old directory or the new one, never a half-written one, and a reader
    never finds `target` missing: on Linux the new and old directories swap names in one renameat2(RENAME_EXCHANGE),
    then the old one is deleted. Where that call is unavailable (other systems, glibc < 2.28, a filesystem without
    it) the old directory is first renamed aside, so for a moment `target` is absent; a crash in that moment leaves
    it as `.NAME.old-*`, which the next write into the same folder renames back.

    Before it becomes visible the new directory's files and subdirectories are fsynced, and their permissions are
    what a plain open()/mkdir() would give under the umask; the parent is fsynced after the rename. Temporaries left
    in the parent by writers that were killed are removed first. The new directory holds OUTPUT_MARKER; an existing
    `target` that is not an argen output is refused, not replaced.
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent)
    tmp = _temp_path(target, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / OUTPUT_MARKER).write_text(json.dumps({JSON_MARK[0]: JSON_MARK[1], "kind": "directory"}))
        _settle(tmp)
        old = _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the new directory, or (once swapped) the old one
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name and a rename; the file and then its folder are fsynced. Its permissions
    are those open() gives under the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, "tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # a full disk names no file
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}", str(path)) from err
        raise
    _fsync_dir(path.parent)


# Temporaries are named `.NAME.tmp-HOST-PID-RANDOM` (being written) and `.NAME.old-HOST-PID-RANDOM` (an old NAME
# renamed aside); HOST is a hash of the host name, so a folder shared between machines is cleaned only by writers
# on the machine whose process ids the names hold.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_path(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # this process: another thread may be writing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(parent: str | Path) -> None:
    """Remove the temporaries that writers on this host left in `parent` when they died. An `.old` one whose NAME is
    missing (the writer died between the two renames of the fallback path) is renamed back instead, restoring the
    directory it replaced. Temporaries of live processes, this one included, are left alone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or m["host"] != _host_tag() or _alive(int(m["pid"])):
            continue
        original = Path(parent) / m["name"]
        try:
            if m["kind"] == "old" and not original.exists() and not original.is_symlink():
                os.rename(entry.path, original)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:  # best effort: another writer cleaned or restored it first
            pass


def _move_into_place(tmp: Path, target: Path) -> Path | None:
    """Rename `tmp` to `target`; return where the directory it replaced now is (to delete), or None if there was none."""
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
        return None
    if _rename_exchange(tmp, target):
        return tmp
    old = _temp_path(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    doomed = _temp_path(target, "tmp")  # no longer one to restore, should deleting it be cut short
    os.replace(old, doomed)
    return doomed


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system or the filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _umask() -> int:
    try:  # Linux reports it without changing it; os.umask() can only read it by setting it, racing other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _settle(root: Path) -> None:
    """Give everything under `root` the permissions open()/mkdir() give under the umask (safetensors writes 0600,
    a copy keeps its source's), then fsync it bottom-up: files, then the directories holding them."""
    mask = _umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            os.chmod(file, (0o777 if os.stat(file).st_mode & 0o111 else 0o666) & ~mask)
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(folder, 0o777 & ~mask)
        _fsync_dir(folder)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot sync a directory
            raise
    finally:
        os.close(fd)


def read_json_object(file: str | Path) -> dict:
    """The JSON object in `file`; a file that is unreadable, not UTF-8, not JSON or not an object raises ValueError
    (or OSError) naming it."""
    file = Path(file)
    try:
        body = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}): the file is damaged.") from None
    except (json.JSONDecodeError, RecursionError) as err:
        reason = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise ValueError(f"{file} is not valid JSON ({reason}): the file is damaged or was edited by hand.") from None
    if not isinstance(body, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(body).__name__}: the file is damaged.")
    return body


def path_inside(root: str | Path, relative: object, *, named_in: str | Path) -> Path:
    """`root / relative` for a path a manifest (`named_in`) gives; one that is not a relative path staying inside
    `root` (absolute, with .., or through a symlink out) raises ValueError, so a manifest cannot load files from
    elsewhere."""
    root = Path(root)
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ValueError(f"{named_in} names the path {relative!r}: parts must be relative paths inside {root}.")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{named_in} names {relative!r}, which leads outside {root} (a symlink): refusing to load it.")
    return path


def read_pretrained_config(path: str | Path) -> dict:
    """Read a pretrained directory's config.json; raises FileNotFoundError naming the missing file."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {str(path)!r} is not a saved model directory (expected {CONFIG_NAME} + {WEIGHTS_NAME}).")
    return read_json_object(cfg_path)


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


def content_hash(path: str | Path, *, only: tuple[str, ...] | None = None) -> str:
    """The one hash of a saved thing: SHA-256 of a file's bytes, or of a directory's files (each relative path, then
    its bytes, in sorted order; OUTPUT_MARKER files left out, as they say who wrote the directory, not what it is).
    `only` limits a directory to those files, which must exist."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir() and only is not None:
        files = [path / name for name in sorted(only)]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != OUTPUT_MARKER)
    else:
        raise FileNotFoundError(f"{path} not found: nothing to hash.")
    digest = hashlib.sha256()
    for file in files:
        if file != path:  # a directory's file: its place in the directory is part of what it is
            digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pretrained_hash(path: str | Path) -> str:
    """`content_hash` of a saved model directory's config.json and model.safetensors (other files beside them do not
    change it): identifies one exact model."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (Path(path) / name).is_file():
            raise FileNotFoundError(f"{Path(path) / name} not found: {str(path)!r} is not a saved model directory.")
    return content_hash(path, only=(CONFIG_NAME, WEIGHTS_NAME))
