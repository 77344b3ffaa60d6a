"""`argen demo`: the main job on the built-in shapes data (see argen/demo.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate on the built-in shapes world; writes demo/report.md")
    p.add_argument("-o", "--out", default="demo", help="output directory (finished stages in it are reused)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the tokenizer experiment")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from argen.demo import run_demo

    run_demo(args.out, overrides=tuple(args.overrides))
    return 0
