"""Checkpoints survive crashes, kills and damage: every file is hash-checked, resume falls back to the newest checkpoint
that verifies, temporaries of killed saves are cleaned, a moved run resumes, and nothing restarts from step 0 over a
run's checkpoints unless asked to."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_crash_points import CrashPoints
from safetensors.torch import load_file
from test_train_loop import Interrupted, StopAt
from train_toy_script import ToyData, ToyTask, toy_config

from argen.cli import main as cli_main
from argen.train.checkpoint import (
    BadCheckpointError,
    find_resume_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    step_dirs,
    verify_checkpoint,
)
from argen.train.loop import train
from tokenizers_img.config import to_dict
from tokenizers_img.serialization import OUTPUT_MARKER, NotArgenOutputError, _host_tag

CRASH_SCRIPT = Path(__file__).with_name("checkpoint_crash_points.py")
REPO = Path(__file__).resolve().parents[1]
FILES = ["module.gen.safetensors", "module.disc.safetensors", "ema.gen.safetensors", "optimizer.generator.pt",
         "optimizer.discriminator.pt", "scheduler.generator.pt", "scheduler.discriminator.pt", "rng.pt", "state.json"]
TASK_CONFIG = {"toy": 1}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimizer state of one checkpoint directory, flattened by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(path.glob("optimizer.*.pt")):
        for i, s in torch.load(f, weights_only=True)["state"].items():
            out.update({f"{f.stem}/{i}/{k}": v for k, v in s.items()})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def resume(out: Path, **overrides) -> Path:
    """Resume the toy run in `out` to the end; return its final checkpoint."""
    result = train(ToyTask(noise=True), ToyData(), toy_config(out, **overrides), resume=True, task_config=TASK_CONFIG)
    assert result.step == 10
    return result.checkpoint


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def csv_steps(out: Path) -> list[int]:
    with open(out / "logs" / "metrics.csv", newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def damage(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(data)
    else:
        file.unlink()


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final checkpoint of an uninterrupted toy run (saves at steps 4, 8, 10)."""
    out = tmp_path_factory.mktemp("ref")
    result = train(ToyTask(noise=True), ToyData(), toy_config(out), task_config=TASK_CONFIG)
    return tensors(result.checkpoint)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A toy run stopped at step 9: checkpoints step_4 and step_8, `latest` -> step_8."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Interrupted):
        train(StopAt(9, noise=True), ToyData(), toy_config(out), task_config=TASK_CONFIG)
    assert [p.name for p in step_dirs(out)] == ["step_00000004", "step_00000008"]
    return out


@pytest.fixture
def run(tmp_path, interrupted) -> Path:
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


