"""save_pretrained / from_pretrained: self-describing, atomic, strict."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import tokenizers_img.serialization as serialization
from tokenizers_img.serialization import OUTPUT_MARKER, PretrainedMixin, atomic_write_bytes, atomic_write_dir


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


def test_content_hash_names_the_files_and_a_model_hash_only_its_config_and_weights(tmp_path):
    import hashlib

    torch.manual_seed(0)
    Tiny(TinyConfig(width=6)).save_pretrained(tmp_path / "m")
    m = tmp_path / "m"
    files = ("config.json", "model.safetensors")
    expected = hashlib.sha256(b"".join(name.encode() + (m / name).read_bytes() for name in files)).hexdigest()
    assert serialization.pretrained_hash(m) == expected
    assert serialization.content_hash(m / "config.json") == hashlib.sha256((m / "config.json").read_bytes()).hexdigest()
    whole = serialization.content_hash(m)
    (m / "notes.txt").write_text("mine")  # a file beside the model changes the directory's hash, not the model's
    assert serialization.pretrained_hash(m) == expected and serialization.content_hash(m) != whole
    (m / "notes.txt").unlink()
    (m / OUTPUT_MARKER).write_text("{}")  # who wrote it is not what it is
    assert serialization.content_hash(m) == whole


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


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.skipif(serialization._renameat2() is None, reason="renameat2(RENAME_EXCHANGE) is not available here")
def test_replacing_a_directory_never_leaves_it_missing(tmp_path):
    target = tmp_path / "m"
    Tiny(TinyConfig()).save_pretrained(target)
    seen = {"checks": 0, "missing": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen["checks"] += 1
            seen["missing"] += not target.exists()

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for i in range(200):
            atomic_write_dir(target, lambda tmp, i=i: (tmp / "config.json").write_text(json.dumps({"i": i})))
    finally:
        stop.set()
        reader.join()
    assert seen["checks"] > 200 and seen["missing"] == 0
    assert json.loads((target / "config.json").read_text()) == {"i": 199}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_two_rename_fallback_replaces_and_a_killed_one_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "_rename_exchange", lambda a, b: False)
    Tiny(TinyConfig(width=3)).save_pretrained(tmp_path / "m")
    Tiny(TinyConfig(width=5)).save_pretrained(tmp_path / "m")
    assert Tiny.from_pretrained(tmp_path / "m").config.width == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # A writer killed between its two renames: the old `m` renamed aside, the new one still under its temp name.
    pid, host = _dead_pid(), serialization._host_tag()
    (tmp_path / "m").rename(tmp_path / f".m.old-{host}-{pid}-0123abcd")
    Tiny(TinyConfig(width=7)).save_pretrained(tmp_path / f".m.tmp-{host}-{pid}-4567cdef")
    Tiny(TinyConfig()).save_pretrained(tmp_path / "other")  # any write into the folder repairs it
    assert Tiny.from_pretrained(tmp_path / "m").config.width == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]


def test_temporaries_of_live_writers_are_kept(tmp_path):
    host = serialization._host_tag()
    live = tmp_path / f".m.tmp-{host}-{os.getppid()}-0badf00d"
    live.mkdir()
    dead = tmp_path / f".m.tmp-{host}-{_dead_pid()}-deadbeef"
    dead.mkdir()
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
        atomic_write_dir(tmp_path / "d", lambda tmp: ((tmp / "sub").mkdir(mode=0o700), (tmp / "sub" / "f").write_text("x")))
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old)
    for path in [tmp_path / "m", tmp_path / "d", *(tmp_path / "m").rglob("*"), *(tmp_path / "d").rglob("*"),
                 tmp_path / "b.json"]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, (path, oct(path.stat().st_mode))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_everything_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    log: list[str] = []
    real_fsync, real_move = os.fsync, serialization._move_into_place

    def fsync(fd: int) -> None:
        log.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def move(tmp: Path, target: Path):
        log.append("rename")
        return real_move(tmp, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(serialization, "_move_into_place", move)

    def write(tmp: Path) -> None:
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "sub" / "deeper" / "w.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")

    atomic_write_dir(tmp_path / "m", write)
    rename = log.index("rename")
    inside = {"/".join(Path(p).relative_to(tmp_path).parts[1:]) for p in log[:rename]}  # paths inside the temp dir
    assert {"", "sub", "sub/deeper", "sub/deeper/w.bin", "config.json", OUTPUT_MARKER} <= inside, log
    assert str(tmp_path) in log[rename + 1:]


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert list(tmp_path.iterdir()) == []
