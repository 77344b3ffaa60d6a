"""The `argen` command line: one thin `main(argv)` that dispatches to the command modules."""

from __future__ import annotations

import argparse
import importlib
import linecache
import os
import sys
from pathlib import Path

from argen.cli.args import int_in

# Each module defines `register(subparsers)`, adding its commands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "argen.cli.data",
    "argen.cli.train",
    "argen.cli.tokenize",
    "argen.cli.demo",
    "argen.cli.sample",
    "argen.cli.embed",
    "argen.cli.compare",
    "argen.cli.eval",
    "argen.cli.serve",
    "argen.cli.edit",
)


# Errors at the boundary (a missing file, a config typo, a mismatched checkpoint, a full disk or a denied permission,
# which name their path) print one clear line, not a traceback; ARGEN_TRACEBACK=1 shows the traceback too. A ValueError
# counts only when argen raised it on purpose (see _raised_by_argen): one from Python or a library is a bug to report.
BOUNDARY_ERRORS = (OSError, ValueError)
PACKAGES = tuple(str(Path(importlib.import_module(name).__file__).parent) for name in ("argen", "tokenizers_img"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argen", description="Autoregressive token-based text-to-image generation.")
    parser.add_argument("--threads", type=int_in(1, 1024), default=None,
                        help="CPU threads for torch, before the command: `argen --threads 1 train ...` (default: "
                             "torch's choice; on a CPU shared with other jobs, 1 is often several times faster)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from argen.train.processes import exit_code_after_processes

    return exit_code_after_processes(_run(argv))


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BOUNDARY_ERRORS as err:
        if os.environ.get("ARGEN_TRACEBACK") == "1" or not (isinstance(err, OSError) or _raised_by_argen(err)):
            raise
        print(f"argen {args.command}: error: {err}", file=sys.stderr)
        return 2


def _raised_by_argen(err: BaseException) -> bool:
    """Whether `err` comes from a `raise` statement in argen or tokenizers_img (an input error argen names), rather than
    from Python or a library (an unpacking error, a failed int(), a torch shape check), which deserve a traceback."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not tb.tb_frame.f_code.co_filename.startswith(PACKAGES):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


if __name__ == "__main__":
    sys.exit(main())
