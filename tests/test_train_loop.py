"""Tests for the training loop: exact resume (in-process and kill -9), accumulation, LR schedule and its change on resume,
EMA, guards, metrics.json. Multi-process runs: tests/test_distributed.py."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_toy_script import ToyData, ToyTask, toy_config

import argen.train.checkpoint as ckpt_mod
import argen.train.loop as loop_mod
from argen.train.checkpoint import latest_checkpoint, load_checkpoint
from argen.train.ema import EMA
from argen.train.loop import LRSchedule, NonFiniteLossError, ResumeMismatchError, lr_factor, train

SCRIPT = Path(__file__).with_name("train_toy_script.py")
REPO = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


class StopAt(ToyTask):
    def __init__(self, stop_at: int, **kw) -> None:
        super().__init__(**kw)
        self.stop_at = stop_at

    def training_step(self, batch, *, modules, step):
        if step == self.stop_at:
            raise Interrupted
        return super().training_step(batch, modules=modules, step=step)


def final_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    """Weights, EMA and optimizer state of the latest checkpoint, flattened by name."""
    path = latest_checkpoint(out_dir)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(path.glob("optimizer.*.pt")):
        for i, s in torch.load(f, weights_only=True)["state"].items():
            out.update({f"{f.stem}/{i}/{k}": v for k, v in s.items()})
    return out


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        ok = torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
        assert ok, f"{k}: max diff {(a[k].float() - b[k].float()).abs().max().item()}"


def csv_steps(out_dir: Path) -> list[int]:
    with open(out_dir / "logs" / "metrics.csv", newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted toy run (two optimizers, disc starting at step 2, EMA, grad_accum 2, RNG noise)."""
    out = tmp_path_factory.mktemp("ref")
    result = train(ToyTask(noise=True), ToyData(), toy_config(out), task_config={"toy": 1})
    assert result.step == 10 and (result.artifacts_dir / "gen.safetensors").is_file()
    assert csv_steps(out) == [2, 4, 6, 8, 10]
    return final_tensors(out)


def test_lr_schedule_warmup_peak_end():
    kw = dict(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(4, **kw) == pytest.approx(0.5)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr_factor(100, **kw) == pytest.approx(0.1)
    assert all(lr_factor(s, **kw) >= lr_factor(s + 1, **kw) for s in range(10, 100))
    assert lr_factor(70, **{**kw, "schedule": "constant"}) == 1.0


def test_ema_math_and_swap():
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA({"m": m}, decay=0.75)
    with torch.no_grad():
        m.weight.fill_(5.0)
    ema.update()
    assert torch.allclose(ema.shadow["m"]["weight"], torch.full((1, 2), 0.75 * 1 + 0.25 * 5))
    with ema.swapped():
        assert torch.allclose(m.weight, torch.full((1, 2), 2.0))
    assert torch.equal(m.weight, torch.full((1, 2), 5.0))


def test_two_optimizers_each_update_only_their_params(tmp_path):
    task = ToyTask(disc_start=0)
    gen0, disc0 = [{k: v.clone() for k, v in m.state_dict().items()} for m in (task.gen, task.disc)]
    cfg = toy_config(tmp_path, max_steps=1, grad_accum=1, warmup_steps=0, lr_schedule="constant", grad_clip=None,
                     ema_decay=None)
    train(task, ToyData(), cfg)

    # Reference: one AdamW step per module with the gradient of ITS loss only, on the same (first) batch.
    ref = ToyTask(disc_start=0)
    ref.gen.load_state_dict(gen0), ref.disc.load_state_dict(disc0)
    from argen.train.batches import ShardedBatchSampler
    idx = next(iter(ShardedBatchSampler(64, seed=0, epoch=0, micro_batch=8, num_micro=8, num_processes=1, process_index=0)))
    data = ToyData()
    batch = {"x": data.x[idx], "y": data.y[idx]}
    out = ref.training_step(batch, modules=ref.modules(), step=0)
    for spec, module in zip(ref.optimizers(), (ref.gen, ref.disc)):
        params = list(module.parameters())
        grads = torch.autograd.grad(out.losses[spec.name], params, retain_graph=True)
        for p, g in zip(params, grads):
            p.grad = g
        decay = [p for p in params if p.ndim >= 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.config.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=spec.config.lr, betas=spec.config.betas, eps=spec.config.eps)
        opt.step()
    for a, b in ((task.gen, ref.gen), (task.disc, ref.disc)):
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-7), k


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_is_bf16_only_where_native(tmp_path, monkeypatch, native):
    monkeypatch.setattr(loop_mod, "native_bf16", lambda: native)
    seen = []

    class Probe(ToyTask):
        def training_step(self, batch, *, modules, step):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return super().training_step(batch, modules=modules, step=step)

    train(Probe(), ToyData(), toy_config(tmp_path, max_steps=2, mixed_precision="auto"))
    assert seen and all(s == native for s in seen)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["mixed_precision"], metrics["compiled"]) == ("bf16" if native else "no", False)


