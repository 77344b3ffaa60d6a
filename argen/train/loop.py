"""The one training loop: a Task's modules and optimizers trained on accelerate, with EMA, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from argen.train.checkpoint import (
    LATEST_NAME,
    BadCheckpointError,
    ResumePoint,
    capture_rng,
    check_name,
    checkpoints_dir,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    step_dirs,
)
from argen.train.ema import EMA
from argen.train.logging import MetricsCsv, tensorboard_writer
from tokenizers_img.config import save_config, to_dict
from tokenizers_img.serialization import (
    atomic_write_bytes,
    check_replaceable,
    claim_output_dir,
    clean_stale_temps,
    remove_output,
)

# TrainConfig keys that may change between a run and its resumption; any other change is an error.
RESUMABLE_CHANGES = ("out_dir", "log_every", "eval_every", "save_every", "keep_last", "num_workers", "compile")
_GRAD_BUCKET_NUMEL = 2**24  # gradients are all-reduced in flat buckets of at most this many elements


@dataclass
class OptimizerConfig:
    """AdamW settings. Weight decay applies to parameters with ndim >= 2 only (not to biases and norm gains)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainConfig:
    """How to train; model-independent. Steps count optimizer updates.

    `batch_size` is the GLOBAL batch per optimizer step = per-process batch * num_processes * grad_accum, so the
    same config gives the same data and (up to float reduction order) the same weights on 1 or N processes.
    The LR is `lr * lr_factor(step)`: linear warm-up over `warmup_steps`, then cosine to `min_lr_ratio * lr` at
    `max_steps` (or constant). `nan_policy="skip"` skips a step whose loss is non-finite and raises after
    `nan_max_consecutive` consecutive skips. `mixed_precision="auto"` is bf16 autocast where the hardware computes
    bf16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX, see `native_bf16`) and "no" elsewhere,
    where emulated bf16 would be slower than float32. `compile=True` runs each trained module's forward through
    `torch.compile` (Inductor; the first steps and the first eval pay the compilation); weights and checkpoints are
    unchanged by it. It is off by default: for the demo GPT on a 2-core CPU it ran training steps 1.15x faster
    after compiling (12 s with a warm Inductor cache, longer cold), which a few thousand steps barely earn back.
    """

    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 500
    keep_last: int = 2
    num_workers: int = 0
    nan_policy: Literal["raise", "skip"] = "raise"
    nan_max_consecutive: int = 10
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last", "nan_max_consecutive"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")
        for key in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}.")


