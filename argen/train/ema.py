"""Exponential moving average of module weights, kept in fp32, swapped in for evaluation and export."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from argen.train.sharding import full_tensor, shard_like


class EMA:
    """Shadow copies of the parameters of some modules, updated as `ema = decay * ema + (1 - decay) * param`.

    The shadow starts equal to the weights at construction (step 0); there is no decay warm-up. Buffers are not
    averaged: `swapped()` leaves the live buffers in place. Shadows are fp32 and live on the parameters' device;
    under FSDP2 each process keeps the shard of the shadow that matches its shard of the weights.
    """

    def __init__(self, modules: dict[str, nn.Module], *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.modules = modules
        self.shadow: dict[str, dict[str, Tensor]] = {
            name: {k: p.detach().float().clone() for k, p in m.named_parameters()} for name, m in modules.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights (call after every optimizer step)."""
        for name, m in self.modules.items():
            shadow = self.shadow[name]
            for k, p in m.named_parameters():
                shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)  # s + (1-d)(p - s) = d s + (1-d) p

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """The shadows, whole (gathered from every process when sharded: then a collective, call it on all)."""
        return {name: {k: full_tensor(t) for k, t in shadow.items()} for name, shadow in self.shadow.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Load whole shadows strictly (module names and parameter names must match), sharded like the weights."""
        if set(state) != set(self.shadow):
            raise ValueError(f"EMA state has modules {sorted(state)}, expected {sorted(self.shadow)}.")
        for name, shadow in self.shadow.items():
            got = state[name]
            if set(got) != set(shadow):
                missing, unexpected = sorted(set(shadow) - set(got)), sorted(set(got) - set(shadow))
                raise ValueError(f"EMA state of '{name}': missing {missing[:8]}, unexpected {unexpected[:8]}.")
            with torch.no_grad():
                for k, t in shadow.items():
                    t.copy_(shard_like(got[k].float(), t))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the modules hold the EMA weights; the training weights come back afterwards."""
        saved: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for name, m in self.modules.items():
                for k, p in m.named_parameters():
                    saved.append((p, p.detach().clone()))
                    p.copy_(self.shadow[name][k])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, data in saved:
                    p.copy_(data)
