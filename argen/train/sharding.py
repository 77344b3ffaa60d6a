"""Full (unsharded) state of FSDP2-sharded modules, optimizers and EMA shadows, so that checkpoints, evaluation and
exports are the same whatever the process count and whether accelerate sharded the run.

Under FSDP2 (`fully_shard`, which accelerate applies when its config says so) each parameter is a DTensor holding
this process's shard. Gathering one is a collective: every process must call these functions on the same tensors in
the same order. On unsharded tensors they do nothing, so callers need no branch for single-process or DDP runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (a shard of a tensor spread over processes)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is sharded across processes (FSDP2)."""
    return any(is_dtensor(p) for p in module.parameters())


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, detached: gathered from every process when `t` is a shard (a collective), else `t` itself."""
    return t.detach().full_tensor() if is_dtensor(t) else t.detach()


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (the whole tensor, the same on every process) cut into this process's shard the way `like` is
    sharded; `full` itself on `like`'s device when `like` is not a shard. No communication: each process cuts its own."""
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not match {tuple(like.shape)}.")
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with every shard gathered (call on all processes when the module is sharded)."""
    return {k: full_tensor(v) for k, v in module.state_dict().items()}


@torch.no_grad()
def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full (unsharded) state dict into `module`, sharded or not, strictly: every key must match."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=True)
        return
    own = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the module: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    for k, t in own.items():
        src = state[k].to(t.dtype)
        if is_dtensor(t):
            t.copy_(shard_like(src, t))
        else:
            t.copy_(src.to(t.device))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded state gathered: the format a 1-process run saves, keyed by parameter index."""
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: full_tensor(v) if isinstance(v, Tensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state dict (as `full_optimizer_state` returns it) into an optimizer over sharded or
    unsharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = copy.copy(state)
    local["state"] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        local["state"][i] = {k: shard_like(v.to(p.dtype) if v.is_floating_point() else v, p)
                             if isinstance(v, Tensor) and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict(local)


def output_nodes(out: Any) -> list[Any]:
    """The autograd nodes of the tensors in a module's output (tensors, tuples, lists, dicts, dataclasses)."""
    if isinstance(out, Tensor):
        return [out.grad_fn] if out.grad_fn is not None else []
    if isinstance(out, (tuple, list)):
        return [fn for x in out for fn in output_nodes(x)]
    if isinstance(out, dict):
        return [fn for x in out.values() for fn in output_nodes(x)]
    if hasattr(out, "__dataclass_fields__"):
        return [fn for name in out.__dataclass_fields__ for fn in output_nodes(getattr(out, name))]
    return []


def graph_reaches(loss: Tensor, nodes: set[Any]) -> bool:
    """Whether the autograd graph of `loss` contains any of `nodes` (under FSDP2, whether a loss would change the
    gradients of the module whose outputs they are)."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        if fn in nodes:
            return True
        seen.add(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


class FullCopies:
    """Unsharded copies of sharded modules, for what needs a whole module on every process: `evaluate`,
    `save_artifacts` and checkpoint files.

    The copies are made (on the CPU) before the modules are sharded and refreshed from them on each `get`, a
    collective. Modules that are not sharded are returned as they are.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.copies = {n: copy.deepcopy(m).to("cpu") for n, m in modules.items()}

    def get(self, modules: dict[str, nn.Module], *, device: torch.device) -> dict[str, nn.Module]:
        """Every module whole: sharded ones gathered into their copies (moved to `device`), the others as they are."""
        out: dict[str, nn.Module] = {}
        for name, m in modules.items():
            if name not in self.copies or not is_sharded(m):
                out[name] = m
                continue
            plain = self.copies[name].to(device)
            plain.load_state_dict(full_state_dict(m), strict=True)
            plain.train(m.training)
            out[name] = plain
        return out

    def release(self) -> None:
        """Move the copies back to the CPU (after evaluation on an accelerator)."""
        for m in self.copies.values():
            m.to("cpu")