class DeterminismProbe(ToyTask):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def training_step(self, batch, *, modules, step):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().training_step(batch, modules=modules, step=step)


def test_compile_auto_trains_eagerly_where_inductor_cannot_and_true_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop_mod, "compile_problem", lambda device: "no C++ compiler here")
    task, eager = DeterminismProbe(), ToyTask()
    train(task, ToyData(), toy_config(tmp_path / "auto", max_steps=3, compile="auto"))
    assert "train.compile auto -> eager: no C++ compiler here" in capsys.readouterr().out
    assert task.seen and not any(task.seen)  # eager: torch's deterministic algorithms stay as they were
    train(eager, ToyData(), toy_config(tmp_path / "eager", max_steps=3))
    assert_equal(final_tensors(tmp_path / "auto"), final_tensors(tmp_path / "eager"))
    with pytest.raises(RuntimeError, match="train.compile=true: no C.. compiler here. Or set train.compile to false or auto"):
        train(ToyTask(), ToyData(), toy_config(tmp_path / "true", max_steps=3, compile=True))


def test_a_task_can_keep_its_modules_eager_under_a_given_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop_mod, "compile_problem", lambda device: None)  # as where Inductor compiles
    asked = []

    class Refuses(DeterminismProbe):
        def compile_problem(self, device, mixed_precision):
            asked.append((device.type, mixed_precision))
            return "wrong gradients here" if mixed_precision == "bf16" else None

    task = Refuses()
    train(task, ToyData(), toy_config(tmp_path / "auto", max_steps=2, compile="auto", mixed_precision="bf16"))
    assert asked == [("cpu", "bf16")] and task.seen and not any(task.seen)
    assert "train.compile auto -> eager: wrong gradients here" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="train.compile=true: wrong gradients here"):
        train(Refuses(), ToyData(), toy_config(tmp_path / "true", max_steps=2, compile=True, mixed_precision="bf16"))


@pytest.mark.slow
def test_a_compiled_run_is_deterministic_and_learns_what_eager_learns(tmp_path):
    from argen.host import compile_problem

    if compile_problem("cpu") is not None:
        pytest.skip(compile_problem("cpu"))
    runs = {}
    for name, compile in (("a", True), ("b", True), ("eager", False)):
        task = DeterminismProbe()
        train(task, ToyData(), toy_config(tmp_path / name, max_steps=4, compile=compile))
        assert task.seen and all(s == compile for s in task.seen)  # on while a compiled run trains, restored after
        assert json.loads((tmp_path / name / "metrics.json").read_text())["compiled"] is compile
        runs[name] = final_tensors(tmp_path / name)
    assert not torch.are_deterministic_algorithms_enabled()
    assert_equal(runs["a"], runs["b"])
    assert_equal(runs["a"], runs["eager"], exact=False)