def native_bf16() -> bool:
    """Whether the device accelerate will train on computes bf16 natively: a CUDA GPU with bf16 support, or an x86
    CPU whose /proc/cpuinfo lists avx512_bf16 or amx_bf16 (oneDNN then runs bf16 convolutions and GEMMs faster than
    float32; without them it emulates bf16, slower than float32). False where that cannot be read."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


@dataclass
class OptimizerSpec:
    """One AdamW over the parameters of the named modules (a module belongs to at most one optimizer)."""

    name: str
    modules: list[str]
    config: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class StepOutput:
    """What `Task.training_step` returns for one micro-batch.

    losses: one scalar per optimizer name. Each is backpropagated into ITS optimizer's parameters only. A loss
        that is None or does not require grad (e.g. `torch.zeros(())` for a discriminator that has not started)
        means that optimizer does not step this step; its LR schedule still advances.
    logs: scalars to log (float or 0-d tensor), e.g. the parts of the losses. Non-finite parts are named in the
        NaN-guard message. Keys must be the same on all processes.
    """

    losses: dict[str, Tensor | None]
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class Task(Protocol):
    """What a model family provides to `train`."""

    def modules(self) -> dict[str, nn.Module]:
        """Everything with weights to train and checkpoint, by name ([A-Za-z0-9_.-]). Called once."""
        ...

    def optimizers(self) -> list[OptimizerSpec]:
        """The optimizers; modules in none of them are frozen (still moved to the device and checkpointed)."""
        ...

    def ema_modules(self) -> list[str]:
        """Modules that get EMA copies when `ema_decay` is set (may be empty)."""
        ...

    def training_step(self, batch: Any, *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        """Forward one per-process micro-batch (already on the device) under autocast.

        `modules` are the prepared ones (DDP-wrapped when multi-process: call other methods via `.module`).
        `step` is the number of optimizer steps done so far (0 for the first). Use mean losses.
        """
        ...

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        """Called on all processes under no_grad with unwrapped modules in eval mode (EMA weights if on).

        Reduce across processes with `accelerator` where needed; the main process's result is logged. RNG use
        here does not disturb training (RNG state is restored afterwards).
        """
        ...

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        """Write the final products (e.g. `save_pretrained`) into `out_dir`; main process only, EMA weights if on."""
        ...


@dataclass
class TrainResult:
    """Where a run ended: final step, last logged metrics, final eval, and its files."""

    step: int
    logs: dict[str, float]
    eval: dict[str, float]
    out_dir: Path
    checkpoint: Path
    artifacts_dir: Path
    metrics_csv: Path


class NonFiniteLossError(RuntimeError):
    """A loss was NaN/inf; no update and no checkpoint were written for that step."""


class ResumeMismatchError(ValueError):
    """`resume=True` found a checkpoint written with a different config."""


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): (step+1)/warmup during warm-up, then 1 (constant) or
    cosine from 1 at `warmup_steps` to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % 2**63)


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's micro-batches of one epoch, in a fixed order that does not depend on the process count.

    The epoch's order is `randperm(num_samples)` seeded by (seed, epoch). It is cut into global micro-batches of
    `micro_batch * num_processes` indices; process r takes slice r of each. Iteration starts at micro-batch
    `start`, which is how a resumed run skips what it already consumed without loading it.
    """

    def __init__(self, num_samples: int, *, seed: int, epoch: int, micro_batch: int, num_micro: int,
                 num_processes: int, process_index: int, start: int = 0) -> None:
        self.num_samples, self.seed, self.epoch, self.micro_batch = num_samples, seed, epoch, micro_batch
        self.num_micro, self.num_processes, self.process_index, self.start = num_micro, num_processes, process_index, start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=gen).tolist()
        global_micro = self.micro_batch * self.num_processes
        for k in range(self.start, self.num_micro):
            base = k * global_micro + self.process_index * self.micro_batch
            yield perm[base:base + self.micro_batch]

    def __len__(self) -> int:
        return self.num_micro - self.start


def _check_task(modules: dict[str, nn.Module], specs: list[OptimizerSpec], ema_names: list[str]) -> None:
    for name in modules:
        check_name("module", name)
    owner: dict[str, str] = {}
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"a task needs at least one optimizer, with unique names; got {names}.")
    for spec in specs:
        check_name("optimizer", spec.name)
        for m in spec.modules:
            if m not in modules:
                raise ValueError(f"optimizer '{spec.name}' names module '{m}', but the task's modules are {sorted(modules)}.")
            if m in owner:
                raise ValueError(f"module '{m}' is in two optimizers: '{owner[m]}' and '{spec.name}'.")
            owner[m] = spec.name
    for m in ema_names:
        if m not in modules:
            raise ValueError(f"ema_modules names '{m}', but the task's modules are {sorted(modules)}.")


def _make_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig, *, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _portable(task_config: Any, *, train_config: dict[str, Any], out_dir: str) -> Any:
    """`task_config` as a resume compares it: paths under `out_dir` written relative to it ("<out_dir>/codes"), and
    RESUMABLE_CHANGES dropped from any part equal to `train_config` (an experiment's `train` section), so a run
    resumes after being moved or copied and with the same changes its TrainConfig allows."""
    root = os.path.normpath(out_dir)

    def view(v: Any) -> Any:
        if isinstance(v, dict):
            if v == train_config:
                v = {k: x for k, x in v.items() if k not in RESUMABLE_CHANGES}
            return {k: view(x) for k, x in v.items()}
        if isinstance(v, list):
            return [view(x) for x in v]
        if isinstance(v, str) and v:
            path = os.path.normpath(v)
            if path == root or path.startswith(root + os.sep):
                return "<out_dir>" + path[len(root):]
        return v

    return view(json.loads(json.dumps(task_config)))