def test_state_records_every_file_and_verify_passes(run):
    state = verify_checkpoint(run / "checkpoints" / "step_00000008")
    assert sorted(state["files"]) == sorted(f for f in FILES if f != "state.json")
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in state["files"].values())


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_latest_is_named_and_resume_falls_back(run, reference, capsys, name, how):
    damage(run / "checkpoints" / "step_00000008" / name, how)
    with pytest.raises(BadCheckpointError, match=rf"step_00000008/{name}"):
        load_checkpoint(run / "checkpoints" / "step_00000008", modules=ToyTask().modules())
    final = resume(run)
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4 (skipped step_00000008: " in out
    assert f"step_00000008/{name}" in out and out.count("resumed from") == 1
    assert_same(tensors(final), reference)
    assert csv_steps(run) == [2, 4, 6, 8, 10]
    assert [p.name for p in step_dirs(run)] == ["step_00000008", "step_00000010"]  # the damaged one was rewritten


def test_altered_state_json_fails_its_checksum(run, reference):
    state_file = run / "checkpoints" / "step_00000008" / "state.json"
    state_file.write_text(state_file.read_text().replace('"step": 8', '"step": 9'))
    with pytest.raises(BadCheckpointError, match="state.json does not match its state_sha256"):
        verify_checkpoint(state_file.parent)
    assert_same(tensors(resume(run)), reference)


@pytest.mark.parametrize("name", FILES)
def test_no_checkpoint_verifies_is_an_error_naming_the_file(tmp_path, name):
    with pytest.raises(Interrupted):
        train(StopAt(6, noise=True), ToyData(), toy_config(tmp_path), task_config=TASK_CONFIG)
    damage(tmp_path / "checkpoints" / "step_00000004" / name, "flip")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(BadCheckpointError, match=rf"cannot resume .*no checkpoint verifies .*step_00000004/{name}"):
        resume(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing restarted from step 0
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train(ToyTask(noise=True), ToyData(), toy_config(tmp_path), task_config=TASK_CONFIG)


@pytest.mark.parametrize("pointer", [None, b"\xff\x00garbage", b"step_00000099"])
def test_missing_or_wrong_latest_pointer(run, reference, capsys, pointer):
    latest = run / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer)
    assert latest_checkpoint(run).name == "step_00000008"
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(step_00000004, step_00000008\)"):
        train(ToyTask(noise=True), ToyData(), toy_config(run), task_config=TASK_CONFIG)
    assert_same(tensors(resume(run)), reference)
    reason = {None: "is missing", b"\xff\x00garbage": "holds no checkpoint name", b"step_00000099": "names step_00000099"}[pointer]
    assert f"at step 8 ({latest} {reason}" in capsys.readouterr().out
    assert latest.read_text() == "step_00000010"


def test_newer_complete_checkpoint_wins_over_a_lagging_pointer(run, reference):
    (run / "checkpoints" / "latest").write_text("step_00000004")  # as if killed between the rename and the pointer
    assert find_resume_checkpoint(run).path.name == "step_00000008"
    assert_same(tensors(resume(run)), reference)


def test_crash_at_every_stage_of_a_save_resumes_exactly(tmp_path, reference, monkeypatch):
    """Raise at each of the 26 events of the second save (step 8), then resume; the result equals an uninterrupted run."""
    counter = CrashPoints(save=2, at=None, crash=lambda label: None)
    with monkeypatch.context() as m:
        counter.install(m.setattr)
        train(ToyTask(noise=True), ToyData(), toy_config(tmp_path / "count"), task_config=TASK_CONFIG)
    assert len(counter.events) == 26, counter.events
    for at, label in enumerate(counter.events):
        out = tmp_path / f"crash_{at}"

        def crash(label: str) -> None:
            raise Interrupted(label)

        with monkeypatch.context() as m:
            CrashPoints(save=2, at=at, crash=crash).install(m.setattr)
            with pytest.raises(Interrupted, match=re.escape(label)):
                train(ToyTask(noise=True), ToyData(), toy_config(out), task_config=TASK_CONFIG)
        assert not temporaries(out / "checkpoints"), label
        visible = at >= counter.events.index("after serialization._move_into_place #1")
        assert find_resume_checkpoint(out).path.name == ("step_00000008" if visible else "step_00000004"), label
        assert_same(tensors(resume(out)), reference)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
            OUTPUT_MARKER, "latest", "step_00000008", "step_00000010"], label
        assert csv_steps(out) == [2, 4, 6, 8, 10], label


def test_stale_temporaries_are_cleaned_and_live_ones_kept(run, reference):
    root = run / "checkpoints"
    dead, live, host = dead_pid(), os.getppid(), _host_tag()
    stale_dir = root / f".step_00000012.tmp-{host}-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "module.gen.safetensors").write_bytes(b"half")
    (root / f".latest.tmp-{host}-{dead}-89abcdef").write_bytes(b"step_")
    live_dir = root / f".step_00000012.tmp-{host}-{live}-0badf00d"  # another writer, still running
    live_dir.mkdir()
    other_host = root / f".step_00000012.tmp-00000000-{dead}-12345678"  # a process id of another machine
    other_host.mkdir()
    unrelated = root / ".notes.tmp-mine"
    unrelated.write_text("not ours")
    assert_same(tensors(resume(run)), reference)
    assert temporaries(root) == sorted([live_dir.name, other_host.name, unrelated.name])


def test_moved_and_copied_runs_resume(tmp_path, reference, capsys):
    """The task config of a real task embeds the TrainConfig (out_dir included) and paths inside the run."""
    def task_config(out: Path, **overrides) -> dict:
        train_section = to_dict(toy_config(out, **overrides))
        return {"train": train_section, "data": {"train": [str(out / "codes" / "train")]}, "toy": 1}

    first = tmp_path / "first"
    with pytest.raises(Interrupted):
        train(StopAt(6, noise=True), ToyData(), toy_config(first), task_config=task_config(first))
    copied, moved = tmp_path / "elsewhere" / "copied", tmp_path / "moved"
    shutil.copytree(first, copied)
    first.rename(moved)
    for out in (copied, moved):
        result = train(ToyTask(noise=True), ToyData(), toy_config(out, log_every=1), resume=True,
                       task_config=task_config(out, log_every=1))  # log_every may change on resume, here too
        assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in capsys.readouterr().out
        assert_same(tensors(result.checkpoint), reference)
        assert json.loads((out / "task_config.json").read_text()) == task_config(out, log_every=1)
    with pytest.raises(ValueError, match=r"task.data.train"):  # a path outside the run still has to match
        train(ToyTask(noise=True), ToyData(), toy_config(copied), resume=True,
              task_config={**task_config(copied), "data": {"train": [str(tmp_path / "other")]}})