def test_optimizer_with_zero_loss_does_not_step(tmp_path):
    task = ToyTask(disc_start=100)
    disc0 = {k: v.clone() for k, v in task.disc.state_dict().items()}
    train(task, ToyData(), toy_config(tmp_path, max_steps=3))
    assert all(torch.equal(v, task.disc.state_dict()[k]) for k, v in disc0.items())
    state = torch.load(latest_checkpoint(tmp_path) / "optimizer.discriminator.pt", weights_only=True)
    assert state["state"] == {}


def test_resume_after_interruption_is_bit_exact(tmp_path, reference):
    with pytest.raises(Interrupted):
        train(StopAt(6, noise=True), ToyData(), toy_config(tmp_path), task_config={"toy": 1})
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert csv_steps(tmp_path) == [2, 4, 6]
    result = train(ToyTask(noise=True), ToyData(), toy_config(tmp_path), resume=True, task_config={"toy": 1})
    assert result.step == 10
    assert_equal(final_tensors(tmp_path), reference)
    assert csv_steps(tmp_path) == [2, 4, 6, 8, 10]  # rows past the resumed step were dropped, none duplicated
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".argen-output", "latest", "step_00000008", "step_00000010"]


def test_resume_after_kill_9_is_bit_exact(tmp_path, reference):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--noise", "--step-sleep", "0.25"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while latest_checkpoint(tmp_path) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert latest_checkpoint(tmp_path).name == "step_00000004"  # killed before the end
    result = train(ToyTask(noise=True), ToyData(), toy_config(tmp_path), resume=True, task_config={"toy": 1})
    assert result.step == 10
    assert_equal(final_tensors(tmp_path), reference)


def test_crash_during_checkpoint_write_keeps_previous_latest(tmp_path, reference, monkeypatch):
    real = ckpt_mod.save_model
    calls = {"n": 0}

    def flaky_save_model(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 2 modules per checkpoint: the first module of the second checkpoint
            raise OSError("disk full (simulated)")
        real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_model", flaky_save_model)
    with pytest.raises(OSError, match="simulated"):
        train(ToyTask(noise=True), ToyData(), toy_config(tmp_path), task_config={"toy": 1})
    monkeypatch.setattr(ckpt_mod, "save_model", real)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".argen-output", "latest", "step_00000004"]  # no temp dir, no partial step_8
    task = ToyTask()
    loaded = load_checkpoint(latest_checkpoint(tmp_path), modules=task.modules())
    assert loaded.state["step"] == 4
    train(ToyTask(noise=True), ToyData(), toy_config(tmp_path), resume=True, task_config={"toy": 1})
    assert_equal(final_tensors(tmp_path), reference)


def test_nan_guard_names_step_and_part_and_keeps_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, save_every=2)
    with pytest.raises(NonFiniteLossError) as err:
        train(ToyTask(nan_at=3), ToyData(), cfg)
    msg = str(err.value)
    assert "step 3" in msg and "generator" in msg and "rec = nan  <-- non-finite" in msg
    assert "step_00000002" in msg and "lower learning rate" in msg and "grad_clip" in msg
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".argen-output", "latest", "step_00000002"]
    task = ToyTask()
    loaded = load_checkpoint(latest_checkpoint(tmp_path), modules=task.modules())
    assert loaded.state["step"] == 2 and all(torch.isfinite(p).all() for p in task.gen.parameters())


def test_nan_skip_policy_counts_then_raises(tmp_path):
    cfg = toy_config(tmp_path, nan_policy="skip", nan_max_consecutive=3, save_every=0)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps up to step 5"):
        train(ToyTask(nan_at=3), ToyData(), cfg)


def test_grad_accumulation_matches_full_batch(tmp_path):
    a = train(ToyTask(), ToyData(), toy_config(tmp_path / "a", grad_accum=1, max_steps=6))
    b = train(ToyTask(), ToyData(), toy_config(tmp_path / "b", grad_accum=2, max_steps=6))
    assert_equal(final_tensors(a.out_dir), final_tensors(b.out_dir), exact=False)