def _config_mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    return [f"{k} (checkpoint: {a.get(k, '<missing>')!r}, now: {b.get(k, '<missing>')!r})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@torch.no_grad()
def _all_reduce_grads(params: list[nn.Parameter], *, world: int) -> None:
    """Average gradients over processes, like DDP, but after backward and tolerant of unused parameters.

    A per-parameter has-grad flag travels with the data, so a parameter no process touched keeps grad None
    (exactly as in a single-process run) and one touched on some processes only gets the average with zeros.
    """
    dist = torch.distributed
    buckets: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if size and size + p.numel() > _GRAD_BUCKET_NUMEL:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for bucket in buckets:
        ref = bucket[0]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in bucket]
        flags = torch.tensor([p.grad is not None for p in bucket], dtype=torch.float32, device=ref.device)
        flat = torch.cat(parts + [flags])
        dist.all_reduce(flat)
        offset = 0
        for i, p in enumerate(bucket):
            n = p.numel()
            if flat[-len(bucket) + i] > 0:
                p.grad = (flat[offset:offset + n] / world).view_as(p).to(p.dtype)
            offset += n


def _open_run_dir(out_dir: Path, *, resume: bool, overwrite: bool, accelerator: Any) -> ResumePoint | None:
    """Check `out_dir` on every process, then claim it for a run on the main process; return the checkpoint a resume
    starts from (None without resume; a ResumePoint whose path is None when there is no checkpoint at all).

    Refuses a folder argen did not write, a run that already holds checkpoints unless resumed or overwritten, and a
    resume where no checkpoint verifies. `overwrite` deletes the previous run's checkpoints/, logs/ and final/.
    """
    from accelerate.utils import broadcast_object_list

    root, is_main = checkpoints_dir(out_dir), accelerator.is_main_process
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True exclude each other: resume continues the run in "
                         f"{out_dir}, overwrite deletes it and starts over.")
    check_replaceable(out_dir)
    previous = [p for p in (root, out_dir / "logs", out_dir / "final") if p.exists()] if overwrite else []
    for p in previous:
        check_replaceable(p)  # all of them before any is deleted
    if not resume and not overwrite and (step_dirs(out_dir) or (root / LATEST_NAME).exists()):
        held = ", ".join(p.name for p in step_dirs(out_dir)) or f"only {LATEST_NAME}"
        raise FileExistsError(f"{out_dir} already holds checkpoints ({held}); pass resume=True to continue the run, "
                              "overwrite=True to delete it and start over, or choose another out_dir.")
    accelerator.wait_for_everyone()  # every process has checked before the main process changes anything
    if is_main:
        for p in previous:
            remove_output(p)
        if previous:
            print(f"overwrite: deleted {', '.join(p.name + '/' for p in previous)} of the previous run in {out_dir}")
        claim_output_dir(out_dir, kind="run")
        for folder in (out_dir, root, out_dir / "logs"):  # what killed writes and deletes left behind
            clean_stale_temps(folder)
    accelerator.wait_for_everyone()
    if not resume:
        return None
    found: ResumePoint = broadcast_object_list([find_resume_checkpoint(out_dir) if is_main else None])[0]
    if found.path is None and found.skipped:
        raise BadCheckpointError(f"cannot resume {out_dir}: no checkpoint verifies ({found.notes()}). Move the damaged "
                                 "ones out of checkpoints/ to look at them, or pass overwrite=True to start over.")
    if found.path is None:
        accelerator.print(f"note: resume=True but {root} has no checkpoint; starting from step 0.")
    return found


