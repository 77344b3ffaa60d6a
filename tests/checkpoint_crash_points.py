"""Crash points inside a checkpoint save for the durability tests; also a script that trains the toy task and
SIGKILLs itself at one of them (tests/test_checkpoint_durability.py)."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any, Callable

import torch
from train_toy_script import ToyData, ToyTask, toy_config

import argen.train.checkpoint as ckpt_mod
import argen.train.loop as loop_mod
import tokenizers_img.serialization as serialization_mod
from argen.train.loop import train

# Each call is two events, entering and leaving it: every stage of a save, from the first weights file to pruning.
TARGETS = (
    (ckpt_mod, "save_model"),
    (ckpt_mod, "save_file"),
    (torch, "save"),
    (ckpt_mod, "_state_checksum"),  # state.json is written right after
    (serialization_mod, "_settle"),  # permissions + fsync of the temp dir
    (serialization_mod, "_move_into_place"),  # the rename that makes the checkpoint visible
    (ckpt_mod, "atomic_write_bytes"),  # the `latest` pointer
    (ckpt_mod, "remove_output"),  # pruning one old checkpoint
    (ckpt_mod, "_prune"),
)


class CrashPoints:
    """Counts the events of the `save`-th checkpoint save of a run (1-based) and calls `crash(label)` at event `at`
    (0-based; None only counts, into `events`)."""

    def __init__(self, *, save: int, at: int | None, crash: Callable[[str], None]) -> None:
        self.save, self.at, self.crash = save, at, crash
        self.saves, self.saving = 0, False
        self.events: list[str] = []
        self.calls: dict[str, int] = {}

    def install(self, set_attr: Callable[[Any, str, Any], None]) -> None:
        real_save = loop_mod.save_checkpoint

        def counting_save(*args: Any, **kwargs: Any) -> Any:
            self.saves, self.saving = self.saves + 1, True
            try:
                return real_save(*args, **kwargs)
            finally:
                self.saving = False

        set_attr(loop_mod, "save_checkpoint", counting_save)
        for module, name in TARGETS:
            set_attr(module, name, self._wrap(getattr(module, name), module, name))

    def _event(self, label: str) -> None:
        self.events.append(label)
        if len(self.events) - 1 == self.at:
            self.crash(label)

    def _wrap(self, fn: Callable[..., Any], module: Any, name: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not self.saving or self.saves != self.save:
                return fn(*args, **kwargs)
            self.calls[name] = self.calls.get(name, 0) + 1
            call = f"{module.__name__.rsplit('.', 1)[-1]}.{name} #{self.calls[name]}"
            self._event(f"before {call}")
            out = fn(*args, **kwargs)
            self._event(f"after {call}")
            return out

        return wrapped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--save", type=int, required=True, help="which checkpoint save of the run to die in (1-based)")
    p.add_argument("--at", type=int, required=True, help="which event of that save to die at (0-based)")
    a = p.parse_args(argv)
    CrashPoints(save=a.save, at=a.at, crash=lambda label: os.kill(os.getpid(), signal.SIGKILL)).install(setattr)
    train(ToyTask(noise=True), ToyData(), toy_config(a.out), task_config={"toy": 1})


if __name__ == "__main__":
    main()
