"""The processes a job runs on (torchrun or `accelerate launch`, on GPUs or on CPUs), as accelerate sees them."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_left_a_process_group = False  # set by end_processes: this process ran in a multi-process group and left it


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
    global _left_a_process_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _left_a_process_group |= dist.get_world_size() > 1
        dist.destroy_process_group()


def exit_code_after_processes(code: int) -> int:
    """`code`, or, in a process that left a multi-process group, exit with it at once without the interpreter's
    teardown. A group that a DistributedDataParallel or FSDP model used stays alive in torch after
    destroy_process_group, and its gloo threads, still running while the C++ globals are destroyed at exit, sometimes
    abort the finished process with SIGABRT: the launcher would then report a completed job as failed."""
    if not _left_a_process_group:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def ends_processes(command: Callable[..., T]) -> Callable[..., T]:
    """`command`, then `end_processes()` whatever happens: for CLI commands that may run under `accelerate launch`."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        finally:
            end_processes()

    return run