def train(
    task: Task,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    task_config: dict[str, Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    on_batch_meta: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Train `task` on `dataset` for `config.max_steps` optimizer steps; runs unchanged under `accelerate launch`.

    Files under `config.out_dir`: `train_config.yaml`, `task_config.json` (`task_config` as given, e.g. the model
    config), `checkpoints/step_XXXXXXXX/` + `checkpoints/latest`, `logs/metrics.csv`, `logs/eval.csv`,
    `logs/tensorboard/`, and `final/` (whatever `task.save_artifacts` writes).

    The out_dir is claimed as an argen output (OUTPUT_MARKER): a non-empty folder argen did not write is refused.

    resume: continue bit-exactly (weights, optimizer, LR schedule, EMA, RNG, data position) from the newest checkpoint
        whose files match the sha256 its state.json records; damaged newer ones (and a missing or wrong `latest`
        pointer) are named in the one line that says where the run resumed. Step dirs of which none verifies raise
        BadCheckpointError naming the files; no checkpoint at all prints a note and starts fresh. A changed config
        (other than RESUMABLE_CHANGES), task_config or process count raises ResumeMismatchError naming the keys;
        paths under out_dir compare relative to it, so a moved or copied run resumes.
    overwrite: delete the previous run's `checkpoints/`, `logs/` and `final/` (only if argen wrote them) and start
        from step 0. Without resume or overwrite, an out_dir that already holds checkpoints is an error.
    collate_fn: the DataLoader collate function (default: torch's).
    on_batch_meta: called on every process with each raw (collated, not yet on the device) batch before the
        step, e.g. `SkipReport.update`.

    Raises NonFiniteLossError on a NaN/inf loss (nan_policy="raise"), leaving the last checkpoint as it was.
    Random augmentations inside DataLoader workers (num_workers > 0) resume exactly only if they derive their
    randomness from the sample index; randomness in the main process (training_step) always resumes exactly.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object, send_to_device, set_seed
    from tqdm.auto import tqdm

    out_dir = Path(config.out_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if native_bf16() else "no"
    # accelerate keeps one mixed precision per process and refuses another; one process may train several stages
    # (`argen train unclip`) at different precisions, so each run starts from a fresh AcceleratorState (the process
    # group, in PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=precision,
        # torchrun without CUDA: accelerate goes multi-process on CPU (gloo) only when told `cpu=True`.
        cpu=launched > 1 and not torch.cuda.is_available(),
        # Gradients are synchronised by `_all_reduce_grads`, never by DDP's hooks (all forwards run under
        # no_sync), so DDP only broadcasts the initial weights; buffers are broadcast after every step instead.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if world != launched:
        raise RuntimeError(f"launched with WORLD_SIZE={launched} but accelerate runs {world} process(es) "
                           f"({accelerator.distributed_type}); the processes would train separate copies.")
    is_main = accelerator.is_main_process
    if is_main and config.mixed_precision == "auto":
        print(f"mixed_precision auto -> {precision!r} (native bf16 on this machine: {precision == 'bf16'})")

    per_step = world * config.grad_accum
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by num_processes {world} x grad_accum "
            f"{config.grad_accum} = {per_step}; choose a batch_size that is a multiple of {per_step}."
        )
    micro_batch = config.batch_size // per_step
    steps_per_epoch = len(dataset) // config.batch_size  # type: ignore[arg-type]
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch of {config.batch_size}.")  # type: ignore[arg-type]

    modules = task.modules()
    specs = task.optimizers()
    ema_names = list(task.ema_modules()) if config.ema_decay is not None else []
    _check_task(modules, specs, ema_names)
    if config.mixed_precision == "fp16" and len(specs) > 1:
        raise ValueError(
            f"mixed_precision='fp16' with {len(specs)} optimizers is not supported: accelerate shares one loss "
            "scaler between optimizers and would unscale gradients twice. Use mixed_precision='bf16' or 'no'."
        )
    set_seed(config.seed, device_specific=True)  # seed + process index: processes draw different dropout masks

    for m in modules.values():
        m.to(device).train()
    trainable = {m for s in specs for m in s.modules}
    prepared: dict[str, nn.Module] = {n: (accelerator.prepare(m) if n in trainable else m) for n, m in modules.items()}
    ddp_modules = [prepared[n] for n in modules if prepared[n] is not modules[n]]  # DDP-wrapped (multi-process)
    if config.compile:
        for n in trainable:  # in place: the module (and a DDP wrapper's call) runs compiled, its state_dict keeps its keys
            modules[n].compile()
    params = {s.name: [p for n in s.modules for p in modules[n].parameters() if p.requires_grad] for s in specs}
    optimizers: dict[str, Any] = {}
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
    schedule = dict(max_steps=config.max_steps, warmup_steps=config.warmup_steps,
                    schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio)
    for s in specs:
        if not params[s.name]:
            raise ValueError(f"optimizer '{s.name}' has no trainable parameters in modules {s.modules}.")
        raw = _make_optimizer(params[s.name], s.config, fused=device.type == "cuda")
        schedulers[s.name] = torch.optim.lr_scheduler.LambdaLR(raw, lambda i: lr_factor(i, **schedule))
        optimizers[s.name] = accelerator.prepare(raw)
    ema = EMA({n: modules[n] for n in ema_names}, decay=config.ema_decay) if ema_names else None

    config_dict = to_dict(config)
    compared = {k: v for k, v in config_dict.items() if k not in RESUMABLE_CHANGES}
    task_config = task_config or {}
    step, nan_skipped = 0, 0
    found = _open_run_dir(out_dir, resume=resume, overwrite=overwrite, accelerator=accelerator)
    ckpt_path = found.path if found is not None else None
    if found is not None and found.path is not None:
        saved, saved_train = found.state, found.state["train_config"]
        bad = _config_mismatches({k: v for k, v in saved_train.items() if k not in RESUMABLE_CHANGES}, compared)
        bad += _config_mismatches(
            {"task": _portable(saved["task_config"], train_config=saved_train, out_dir=saved_train["out_dir"])},
            {"task": _portable(task_config, train_config=json.loads(json.dumps(config_dict)), out_dir=config.out_dir)})
        if saved["num_processes"] != world:
            bad.append(f"num_processes (checkpoint: {saved['num_processes']}, now: {world})")
        if bad:
            raise ResumeMismatchError(f"cannot resume {ckpt_path}: the config differs in " + "; ".join(bad) +
                                      ". Resume with the original settings, or start a new out_dir.")
        loaded = load_checkpoint(ckpt_path, modules=modules, optimizers=optimizers, schedulers=schedulers, device=device)
        if ema is not None:
            ema.load_state_dict(loaded.ema)
        if loaded.scaler is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(loaded.scaler)
        restore_rng(loaded.rng[rank])
        step, nan_skipped = loaded.state["step"], loaded.state["nan_skipped"]
        accelerator.print(f"resumed from {ckpt_path} at step {step}" + (f" ({found.notes()})" if found.notes() else ""))

    logs_dir = out_dir / "logs"
    metrics_csv, eval_csv, writer = MetricsCsv(logs_dir / "metrics.csv"), MetricsCsv(logs_dir / "eval.csv"), None
    if is_main:
        claim_output_dir(logs_dir, kind="logs")
        save_config(config, out_dir / "train_config.yaml")
        atomic_write_bytes(out_dir / "task_config.json", json.dumps(task_config, indent=2, sort_keys=True).encode())
        metrics_csv.truncate_after(step)
        eval_csv.truncate_after(step)
        writer = tensorboard_writer(logs_dir / "tensorboard", purge_step=step + 1 if step else None)
    accelerator.wait_for_everyone()

    def batches(start_step: int) -> Iterator[Any]:
        epoch, in_epoch = divmod(start_step, steps_per_epoch)
        start = in_epoch * config.grad_accum
        while True:
            sampler = ShardedBatchSampler(len(dataset), seed=config.seed, epoch=epoch, micro_batch=micro_batch,  # type: ignore[arg-type]
                                          num_micro=steps_per_epoch * config.grad_accum, num_processes=world,
                                          process_index=rank, start=start)
            # An explicit generator keeps worker seeds off the global RNG (DataLoader would draw from it).
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=config.num_workers,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(_seed_for(config.seed, epoch, rank)))
            yield from loader
            epoch, start = epoch + 1, 0

    def save(at_step: int) -> Path:
        rng = gather_object([capture_rng()])
        path = checkpoints_dir(out_dir) / f"step_{at_step:08d}"
        if is_main:
            path = save_checkpoint(
                out_dir, step=at_step, modules=modules, optimizers=optimizers, schedulers=schedulers,
                ema=ema.state_dict() if ema is not None else {}, rng=rng,
                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                state={"nan_skipped": nan_skipped, "num_processes": world, "train_config": config_dict,
                       "task_config": task_config},
                keep_last=config.keep_last)
        accelerator.wait_for_everyone()
        return path

    def evaluate(at_step: int) -> dict[str, float]:
        rng = capture_rng()
        was_training = {n: m.training for n, m in modules.items()}
        for m in modules.values():
            m.eval()
        try:
            with torch.no_grad(), (ema.swapped() if ema is not None else contextlib.nullcontext()):
                metrics = {k: float(v) for k, v in task.evaluate(modules=modules, accelerator=accelerator, step=at_step).items()}
        finally:
            for n, m in modules.items():
                m.train(was_training[n])
            restore_rng(rng)
        if is_main:
            eval_csv.append(at_step, metrics)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"eval/{k}", v, at_step)
        return metrics

    data = batches(step)
    names = [s.name for s in specs]
    last_logs: dict[str, float] = {}
    last_ckpt: Path | None = ckpt_path
    consecutive_bad = 0
    bar = tqdm(total=config.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)

    while step < config.max_steps:
        log_now = (step + 1) % config.log_every == 0 or step + 1 == config.max_steps
        active: set[str] = set()
        window_bad = False
        sums: dict[str, Tensor] = {}
        for micro in range(config.grad_accum):
            batch = next(data)
            if on_batch_meta is not None:
                on_batch_meta(batch)
            batch = send_to_device(batch, device)
            with contextlib.ExitStack() as stack:
                for m in ddp_modules:
                    stack.enter_context(accelerator.no_sync(m))
                with accelerator.autocast():
                    out = task.training_step(batch, modules=prepared, step=step)
                unknown = set(out.losses) - set(names)
                if unknown:
                    raise ValueError(f"training_step returned losses {sorted(unknown)} for no optimizer; optimizers are {names}.")
                losses = {k: v for k, v in out.losses.items() if v is not None}
                bad = _nonfinite(losses, world=world, accelerator=accelerator)
                if bad:
                    window_bad = True
                    if config.nan_policy == "raise":
                        raise NonFiniteLossError(_nan_message(step, micro, losses, out.logs, bad, last_ckpt, specs, config))
                    continue
                todo = [(k, v) for k, v in losses.items() if v.requires_grad]
                for i, (k, loss) in enumerate(todo):
                    # inputs=: the loss reaches only its optimizer's parameters (a generator loss through a
                    # discriminator leaves the discriminator's grads untouched). Mean over micro-steps.
                    accelerator.backward(loss / config.grad_accum, inputs=params[k], retain_graph=i + 1 < len(todo))
                    active.add(k)
                if log_now:
                    for k, v in {**{f"loss/{k}": v for k, v in losses.items()}, **out.logs}.items():
                        t = torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, device=device).float().mean()
                        sums[k] = sums.get(k, 0) + t / config.grad_accum

        grad_norms: dict[str, Tensor] = {}
        if window_bad:
            nan_skipped += 1
            consecutive_bad += 1
            if consecutive_bad >= config.nan_max_consecutive:
                raise NonFiniteLossError(f"{consecutive_bad} consecutive steps up to step {step} had non-finite losses "
                                         f"(nan_policy='skip'). Last good checkpoint: {last_ckpt or 'none yet'}.")
        else:
            consecutive_bad = 0
            stepping = [k for k in names if k in active]
            if world > 1:  # the same optimizers must step on every process
                flags = accelerator.reduce(torch.tensor([float(k in active) for k in names], device=device), "sum")
                stepping = [k for k, f in zip(names, flags.tolist()) if f > 0]
            for k in stepping:
                if world > 1:
                    _all_reduce_grads(params[k], world=world)
                if config.grad_clip is not None:
                    grad_norms[k] = accelerator.clip_grad_norm_(params[k], config.grad_clip)
                optimizers[k].step()
            if world > 1:
                with torch.no_grad():
                    for m in ddp_modules:
                        for b in m.buffers():
                            torch.distributed.broadcast(b, 0)
            if ema is not None:
                ema.update()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        lrs = {f"lr/{k}": float(optimizers[k].param_groups[0]["lr"]) for k in names}  # the LR this step used
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" for an optimizer not started yet
            warnings.simplefilter("ignore", UserWarning)
            for sched in schedulers.values():
                sched.step()  # every step, stepped or not: the LR is a function of the global step
        step += 1
        bar.update(1)

        if log_now:
            keys = sorted(sums)
            local = torch.stack([sums[k] for k in keys] + [grad_norms[k].float() for k in grad_norms]) if keys or grad_norms else torch.zeros(0, device=device)
            mean = accelerator.gather(local[None]).mean(0).tolist()
            now = time.perf_counter()
            last_logs = dict(zip(keys + [f"grad_norm/{k}" for k in grad_norms], mean))
            last_logs.update(lrs)
            last_logs["samples_per_s"] = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
            if nan_skipped:
                last_logs["nan_skipped"] = float(nan_skipped)
            t_last, step_last = now, step
            if is_main:
                metrics_csv.append(step, last_logs)
                if writer is not None:
                    for k, v in last_logs.items():
                        writer.add_scalar(k, v, step)
                bar.set_postfix({k.split("/")[-1] if k.startswith("loss/") else k: f"{v:.4g}" for k, v in last_logs.items()
                                 if k.startswith(("loss/", "lr/")) or k == "samples_per_s"}, refresh=False)
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            evaluate(step)
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            last_ckpt = save(step)
    bar.close()

    final = last_ckpt if last_ckpt is not None and last_ckpt.name == f"step_{step:08d}" else save(step)
    final_eval = evaluate(step)
    artifacts = out_dir / "final"
    if is_main:
        claim_output_dir(artifacts, kind="final")
        with torch.no_grad(), (ema.swapped() if ema is not None else contextlib.nullcontext()):
            task.save_artifacts(modules=modules, out_dir=artifacts)
        if writer is not None:
            writer.close()
    accelerator.wait_for_everyone()
    return TrainResult(step=step, logs=last_logs, eval=final_eval, out_dir=out_dir, checkpoint=final,
                       artifacts_dir=artifacts, metrics_csv=logs_dir / "metrics.csv")


