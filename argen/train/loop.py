"""The one training loop: a Task's modules and optimizers trained on accelerate (one process, DDP or FSDP2, as the
accelerate config says), with EMA, checkpoints, exact resume and metrics.json."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from argen.data.skips import SkipReport
from argen.host import compile_problem, native_bf16
from argen.train.batches import Batches, seed_for
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
from argen.train.processes import cpu_multiprocess, launched_processes
from argen.train.sharding import (
    FullCopies,
    full_optimizer_state,
    full_tensor,
    graph_reaches,
    load_full_optimizer_state,
    load_full_state_dict,
    output_nodes,
)
from tokenizers_img.config import save_config, to_dict
from tokenizers_img.serialization import (
    atomic_write_bytes,
    check_replaceable,
    claim_output_dir,
    clean_stale_temps,
    remove_output,
)

# TrainConfig keys that may change between a run and its resumption; any other change is an error. A change of
# max_steps re-plans the LR schedule (LRSchedule); grad_accum and the process count may change because the data
# order does not depend on them (ShardedBatchSampler).
RESUMABLE_CHANGES = ("out_dir", "log_every", "eval_every", "save_every", "keep_last", "num_workers", "compile",
                     "grad_accum", "max_steps", "ddp_find_unused_parameters")
T = TypeVar("T")


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
    same config gives the same data and (up to float reduction order) the same weights on 1 or N processes, under
    DDP or FSDP2 (chosen by the accelerate config). The LR is `lr * LRSchedule.factor(step)`: linear warm-up over
    `warmup_steps`, then cosine to `min_lr_ratio * lr` at `max_steps` (or constant). `nan_policy="skip"` skips a
    step whose loss is non-finite and raises after `nan_max_consecutive` consecutive skips.
    `mixed_precision="auto"` is bf16 autocast where the hardware computes bf16 natively (a CUDA GPU that supports
    it; a CPU with AVX512-BF16 or AMX, see `native_bf16`) and "no" elsewhere, where emulated bf16 would be slower
    than float32. `compile=True` runs each trained module's forward through `torch.compile` (Inductor; the first
    steps and the first eval pay the compilation, about half a minute for the demo GPT on a CPU) and refuses to
    start where Inductor cannot compile (`argen.host.compile_problem`); `"auto"` compiles where it can and says
    why not elsewhere. Checkpoints are unchanged by it. A compiled run on the CPU holds torch's deterministic
    algorithms on (Inductor would otherwise sum embedding gradients with atomic adds, and two runs would differ).
    It pays for models whose steps are bound by element-wise work, such as the demo GPT; off by default, since it
    makes some steps slower (a conv tokenizer's, docs/speed.md). `ddp_find_unused_parameters` lets
    DDP train a module whose forward leaves some trainable parameters unused (one graph traversal per forward).
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
    compile: bool | Literal["auto"] = False
    ddp_find_unused_parameters: bool = False

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


@dataclass
class OptimizerSpec:
    """One AdamW over the parameters of the named modules (a module belongs to at most one optimizer; under FSDP2
    an optimizer covers exactly one module)."""

    name: str
    modules: list[str]
    config: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class StepOutput:
    """What `Task.training_step` returns for one micro-batch.

    losses: one scalar per optimizer name. Each is backpropagated into ITS optimizer's parameters only, the last
        optimizer's first. A loss that is None or does not require grad (e.g. `torch.zeros(())` for a
        discriminator that has not started) means that optimizer does not step this step; its LR schedule still
        advances. Which losses require grad must depend on `step` only, never on the batch: every process
        backpropagates the same ones.
    logs: scalars to log (float or 0-d tensor), e.g. the parts of the losses. Non-finite parts are named in the
        NaN-guard message. Keys must be the same on all processes.
    """

    losses: dict[str, Tensor | None]
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class Task(Protocol):
    """What a model family provides to `train`.

    Three optional methods are used when present: `describe() -> str`, a line the main process prints before the
    first step (parameter counts, data sizes); `report(result: TrainResult) -> dict`, keys the main process adds
    to `metrics.json` at the end; and `compile_problem(device, mixed_precision) -> str | None`, why `train.compile`
    must not compile this task's modules there (refused when true, eager when auto).
    """

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

        `modules` are the prepared ones: DDP-wrapped when multi-process (call other methods via `.module`), or
        sharded in place under FSDP2. Under FSDP2 a loss must not reach another optimizer's module through that
        module's own forward: call it on a whole, detached copy (`argen.train.sharding.full_state_dict`), as
        `TokenizerTask` does for the discriminator; the loop raises if a loss touches another optimizer's gradients.
        `step` is the number of optimizer steps done so far (0 for the first). Use mean losses.
        """
        ...

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        """Called on all processes under no_grad with whole, unwrapped modules in eval mode (EMA weights if on).

        Reduce across processes with `accelerator` where needed; the main process's result is logged. RNG use
        here does not disturb training (RNG state is restored afterwards).
        """
        ...

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        """Write the final products (e.g. `save_pretrained`) into `out_dir`; main process only, whole modules, EMA
        weights if on."""
        ...


