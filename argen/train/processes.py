"""The processes a job runs on (torchrun or `accelerate launch`, on GPUs or on CPUs), as accelerate sees them."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_multiprocess() -> bool:
    """Whether this is a multi-process launch without CUDA: accelerate then goes multi-process (gloo) only when
    told `cpu=True`, and would otherwise run every process as a lone rank 0."""
    import torch

    return launched_processes() > 1 and not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's PartialState for this job (rank, device, barriers), multi-process on CPUs too. Create it this
    way before any Accelerator: the first one created fixes the process group for the whole process."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_multiprocess())
    if state.num_processes != launched_processes():
        raise RuntimeError(f"launched with WORLD_SIZE={launched_processes()} but accelerate runs {state.num_processes} "
                           f"process(es) ({state.distributed_type}); the processes would work as separate jobs.")
    return state


def end_processes() -> None:
    """Leave the process group at the end of a command, as `Accelerator.end_training` does: gloo and NCCL threads
    still running when the interpreter exits can abort it ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ends_processes(command: Callable[..., T]) -> Callable[..., T]:
    """`command`, then `end_processes()` whatever happens: for CLI commands that may run under `accelerate launch`."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        finally:
            end_processes()

    return run