def _nonfinite(losses: dict[str, Tensor], *, world: int, accelerator: Any) -> list[str]:
    """Names of losses that are NaN/inf on any process (one device sync per micro-step)."""
    if not losses:
        return []
    flags = torch.stack([(~torch.isfinite(v.detach().float())).any().float() for v in losses.values()])
    if world > 1:
        flags = accelerator.reduce(flags, "sum")
    return [k for k, f in zip(losses, flags.tolist()) if f > 0]


def _nan_message(step: int, micro: int, losses: dict[str, Tensor], logs: dict[str, Any], bad: list[str],
                 last_ckpt: Path | None, specs: list[OptimizerSpec], config: TrainConfig) -> str:
    def show(v: Any) -> str:
        v = float(v.detach().float().mean()) if isinstance(v, Tensor) else float(v)
        return f"{v:.4g}" + ("  <-- non-finite" if not math.isfinite(v) else "")

    parts = "\n".join(f"  {k} = {show(v)}" for k, v in {**{f"loss/{k}": v for k, v in losses.items()}, **logs}.items())
    lrs = ", ".join(f"{s.name} lr={s.config.lr:g}" for s in specs)
    return (
        f"non-finite loss at step {step} (micro-step {micro}): {', '.join(bad)} (on this or another process).\n"
        f"Values on this process:\n{parts}\n"
        f"No update and no checkpoint were written for this step. Last good checkpoint: {last_ckpt or 'none yet'}"
        f"{' (continue with resume=True)' if last_ckpt else ''}.\n"
        f"Try: a lower learning rate ({lrs}), warmup_steps > 0 (now {config.warmup_steps}), gradient clipping "
        f"(grad_clip now {config.grad_clip}), mixed_precision='no' (now {config.mixed_precision!r}), "
        "or nan_policy='skip' to skip rare bad batches."
    )
