"""Argument types for the command line: numbers checked against their range and devices against this machine, so a
bad value is one argparse error line naming the option, never a traceback from deep inside."""

from __future__ import annotations

import argparse
import math
from typing import Callable

from argen.sample import MAX_SEED


def _parse(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        value = _parse(int, text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_range(low, high)}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def float_in(low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> float:
        value = _parse(float, text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a number {_range(low, high)}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low: float, high: float | None) -> str:
    show = lambda x: str(x) if isinstance(x, int) else f"{x:g}"
    return f">= {show(low)}" if high is None else f"in [{show(low)}, {show(high)}]"


positive_int = int_in(1)
seed = int_in(0, MAX_SEED)
fraction = float_in(0.0, 1.0)


def device(text: str) -> str:
    """An argparse type: a torch device this machine has ("cpu", "cuda", "cuda:N", "mps"), returned as given."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} "
                                             "CUDA device(s), numbered from 0")
        return text
    if dev.type == "mps" and torch.backends.mps.is_available():
        return text
    raise argparse.ArgumentTypeError(f"device {text!r} is not available to argen here: use cpu, cuda or cuda:N")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """The options that widen what a dataset spec may read: each off unless given on the command line."""
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="image folders: read symlinks that lead outside the folder (refused by default)")
    parser.add_argument("--strict-metadata", action="store_true",
                        help="image folders: refuse the folder on a bad metadata.jsonl line (default: skip and name it)")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="webdataset: run `pipe:CMD` shard commands in a shell (refused by default: trust the spec)")


def dataset_options(args: argparse.Namespace) -> dict[str, bool]:
    """`build_dataset` / `dataset_captions` keyword arguments from `add_dataset_options`."""
    return {"follow_symlinks": args.follow_symlinks, "strict": args.strict_metadata, "allow_pipe": args.allow_pipe}