@dataclass
class TrainResult:
    """Where a run ended: final step, last logged metrics, final eval, and its files. `main_process` is False on the
    other processes of a multi-process run, which should not report."""

    step: int
    logs: dict[str, float]
    eval: dict[str, float]
    out_dir: Path
    checkpoint: Path
    artifacts_dir: Path
    metrics_csv: Path
    metrics_json: Path
    main_process: bool = True


class NonFiniteLossError(RuntimeError):
    """A loss was NaN/inf; no update and no checkpoint were written for that step."""


class ResumeMismatchError(ValueError):
    """`resume=True` found a checkpoint written with a different config."""


def seeded(seed: int, build: Callable[[], T]) -> T:
    """`build()` under `torch.manual_seed(seed)`: a run's initial weights are part of it (same seed, same model, and
    the same on every process, which FSDP2 needs: it keeps each process's own shard of its own weights)."""
    torch.manual_seed(seed)
    return build()


@dataclass
class LRSchedule:
    """The LR multiplier of every optimizer step: (step+1)/warmup during warm-up, then 1 (constant) or a cosine to
    `min_lr_ratio` at the planned last step.

    `plans` lists (from_step, max_steps): the run started planning max_steps (0, N); a resume with another
    max_steps appends (its step, M). From that step on, the cosine runs from the multiplier the step had to
    `min_lr_ratio` at M: the LR never jumps, a longer run decays more slowly, and a finished run that is extended
    stays at `min_lr_ratio`. A change during warm-up replaces the plan as if the run had started with it.
    """

    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    plans: list[tuple[int, int]]

    def factor(self, step: int) -> float:
        """The multiplier of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        start, top, end = self.warmup_steps, 1.0, self.plans[0][1]
        for at, max_steps in self.plans[1:]:
            if step < at:
                break
            if at > start:
                start, top = at, self._cosine(at, start=start, top=top, end=end)
            end = max_steps
        return self._cosine(step, start=start, top=top, end=end)

    def _cosine(self, step: int, *, start: int, top: float, end: int) -> float:
        progress = min((step - start) / max(end - start, 1), 1.0)
        return self.min_lr_ratio + (top - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The LR multiplier of step `step` in a run planned for `max_steps` from the start (see LRSchedule)."""
    return LRSchedule(warmup_steps, schedule, min_lr_ratio, [(0, max_steps)]).factor(step)


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


