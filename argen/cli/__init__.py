"""The `argen` command line: one thin `main(argv)` that dispatches to the command modules."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, adding its commands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "argen.cli.data",
    "argen.cli.train",
    "argen.cli.tokenize",
    "argen.cli.demo",
    "argen.cli.sample",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argen", description="Autoregressive token-based text-to-image generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
