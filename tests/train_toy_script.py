"""A toy two-optimizer task for the training-loop tests; also a script for multi-process (DDP, FSDP2) and kill -9 runs."""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn
from torch.nn import functional as F

from argen.train.loop import OptimizerConfig, OptimizerSpec, StepOutput, TrainConfig, train
from argen.train.processes import end_processes, exit_code_after_processes
from argen.train.sharding import full_state_dict


class ToyData(torch.utils.data.Dataset):
    """Deterministic regression pairs: x ~ N(0, 1)^4, y = sin(W x); items carry their index."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.sin(self.x @ torch.randn(4, 4, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class ToyTask:
    """A generator MLP and a discriminator that starts at `disc_start`; `noise` draws from the global torch RNG.

    detached_adv: the generator's adversarial term runs a whole, detached copy of the discriminator (as the VQGAN
    loss does), instead of the prepared discriminator itself (which relies on the loop's `inputs=`); the gradients
    are the same. record: a file prefix; each process appends "step index index ..." per micro-batch to PREFIX.RANK.
    unused: the generator gets a trainable parameter that no loss uses.
    """

    def __init__(self, *, disc_start: int = 2, noise: bool = False, step_sleep: float = 0.0, nan_at: int | None = None,
                 detached_adv: bool = False, record: str | None = None, unused: bool = False) -> None:
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        if unused:  # a trainable parameter no loss uses
            self.gen.register_parameter("spare", nn.Parameter(torch.zeros(3)))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.disc_copy = copy.deepcopy(self.disc) if detached_adv else None
        self.disc_start, self.noise, self.step_sleep, self.nan_at = disc_start, noise, step_sleep, nan_at
        self.record = record

    def modules(self) -> dict[str, nn.Module]:
        return {"gen": self.gen, "disc": self.disc}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("generator", ["gen"], OptimizerConfig(lr=1e-2, weight_decay=0.01)),
                OptimizerSpec("discriminator", ["disc"], OptimizerConfig(lr=5e-3))]

    def ema_modules(self) -> list[str]:
        return ["gen"]

    def training_step(self, batch, *, modules, step):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.record is not None:
            with open(f"{self.record}.{os.environ.get('RANK', '0')}", "a") as fh:
                fh.write(" ".join(map(str, [step, *batch["index"].tolist()])) + "\n")
        x, y = batch["x"], batch["y"]
        if self.noise:
            x = x + 0.05 * torch.randn_like(x)
        pred = modules["gen"](x)
        rec = F.mse_loss(pred, y)
        if self.nan_at is not None and step >= self.nan_at:
            rec = rec * float("nan")
        if step < self.disc_start:
            return StepOutput(losses={"generator": rec, "discriminator": torch.zeros(())}, logs={"rec": rec})
        if self.disc_copy is not None:
            disc = getattr(modules["disc"], "module", modules["disc"])  # inside a DDP wrapper
            whole = {k: v.to(pred.device) for k, v in full_state_dict(disc).items()}  # detached
            adv = -torch.func.functional_call(self.disc_copy.to(pred.device), whole, (pred,)).mean()
        else:
            adv = -modules["disc"](pred).mean()  # reaches disc params, which the generator loss must not update
        d_loss = F.softplus(-modules["disc"](y)).mean() + F.softplus(modules["disc"](pred.detach())).mean()
        return StepOutput(losses={"generator": rec + 0.1 * adv, "discriminator": d_loss}, logs={"rec": rec, "adv": adv})

    def evaluate(self, *, modules, accelerator, step):
        data = ToyData(16)
        return {"mse": F.mse_loss(modules["gen"](data.x.to(accelerator.device)), data.y.to(accelerator.device)).item()}

    def save_artifacts(self, *, modules, out_dir: Path) -> None:
        save_model(modules["gen"], str(out_dir / "gen.safetensors"))


class Stopped(Exception):
    """Raised by StopAtStep on every process at the same step, as an interruption."""


class StopAtStep(ToyTask):
    def __init__(self, stop_at: int, **kw) -> None:
        super().__init__(**kw)
        self.stop_at = stop_at

    def training_step(self, batch, *, modules, step):
        if step == self.stop_at:
            raise Stopped(f"stopped at step {step}")
        return super().training_step(batch, modules=modules, step=step)


def toy_config(out_dir: str | Path, **overrides) -> TrainConfig:
    """The config every toy run shares (tests override a few fields)."""
    base = dict(out_dir=str(out_dir), max_steps=10, batch_size=8, grad_accum=2, warmup_steps=2, ema_decay=0.9,
                save_every=4, log_every=2, keep_last=2)
    return TrainConfig(**{**base, **overrides})


def allow_fsdp_on_cpu() -> None:
    """accelerate turns FSDP on (from its config: ACCELERATE_USE_FSDP, FSDP_VERSION) only on GPUs and other
    accelerators; FSDP2 itself runs on CPU with gloo. For tests only: let accelerate take its FSDP2 path here."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--stop-at", type=int, default=None, help="raise Stopped at this step on every process")
    p.add_argument("--noise", action="store_true")
    p.add_argument("--detached-adv", action="store_true")
    p.add_argument("--record", default=None)
    p.add_argument("--unused", action="store_true", help="give the generator a parameter no loss uses")
    p.add_argument("--cpu-fsdp", action="store_true", help="let accelerate run its FSDP2 path on CPU (tests only)")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    if a.cpu_fsdp:
        allow_fsdp_on_cpu()
    cfg = toy_config(a.out, max_steps=a.max_steps, grad_accum=a.grad_accum, save_every=a.save_every)
    kw = dict(noise=a.noise, step_sleep=a.step_sleep, detached_adv=a.detached_adv, record=a.record, unused=a.unused)
    task = StopAtStep(a.stop_at, **kw) if a.stop_at is not None else ToyTask(**kw)
    try:
        train(task, ToyData(), cfg, resume=a.resume, task_config={"toy": 1})
    except Stopped as err:
        print(err)
    finally:
        end_processes()


if __name__ == "__main__":
    main()
    exit_code_after_processes(0)