def _accelerator(config: TrainConfig) -> Any:
    """A fresh Accelerator for this run: mixed precision, accumulation and DDP or FSDP2 as the accelerate config says."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType, GradientAccumulationPlugin

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if native_bf16() else "no"
    # accelerate keeps one mixed precision per process and refuses another; one process may train several stages
    # (`argen train unclip`) at different precisions, so each run starts from a fresh AcceleratorState and
    # GradientState (the process group, in PartialState, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=cpu_multiprocess(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    )
    if accelerator.num_processes != launched_processes():
        raise RuntimeError(f"launched with WORLD_SIZE={launched_processes()} but accelerate runs "
                           f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); the processes "
                           "would train separate copies.")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("the accelerate config selects FSDP version 1; argen trains with FSDP2 "
                         "(fsdp_version: 2 in the accelerate config, or accelerate launch --fsdp_version 2).")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.print(f"note: the accelerate config asks for FSDP, which accelerate runs on GPUs (and other "
                          f"accelerators) only; this run uses {accelerator.distributed_type}.")
    if accelerator.is_main_process and config.mixed_precision == "auto":
        print(f"mixed_precision auto -> {precision!r} (native bf16 on this machine: {precision == 'bf16'})")
    return accelerator


@dataclass
class _Run:
    """Everything a training run holds between its steps."""

    task: Task
    config: TrainConfig
    accelerator: Any
    out_dir: Path
    modules: dict[str, nn.Module]        # the task's own modules (sharded in place under FSDP2)
    prepared: dict[str, nn.Module]       # what training_step gets: DDP-wrapped when multi-process
    specs: list[OptimizerSpec]
    optimizers: dict[str, Any]           # accelerate-prepared, by optimizer name
    params: dict[str, list[nn.Parameter]]  # each optimizer's parameters (the shards under FSDP2)
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    schedule: LRSchedule
    ema: EMA | None
    whole: FullCopies | None             # unsharded copies of the sharded modules (FSDP2 only)
    batches: Batches
    task_config: dict[str, Any]
    skips: SkipReport | None
    compiled: bool = False               # the trained modules run through torch.compile (TrainConfig.compile)
    step: int = 0
    nan_skipped: int = 0
    consecutive_bad: int = 0
    last_ckpt: Path | None = None
    last_logs: dict[str, float] = field(default_factory=dict)
    metrics_csv: MetricsCsv | None = None
    eval_csv: MetricsCsv | None = None
    writer: Any = None
    # FSDP2 with several optimizers: the autograd nodes of each optimizer's modules' outputs in this micro-step, and
    # the forward hooks that record them (removed when the run ends)
    forward_outputs: dict[str, list[Any]] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def sharded(self) -> bool:
        return self.whole is not None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _build(task: Task, dataset: Any, config: TrainConfig, *, task_config: dict[str, Any] | None,
           collate_fn: Callable[[list[Any]], Any] | None, skips: SkipReport | None) -> _Run:
    """The accelerator, the task's modules and optimizers prepared for it, LR schedules, EMA and the data order."""
    from accelerate.utils import DistributedType, set_seed

    accelerator = _accelerator(config)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    per_step = world * config.grad_accum
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by num_processes {world} x grad_accum "
            f"{config.grad_accum} = {per_step}; choose a batch_size that is a multiple of {per_step}."
        )
    batches = Batches(dataset, seed=config.seed, batch_size=config.batch_size, micro_batch=config.batch_size // per_step,
                      grad_accum=config.grad_accum, num_processes=world, process_index=rank,
                      num_workers=config.num_workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")

    modules = task.modules()
    specs = task.optimizers()
    ema_names = list(task.ema_modules()) if config.ema_decay is not None else []
    _check_task(modules, specs, ema_names)
    if config.mixed_precision == "fp16" and len(specs) > 1:
        raise ValueError(
            f"mixed_precision='fp16' with {len(specs)} optimizers is not supported: accelerate shares one loss "
            "scaler between optimizers and would unscale gradients twice. Use mixed_precision='bf16' or 'no'."
        )
    if fsdp and any(len(s.modules) != 1 for s in specs):
        raise ValueError("under FSDP2 each optimizer covers exactly one module (accelerate shards one model per "
                         f"optimizer); got {[(s.name, s.modules) for s in specs]}.")
    set_seed(config.seed, device_specific=True)  # seed + process index: processes draw different dropout masks

    trainable = [m for s in specs for m in s.modules]
    for m in modules.values():
        m.to(device).train()
    if fsdp:  # FSDP2 keeps each process's shard of its own weights: start every process from the main one's
        with torch.no_grad():
            for name in trainable:
                for t in [*modules[name].parameters(), *modules[name].buffers()]:
                    torch.distributed.broadcast(t.data, 0)
    whole = FullCopies({n: modules[n] for n in trainable}) if fsdp else None
    raw: dict[str, torch.optim.AdamW] = {}
    for s in specs:
        params = [p for n in s.modules for p in modules[n].parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"optimizer '{s.name}' has no trainable parameters in modules {s.modules}.")
        raw[s.name] = _make_optimizer(params, s.config, fused=device.type == "cuda")
    schedule = LRSchedule(config.warmup_steps, config.lr_schedule, config.min_lr_ratio, [(0, config.max_steps)])
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule.factor(i)) for k, opt in raw.items()}
    prepared: dict[str, nn.Module] = dict(modules)
    optimizers: dict[str, Any] = {}
    for s in specs:  # a model with its optimizer: FSDP2 swaps the optimizer's parameters for the shards
        *wrapped, optimizers[s.name] = accelerator.prepare(*[modules[n] for n in s.modules], raw[s.name])
        prepared.update(zip(s.modules, wrapped))
    compiled = _compiles(config, device, accelerator, task)
    if compiled:
        for n in trainable:  # in place: the module (and a DDP wrapper's call) runs compiled, its state_dict keeps its keys
            modules[n].compile()
    # In the modules' order (accelerate's FSDP clip_grad_norm_ compares the list with model.parameters()); under
    # FSDP2 these are the shards the optimizer now holds.
    params = {s.name: [p for n in s.modules for p in modules[n].parameters() if p.requires_grad] for s in specs}
    ema = EMA({n: modules[n] for n in ema_names}, decay=config.ema_decay) if ema_names else None  # type: ignore[arg-type]
    run = _Run(task=task, config=config, accelerator=accelerator, out_dir=Path(config.out_dir), modules=modules,
               prepared=prepared, specs=specs, optimizers=optimizers, params=params, schedulers=schedulers,
               schedule=schedule, ema=ema, whole=whole, batches=batches, task_config=task_config or {}, skips=skips,
               compiled=compiled)
    if fsdp and len(specs) > 1:  # record each module's outputs, to see which losses run through which modules
        for s in specs:
            run.forward_outputs[s.name] = []
            for n in s.modules:
                run.hooks.append(modules[n].register_forward_hook(
                    lambda module, args, out, k=s.name: run.forward_outputs[k].extend(output_nodes(out))))
    return run


