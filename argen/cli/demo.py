"""`argen demo`: the main job on the built-in shapes data (see argen/demo.py)."""

from __future__ import annotations

import argparse

from argen.cli.args import positive_int

PREFIXES = ("tokenizer.", "gpt.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tokenizer, BPE and GPT on the built-in shapes world, sample, judge; "
                                    "writes demo/report.md")
    p.add_argument("-o", "--out", default="demo", help="output directory (finished stages in it are reused)")
    p.add_argument("--train-scenes", type=positive_int, default=None,
                   help="training scenes to encode for the GPT (default: DemoSettings.num_train_codes, a little more "
                        "than the GPT draws); raise it with gpt.train.max_steps")
    p.add_argument("--extra-scenes", nargs="*", default=None, metavar="TEMPLATES=N",
                   help="more training scenes of only some caption templates, e.g. relation=30000 or list,relation=20000 "
                        "(default: DemoSettings.extra_train_codes, 40,000 relation scenes); with no value, none")
    p.add_argument("overrides", nargs="*",
                   help="settings of the two experiments, prefixed by which: tokenizer.train.max_steps=1000 "
                        "gpt.train.max_steps=2000 (see the shapes_32 presets in argen/configs/tokenizer and argen/configs/gpt)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if not o.startswith(PREFIXES) or "=" not in o]
    if bad:
        raise SystemExit(f"argen demo: overrides must look like tokenizer.KEY=VALUE or gpt.KEY=VALUE, got {bad}")
    from argen.demo import DemoSettings, run_demo

    split = {p: tuple(o[len(p):] for o in args.overrides if o.startswith(p)) for p in PREFIXES}
    changes = {}
    if args.train_scenes is not None:
        changes["num_train_codes"] = args.train_scenes
    if args.extra_scenes is not None:
        changes["extra_train_codes"] = _extra_scenes(args.extra_scenes)
    settings = DemoSettings(**changes)
    run_demo(args.out, tokenizer_overrides=split["tokenizer."], gpt_overrides=split["gpt."], settings=settings)
    return 0


def _extra_scenes(values: list[str]) -> dict[str, int]:
    from argen.data.shapes import check_templates

    out = {}
    for value in values:
        names, _, count = value.partition("=")
        if "." in names:  # a key.path=value override after the flag: argparse gave it to --extra-scenes
            raise SystemExit(f"argen demo: {value!r} follows --extra-scenes, which took it as TEMPLATES=N; put "
                             "key.path=value overrides before --extra-scenes.")
        try:
            check_templates(tuple(names.split(",")))  # "" is an unknown name here, not "all" as in a dataset spec
            n = int(count)
        except ValueError as e:
            raise SystemExit(f"argen demo: --extra-scenes takes TEMPLATES=N with N >= 1, got {value!r}: {e}") from None
        if n < 1:
            raise SystemExit(f"argen demo: --extra-scenes takes TEMPLATES=N with N >= 1, got {value!r}.")
        out[names] = n
    return out