def test_overwrite_deletes_only_argen_outputs_and_starts_fresh(tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(ToyTask(noise=True), ToyData(), toy_config(out, max_steps=6), task_config=TASK_CONFIG)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exclude each other"):
        train(ToyTask(), ToyData(), toy_config(out), resume=True, overwrite=True)
    (out / "logs" / OUTPUT_MARKER).unlink()  # logs/ now looks like a folder of the user's own
    with pytest.raises(NotArgenOutputError, match="logs"):
        train(ToyTask(), ToyData(), toy_config(out), overwrite=True)
    assert [p.name for p in step_dirs(out)] == ["step_00000004", "step_00000006"]  # nothing was deleted
    (out / "logs" / OUTPUT_MARKER).write_text("{}")
    result = train(ToyTask(noise=True), ToyData(), toy_config(out), overwrite=True, task_config=TASK_CONFIG)
    assert "overwrite: deleted checkpoints/, logs/, final/" in capsys.readouterr().out
    assert_same(tensors(result.checkpoint), reference)
    assert [p.name for p in step_dirs(out)] == ["step_00000008", "step_00000010"]
    assert csv_steps(out) == [2, 4, 6, 8, 10] and (out / "notes.txt").read_text() == "mine"


def test_a_users_folder_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(NotArgenOutputError, match="argen did not write"):
        train(ToyTask(), ToyData(), toy_config(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_cli_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["train", "gpt", "x.yaml", "--resume", "--overwrite"])
    assert err.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        train(ToyTask(), ToyData(), toy_config(tmp_path / "run", max_steps=4))
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_dir() or path.parent.name.startswith("step_") or path.parent.name in ("checkpoints", "logs"):
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(path.stat().st_mode) == want, path


@pytest.mark.slow
@pytest.mark.parametrize("save", [2, 3])
def test_sigkill_at_every_stage_of_a_save_resumes_exactly(tmp_path, reference, save):
    """SIGKILL the toy run at each event of its second (step 8) or third (final, step 10, with pruning) save, in a
    subprocess, so temp dirs stay behind as after a real kill; resume cleans them and ends equal to a straight run."""
    events = {2: 26, 3: 28}[save]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for at in range(events):
        out = tmp_path / f"kill_{at}"
        proc = subprocess.run([sys.executable, str(CRASH_SCRIPT), "--out", str(out), "--save", str(save), "--at", str(at)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert_same(tensors(resume(out)), reference)
        assert not temporaries(out / "checkpoints"), at
        assert csv_steps(out) == [2, 4, 6, 8, 10]


@pytest.mark.slow
def test_sigkill_at_random_moments_with_a_save_every_step(tmp_path, reference):
    """Kill a run that saves after every step at seeded random moments (each after it made progress), resume each
    time, and end equal to a straight run; no kill ever leaves a damaged checkpoint to skip."""
    import random
    import time

    rng = random.Random(0)
    out = tmp_path / "run"
    script = ("import sys; sys.path.insert(0, 'tests'); from train_toy_script import *; "
              f"train(ToyTask(noise=True, step_sleep=0.03), ToyData(), toy_config({str(out)!r}, save_every=1, "
              f"keep_last=1), resume=True, task_config={TASK_CONFIG!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    while kills < 20:
        done = [p.name for p in step_dirs(out)]
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while [p.name for p in step_dirs(out)] == done and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.06))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        assert find_resume_checkpoint(out).skipped == []
    assert kills >= 3
    assert_same(tensors(resume(out, save_every=1, keep_last=1)), reference)


@pytest.mark.slow
def test_two_processes_fall_back_together_and_resume_exactly(tmp_path):
    """Under torchrun the main process picks the checkpoint and says so once; both processes load it."""
    import socket

    def launch(*extra: str) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "train_toy_script.py"), "--out", str(tmp_path), "--max-steps", "8",
               "--grad-accum", "2", *extra]
        run = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run

    launch()
    straight = tensors(tmp_path / "checkpoints" / "step_00000008")
    (tmp_path / "checkpoints" / "latest").unlink()
    damage(tmp_path / "checkpoints" / "step_00000008" / "rng.pt", "flip")
    out = launch("--resume").stdout
    assert out.count("resumed from") == 1 and "at step 4" in out and "step_00000008/rng.pt does not match" in out
    assert_same(tensors(tmp_path / "checkpoints" / "step_00000008"), straight)