def _compiles(config: TrainConfig, device: torch.device, accelerator: Any, task: Task) -> bool:
    """Whether this run compiles its modules: `compile` True (refused where Inductor cannot compile, or where the task
    says compiling it is wrong) or "auto" (where neither holds)."""
    if config.compile is False:
        return False
    task_problem = getattr(task, "compile_problem", lambda device, mixed_precision: None)
    problem = compile_problem(device) or task_problem(device, accelerator.mixed_precision)
    if problem is None:
        accelerator.print(f"train.compile {config.compile}: the trained modules run through torch.compile; the first "
                          "steps and the first evaluation wait for its compilation")
        return True
    if config.compile is True:
        raise RuntimeError(f"train.compile=true: {problem}. Or set train.compile to false or auto.")
    accelerator.print(f"note: train.compile auto -> eager: {problem}.")
    return False


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch's deterministic algorithms on for the block (without filling new tensors with NaN), then as before."""
    was, filled = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    if on:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = filled


def _resume(run: _Run, found: ResumePoint) -> dict[str, list[int]] | None:
    """Load the checkpoint `found` names into the run after checking it was written with the same settings; return
    the positions a streamed dataset continues from."""
    config, world, rank = run.config, run.accelerator.num_processes, run.accelerator.process_index
    saved, saved_train = found.state, found.state["train_config"]
    compared = {k: v for k, v in to_dict(config).items() if k not in RESUMABLE_CHANGES}
    bad = _config_mismatches({k: v for k, v in saved_train.items() if k not in RESUMABLE_CHANGES}, compared)
    bad += _config_mismatches(
        {"task": _portable(saved["task_config"], train_config=saved_train, out_dir=saved_train["out_dir"])},
        {"task": _portable(run.task_config, train_config=json.loads(json.dumps(to_dict(config))), out_dir=config.out_dir)})
    if run.batches.streamed and saved.get("stream_layout") != run.batches.layout:
        bad.append(f"processes x DataLoader workers of a streamed dataset (checkpoint: {saved.get('stream_layout')}, "
                   f"now: {run.batches.layout}; a stream resumes on the same ones)")
    if config.max_steps < saved["step"]:
        bad.append(f"max_steps (checkpoint at step {saved['step']}, now: {config.max_steps}, which is before it)")
    if bad:
        raise ResumeMismatchError(f"cannot resume {found.path}: the config differs in " + "; ".join(bad) +
                                  ". Resume with the original settings, or start a new out_dir.")
    whole = {n: (run.whole.copies[n] if run.whole is not None and n in run.whole.copies else m)
             for n, m in run.modules.items()}
    loaded = load_checkpoint(found.path, modules=whole, optimizer_names=run.names,
                             device="cpu" if run.sharded else run.accelerator.device)
    if run.whole is not None:
        for n, copy in run.whole.copies.items():
            load_full_state_dict(run.modules[n], copy.state_dict())
    for k in run.names:
        load_full_optimizer_state(run.optimizers[k], loaded.optimizers[k])
        run.schedulers[k].load_state_dict(loaded.schedulers[k])
    if run.ema is not None:
        run.ema.load_state_dict(loaded.ema)
    if loaded.scaler is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(loaded.scaler)
    run.step, run.nan_skipped = saved["step"], saved["nan_skipped"]
    if rank < len(loaded.rng):
        restore_rng(loaded.rng[rank])
    else:  # a process the checkpoint did not have: its own stream, derived from the run's seed and this step
        torch.manual_seed(seed_for(config.seed, rank, run.step))
        np.random.seed(seed_for(config.seed, rank, run.step) % 2**32)
    run.schedule.plans[:] = [tuple(p) for p in saved.get("lr_plans", [(0, saved_train["max_steps"])])]
    if config.max_steps != run.schedule.plans[-1][1]:
        run.schedule.plans.append((run.step, config.max_steps))
    run.last_ckpt = found.path
    changed = [f"{saved['num_processes']} -> {world} processes"] if saved["num_processes"] != world else []
    if config.max_steps != saved_train["max_steps"]:
        changed.append(f"max_steps {saved_train['max_steps']} -> {config.max_steps}")
    notes = "; ".join(([found.notes()] if found.notes() else []) + changed)
    run.accelerator.print(f"resumed from {found.path} at step {run.step}" + (f" ({notes})" if notes else ""))
    return saved.get("stream_positions")