def test_resume_config_mismatch_and_fresh_start(tmp_path, capsys):
    train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=2))
    with pytest.raises(ResumeMismatchError, match=r"batch_size \(checkpoint: 8, now: 16\)"):
        train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=2, batch_size=16), resume=True)
    with pytest.raises(ResumeMismatchError, match=r"task.toy"):
        train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=2), resume=True, task_config={"toy": 2})
    with pytest.raises(FileExistsError, match="resume=True"):
        train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by num_processes 1 x grad_accum 4 = 4"):
        train(ToyTask(), ToyData(), toy_config(tmp_path / "x", batch_size=6, grad_accum=4))
    fresh = train(ToyTask(), ToyData(), toy_config(tmp_path / "new", max_steps=2), resume=True)
    assert fresh.step == 2 and "has no checkpoint; starting from step 0" in capsys.readouterr().out


def test_lr_schedule_replanned_from_the_resumed_step():
    plain = LRSchedule(10, "cosine", 0.1, [(0, 100)])
    longer = LRSchedule(10, "cosine", 0.1, [(0, 100), (40, 200)])
    assert [longer.factor(s) for s in range(41)] == [plain.factor(s) for s in range(41)]  # nothing changes before
    assert longer.factor(200) == pytest.approx(0.1) and longer.factor(120) == pytest.approx(
        0.1 + (plain.factor(40) - 0.1) * 0.5 * (1 + math.cos(math.pi * 80 / 160)))  # half-way from step 40 to 200
    assert all(longer.factor(s) >= longer.factor(s + 1) for s in range(10, 200))
    finished = LRSchedule(10, "cosine", 0.1, [(0, 100), (100, 150)])
    assert all(finished.factor(s) == pytest.approx(0.1) for s in range(100, 151))  # an extended finished run stays low
    in_warmup = LRSchedule(10, "cosine", 0.1, [(0, 100), (5, 200)])
    assert all(in_warmup.factor(s) == pytest.approx(lr_factor(s, max_steps=200, warmup_steps=10, schedule="cosine",
                                                              min_lr_ratio=0.1)) for s in range(200))
    assert LRSchedule(0, "constant", 0.1, [(0, 10), (5, 50)]).factor(30) == 1.0


def _lrs(out: Path) -> dict[int, float]:
    with open(out / "logs" / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r["lr/generator"]) for r in csv.DictReader(fh)}


def test_resume_with_more_steps_continues_the_lr_without_a_jump(tmp_path, capsys):
    cfg = dict(log_every=1, save_every=4)
    with pytest.raises(Interrupted):
        train(StopAt(6), ToyData(), toy_config(tmp_path, **cfg), task_config={"toy": 1})
    result = train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=16, **cfg), resume=True, task_config={"toy": 1})
    assert result.step == 16 and "at step 4 (max_steps 10 -> 16)" in capsys.readouterr().out
    schedule = LRSchedule(2, "cosine", 0.1, [(0, 10), (4, 16)])
    lrs = _lrs(tmp_path)  # row k holds the LR step k - 1 used
    assert sorted(lrs) == list(range(1, 17))
    for step in range(16):
        assert lrs[step + 1] == pytest.approx(1e-2 * schedule.factor(step), rel=1e-5), step
    state = json.loads((tmp_path / "checkpoints" / "step_00000016" / "state.json").read_text())
    assert state["lr_plans"] == [[0, 10], [4, 16]]
    with pytest.raises(ResumeMismatchError, match="max_steps .*checkpoint at step 16, now: 12"):
        train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=12, **cfg), resume=True, task_config={"toy": 1})


def test_metrics_json_is_written_once_with_the_tasks_report(tmp_path):
    class Reporting(ToyTask):
        def describe(self) -> str:
            return "toy: 2 modules"

        def report(self, result) -> dict:
            return {"gen": str(result.artifacts_dir / "gen.safetensors")}

    result = train(Reporting(), ToyData(), toy_config(tmp_path, max_steps=2), task_config={"toy": 1})
    report = json.loads(result.metrics_json.read_text())
    assert report["step"] == 2 and report["eval"] == result.eval and report["gen"].endswith("final/gen.safetensors")
    assert set(report) >= {"logs", "artifacts", "train_seconds"}