def _open_logs(run: _Run) -> None:
    """Write the run's configs and open its CSV and TensorBoard logs (rows past the resumed step dropped)."""
    logs_dir = run.out_dir / "logs"
    run.metrics_csv, run.eval_csv = MetricsCsv(logs_dir / "metrics.csv"), MetricsCsv(logs_dir / "eval.csv")
    if run.is_main:
        claim_output_dir(logs_dir, kind="logs")
        save_config(run.config, run.out_dir / "train_config.yaml")
        atomic_write_bytes(run.out_dir / "task_config.json", json.dumps(run.task_config, indent=2, sort_keys=True).encode())
        run.metrics_csv.truncate_after(run.step)
        run.eval_csv.truncate_after(run.step)
        run.writer = tensorboard_writer(logs_dir / "tensorboard", purge_step=run.step + 1 if run.step else None)
    run.accelerator.wait_for_everyone()


def _backward(run: _Run, todo: list[tuple[str, Tensor]]) -> None:
    """Backpropagate each loss into its optimizer's parameters only.

    Single-process and DDP: `inputs=` keeps a generator loss that runs through a discriminator off the
    discriminator's gradients, and DDP all-reduces each module's gradient buckets while the backward runs. Under
    FSDP2 the parameters in the graph are per-forward unsharded copies that `inputs=` cannot name, and a module's
    gradients are reduce-scattered by hooks in whichever backward passes through it; so each loss is
    backpropagated whole, and one whose graph runs through another optimizer's module is an error.
    """
    for i, (k, loss) in enumerate(todo):
        keep = i + 1 < len(todo)
        if not run.sharded:
            run.accelerator.backward(loss, inputs=run.params[k], retain_graph=keep)
            continue
        foreign = {fn for name, fns in run.forward_outputs.items() if name != k for fn in fns}
        if foreign and graph_reaches(loss, foreign):
            raise RuntimeError(f"under FSDP2 the loss of optimizer '{k}' runs through the forward of another "
                               "optimizer's module, whose gradients it would change; compute that part on a detached "
                               "whole copy of the module (argen.train.sharding.full_state_dict), as TokenizerTask does "
                               "for its discriminator.")
        run.accelerator.backward(loss, retain_graph=keep)


def _train_step(run: _Run, data: Any, *, log_now: bool) -> dict[str, float]:
    """One optimizer step: grad_accum micro-batches (DDP syncs gradients on the last only), the NaN guard, clipping,
    each optimizer that has a loss steps, EMA, LR schedules. Returns the step's mean logs when `log_now`."""
    from accelerate.utils import send_to_device

    acc, config, device = run.accelerator, run.config, run.accelerator.device
    trained = [run.prepared[n] for s in run.specs for n in s.modules]
    active: set[str] = set()
    window_bad = False
    sums: dict[str, Tensor] = {}
    for micro in range(config.grad_accum):
        batch = next(data)
        if run.skips is not None:
            run.skips.update(batch)
        batch = send_to_device(batch, device)
        for fns in run.forward_outputs.values():
            fns.clear()
        with acc.accumulate(*trained):  # no_sync (no gradient communication) on every micro-batch but the last
            with acc.autocast():
                out = run.task.training_step(batch, modules=run.prepared, step=run.step)
            unknown = set(out.losses) - set(run.names)
            if unknown:
                raise ValueError(f"training_step returned losses {sorted(unknown)} for no optimizer; optimizers are {run.names}.")
            losses = {k: v for k, v in out.losses.items() if v is not None}
            bad = _nonfinite(losses, accelerator=acc)
            if bad:
                window_bad = True
                if config.nan_policy == "raise":
                    raise NonFiniteLossError(_nan_message(run.step, micro, losses, out.logs, bad, run.last_ckpt,
                                                          run.specs, config))
                continue
            todo = [(k, v) for k, v in losses.items() if v.requires_grad]
            _backward(run, todo)  # accelerate divides each loss by grad_accum: the mean over micro-batches
            active.update(k for k, _ in todo)
            if log_now:
                for k, v in {**{f"loss/{k}": v for k, v in losses.items()}, **out.logs}.items():
                    t = torch.as_tensor(v.detach() if isinstance(v, Tensor) else v, device=device).float().mean()
                    sums[k] = sums.get(k, 0) + t / config.grad_accum

    grad_norms: dict[str, Tensor] = {}
    if window_bad:
        run.nan_skipped += 1
        run.consecutive_bad += 1
        if run.consecutive_bad >= config.nan_max_consecutive:
            raise NonFiniteLossError(f"{run.consecutive_bad} consecutive steps up to step {run.step} had non-finite "
                                     f"losses (nan_policy='skip'). Last good checkpoint: {run.last_ckpt or 'none yet'}.")
    else:
        run.consecutive_bad = 0
        stepping = [k for k in run.names if k in active]
        if run.step == 0 and acc.num_processes > 1 and not run.sharded and not config.ddp_find_unused_parameters:
            _check_all_used(run, stepping)
        for k in stepping:
            if config.grad_clip is not None:
                grad_norms[k] = _clip_grad_norm(run, k)
            run.optimizers[k].step()
        if run.ema is not None:
            run.ema.update()
    for opt in run.optimizers.values():
        opt.zero_grad(set_to_none=True)
    lrs = {f"lr/{k}": float(run.optimizers[k].param_groups[0]["lr"]) for k in run.names}  # the LR this step used
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" for an optimizer not started yet
        warnings.simplefilter("ignore", UserWarning)
        for sched in run.schedulers.values():
            sched.step()  # every step, stepped or not: the LR is a function of the global step
    run.step += 1
    if not log_now:
        return {}
    keys = sorted(sums)
    local = torch.stack([sums[k] for k in keys] + [grad_norms[k].float() for k in grad_norms]) if keys or grad_norms \
        else torch.zeros(0, device=device)
    mean = acc.gather(local[None]).mean(0).tolist()
    logs = dict(zip(keys + [f"grad_norm/{k}" for k in grad_norms], mean))
    logs.update(lrs)
    return logs


def _clip_grad_norm(run: _Run, name: str) -> Tensor:
    """Clip optimizer `name`'s gradients to `grad_clip` by their global norm; return the norm before clipping."""
    if not run.sharded:
        return run.accelerator.clip_grad_norm_(run.params[name], run.config.grad_clip)
    # accelerate's FSDP branch compares the list with each prepared model's parameters by `==`, which fails for a
    # second model; torch's clip_grad_norm_ computes the norm over the shards (a collective) itself.
    run.accelerator.unscale_gradients(run.optimizers[name])
    return full_tensor(torch.nn.utils.clip_grad_norm_(run.params[name], run.config.grad_clip))


def _check_all_used(run: _Run, stepping: list[str]) -> None:
    """After the first step's backward under DDP: every trainable parameter got a gradient, or name the ones that
    did not (DDP would otherwise fail at the next forward with a less helpful message)."""
    names = {id(p): f"{n}.{k}" for n, m in run.modules.items() for k, p in m.named_parameters()}
    unused = [names.get(id(p), "?") for k in stepping for p in run.params[k] if p.grad is None]
    if unused:
        raise RuntimeError(f"{len(unused)} trainable parameters received no gradient in the first step "
                           f"({', '.join(unused[:8])}{', ...' if len(unused) > 8 else ''}); DDP needs every one to, "
                           "or train.ddp_find_unused_parameters=true (one autograd-graph traversal per forward).")


def _whole_modules(run: _Run, *, device: torch.device) -> dict[str, nn.Module]:
    """The modules whole: as they are, or under FSDP2 gathered into unsharded copies (a collective)."""
    return run.whole.get(run.modules, device=device) if run.whole is not None else run.modules


def _evaluate(run: _Run, at_step: int) -> dict[str, float]:
    """`task.evaluate` on every process under no_grad with whole modules in eval mode (EMA weights if on); logged."""
    rng = capture_rng()
    try:
        with torch.no_grad(), (run.ema.swapped() if run.ema is not None else contextlib.nullcontext()):
            whole = _whole_modules(run, device=run.accelerator.device)
            was_training = {n: m.training for n, m in whole.items()}
            for m in whole.values():
                m.eval()
            try:
                metrics = {k: float(v) for k, v in
                           run.task.evaluate(modules=whole, accelerator=run.accelerator, step=at_step).items()}
            finally:
                for n, m in whole.items():
                    m.train(was_training[n])
                if run.whole is not None:
                    run.whole.release()
    finally:
        restore_rng(rng)
    if run.is_main:
        run.eval_csv.append(at_step, metrics)
        if run.writer is not None:
            for k, v in metrics.items():
                run.writer.add_scalar(f"eval/{k}", v, at_step)
    return metrics


def _save(run: _Run, at_step: int) -> Path:
    """Write checkpoint step_XXXXXXXX (whole modules, optimizer states and EMA, so any process count resumes it)."""
    from accelerate.utils import gather_object

    acc = run.accelerator
    whole = _whole_modules(run, device=torch.device("cpu"))
    optimizers = {k: full_optimizer_state(opt) for k, opt in run.optimizers.items()}
    ema = run.ema.state_dict() if run.ema is not None else {}
    rng = gather_object([capture_rng()])
    state: dict[str, Any] = {"nan_skipped": run.nan_skipped, "num_processes": acc.num_processes,
                             "train_config": to_dict(run.config), "task_config": run.task_config,
                             "lr_plans": [list(p) for p in run.schedule.plans]}
    if run.batches.streamed:
        merged: dict[str, list[int]] = {}
        for positions in gather_object([run.batches.positions]):
            merged.update(positions)
        state.update(stream_positions=merged, stream_layout=run.batches.layout)
    path = checkpoints_dir(run.out_dir) / f"step_{at_step:08d}"
    if run.is_main:
        path = save_checkpoint(
            run.out_dir, step=at_step, modules=whole, optimizers=optimizers,
            schedulers={k: s.state_dict() for k, s in run.schedulers.items()}, ema=ema, rng=rng,
            scaler=acc.scaler.state_dict() if acc.scaler is not None else None, state=state,
            keep_last=run.config.keep_last)
    acc.wait_for_everyone()
    return path


def _log(run: _Run, logs: dict[str, float], *, seconds: float, steps: int, bar: Any) -> None:
    """Record one logged step: metrics.csv, TensorBoard and the progress bar (main process)."""
    logs["samples_per_s"] = steps * run.config.batch_size / max(seconds, 1e-9)
    if run.nan_skipped:
        logs["nan_skipped"] = float(run.nan_skipped)
    run.last_logs = logs
    if not run.is_main:
        return
    run.metrics_csv.append(run.step, logs)
    if run.writer is not None:
        for k, v in logs.items():
            run.writer.add_scalar(k, v, run.step)
    bar.set_postfix({k.split("/")[-1] if k.startswith("loss/") else k: f"{v:.4g}" for k, v in logs.items()
                     if k.startswith(("loss/", "lr/")) or k == "samples_per_s"}, refresh=False)


def _finish(run: _Run, *, seconds: float) -> TrainResult:
    """The final checkpoint, evaluation and artifacts, the merged skip report, and metrics.json (main process)."""
    from accelerate.utils import gather_object

    step = run.step
    final = run.last_ckpt if run.last_ckpt is not None and run.last_ckpt.name == f"step_{step:08d}" else _save(run, step)
    final_eval = _evaluate(run, step)
    artifacts = run.out_dir / "final"
    with torch.no_grad(), (run.ema.swapped() if run.ema is not None else contextlib.nullcontext()):
        whole = _whole_modules(run, device=torch.device("cpu"))
        if run.is_main:
            claim_output_dir(artifacts, kind="final")
            run.task.save_artifacts(modules=whole, out_dir=artifacts)
    skipped = None
    if run.skips is not None:  # each process saw the skips of its own batches
        skipped = SkipReport([s for part in gather_object([run.skips.skips]) for s in part])
    result = TrainResult(step=step, logs=run.last_logs, eval=final_eval, out_dir=run.out_dir, checkpoint=final,
                         artifacts_dir=artifacts, metrics_csv=run.out_dir / "logs" / "metrics.csv",
                         metrics_json=run.out_dir / "metrics.json", main_process=run.is_main)
    if run.is_main:
        report: dict[str, Any] = {"step": step, "eval": final_eval, "logs": run.last_logs,
                                  "artifacts": str(artifacts), "train_seconds": round(seconds, 1),
                                  "mixed_precision": run.accelerator.mixed_precision, "compiled": run.compiled}
        if skipped is not None:
            report["skipped"] = [{"key": s.key, "reason": s.reason} for s in skipped.skips]
            if len(skipped):
                print(skipped.summary())
        report.update(getattr(run.task, "report", lambda result: {})(result))
        atomic_write_bytes(result.metrics_json, json.dumps(report, indent=2).encode())
        if run.writer is not None:
            run.writer.close()
    run.accelerator.wait_for_everyone()
    return result


def train(
    task: Task,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    task_config: dict[str, Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    skips: SkipReport | None = None,
) -> TrainResult:
    """Train `task` on `dataset` for `config.max_steps` optimizer steps; runs unchanged under `accelerate launch`,
    on one process, under DDP or under FSDP2, as the accelerate config says.

    Files under `config.out_dir`: `train_config.yaml`, `task_config.json` (`task_config` as given, e.g. the model
    config), `checkpoints/step_XXXXXXXX/` + `checkpoints/latest`, `logs/metrics.csv`, `logs/eval.csv`,
    `logs/tensorboard/`, `final/` (whatever `task.save_artifacts` writes) and `metrics.json` (final step, eval and
    logs, training time, skipped samples, and what `task.report` adds), written by the main process only.

    The out_dir is claimed as an argen output (OUTPUT_MARKER): a non-empty folder argen did not write is refused.
    `dataset` is map-style (read in one fixed order by global index, `ShardedBatchSampler`) or a streamed
    `argen.train.batches.TrainingStream` (split over processes and DataLoader workers, positions checkpointed).

    resume: continue from the newest checkpoint whose files match the sha256 its state.json records; damaged newer
        ones (and a missing or wrong `latest` pointer) are named in the one line that says where the run resumed.
        On the same process count it is bit-exact (weights, optimizer, LR schedule, EMA, RNG, data position). The
        process count and grad_accum may change (map-style data continues at the same global index; a process
        the checkpoint did not have seeds a new RNG stream), and so may max_steps (LRSchedule says how the LR
        continues). Step dirs of which none verifies raise BadCheckpointError naming the files; no checkpoint at
        all prints a note and starts fresh. Another change of the config (beyond RESUMABLE_CHANGES) or
        task_config raises ResumeMismatchError naming the keys; paths under out_dir compare relative to it, so a
        moved or copied run resumes.
    overwrite: delete the previous run's `checkpoints/`, `logs/` and `final/` (only if argen wrote them) and start
        from step 0. Without resume or overwrite, an out_dir that already holds checkpoints is an error.
    collate_fn: the DataLoader collate function (default: torch's).
    skips: a SkipReport updated with every raw batch; the processes' reports are merged at the end, printed and
        written into metrics.json.

    Raises NonFiniteLossError on a NaN/inf loss (nan_policy="raise"), leaving the last checkpoint as it was.
    Random augmentations inside DataLoader workers (num_workers > 0) resume exactly only if they derive their
    randomness from the sample index; randomness in the main process (training_step) always resumes exactly.
    """
    start = time.perf_counter()
    run = _build(task, dataset, config, task_config=task_config, collate_fn=collate_fn, skips=skips)
    try:
        with _deterministic(run.compiled and run.accelerator.device.type == "cpu"):  # as eager CPU training is
            return _run(run, resume=resume, overwrite=overwrite, start=start)
    finally:
        for hook in run.hooks:
            hook.remove()


def _run(run: _Run, *, resume: bool, overwrite: bool, start: float) -> TrainResult:
    """Open (or resume) the run, train it to max_steps with periodic logs, evaluations and checkpoints, finish it."""
    from tqdm.auto import tqdm

    config = run.config
    found = _open_run_dir(run.out_dir, resume=resume, overwrite=overwrite, accelerator=run.accelerator)
    positions = _resume(run, found) if found is not None and found.path is not None else None
    _open_logs(run)
    describe = getattr(run.task, "describe", None)
    if describe is not None and run.is_main:
        print(describe())

    data = run.batches.from_step(run.step, positions=positions)
    bar = tqdm(total=config.max_steps, initial=run.step, disable=not run.is_main, desc="train", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), run.step
    for opt in run.optimizers.values():
        opt.zero_grad(set_to_none=True)
    while run.step < config.max_steps:
        log_now = (run.step + 1) % config.log_every == 0 or run.step + 1 == config.max_steps
        logs = _train_step(run, data, log_now=log_now)
        bar.update(1)
        if log_now:
            now = time.perf_counter()
            _log(run, logs, seconds=now - t_last, steps=run.step - step_last, bar=bar)
            t_last, step_last = now, run.step
        if config.eval_every and run.step % config.eval_every == 0 and run.step < config.max_steps:
            _evaluate(run, run.step)
        if config.save_every and run.step % config.save_every == 0 and run.step < config.max_steps:
            run.last_ckpt = _save(run, run.step)
    bar.close()
    return _finish(run, seconds=time.perf_counter() - start)


def _nonfinite(losses: dict[str, Tensor], *, accelerator: Any) -> list[str]:
    """Names of losses that are NaN/inf on any process (one device sync per micro-step)."""
    if not losses:
        return []
    flags = torch.stack([(~torch.isfinite(v.detach().float())).any().float() for v in losses.values()])
    if accelerator.num_processes > 1:
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
