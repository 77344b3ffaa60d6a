"""`argen data preview` (captioned contact sheet of a dataset) and `argen data judge` (score a folder of images)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from argen.cli.args import add_dataset_options, dataset_options, float_in, int_in, seed
from argen.data.skips import printable
from argen.viz import contact_sheet, save_png
from tokenizers_img.serialization import write_marked_json, write_marked_markdown


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect datasets and score generated images")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("preview", help="write a captioned contact sheet PNG of a dataset")
    p.add_argument("--dataset", required=True, help="shapes | imagefolder:PATH | webdataset:PATTERN")
    p.add_argument("--split", default="train", help="train | val | heldout (shapes, an image folder's heldout/, held-out shards) | all (real data)")
    p.add_argument("--resolution", type=int_in(8, 4096), default=64)
    p.add_argument("-n", type=int_in(1, 4096), default=16, help="number of images")
    p.add_argument("--seed", type=seed, default=0, help="shapes seed, and which items a folder preview shows")
    p.add_argument("--val-fraction", type=float_in(0.0, 0.99), default=0.05)
    p.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    add_dataset_options(p)
    p.set_defaults(func=preview_main)

    j = sub.add_parser("judge", help="score a folder of images against their captions with the shapes judge")
    j.add_argument("--images", required=True, type=Path, help="folder of images + metadata.jsonl or sidecar .txt")
    j.add_argument("-o", "--output", type=Path, default=None, help="folder for judge.json and judge.md (default: --images)")
    j.set_defaults(func=judge_main)


# ---------------------------------------------------------------- preview

def preview_main(args: argparse.Namespace) -> int:
    from argen.data.registry import build_dataset
    from argen.data.skips import DatasetError, SkipReport

    try:
        ds = build_dataset(args.dataset, split=args.split, resolution=args.resolution, seed=args.seed,
                           val_fraction=args.val_fraction, **dataset_options(args))
    except (ValueError, ImportError) as err:  # DatasetError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = SkipReport.for_dataset(ds)
    items: list[dict[str, Any]] = []
    try:
        if isinstance(ds, IterableDataset):
            for item in ds:
                report.update(item)
                items.append(item)
                if len(items) == args.n:
                    break
        else:
            # A random sample of indices; an undecodable file is replaced by its successor, which may
            # already be shown, so keep going until n distinct items (or the dataset runs out).
            g = torch.Generator().manual_seed(args.seed)
            shown: set[str] = set()
            for i in torch.randperm(len(ds), generator=g).tolist():
                item = ds[i]
                report.update(item)
                if item["key"] not in shown:
                    shown.add(item["key"])
                    items.append(item)
                if len(items) == args.n:
                    break
            items.sort(key=lambda it: it["key"])
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not items:
        print(f"error: dataset {args.dataset!r} split {args.split!r} yielded no items", file=sys.stderr)
        print(report.summary())
        return 1
    save_png(contact_sheet([it["image"] for it in items], [it["caption"] for it in items]), args.output)
    print(f"wrote {args.output} ({len(items)} images at {args.resolution}px from {args.dataset}, split {args.split})")
    print(report.summary())
    return 0


# ---------------------------------------------------------------- judge

def judge_folder(folder: Path) -> dict[str, Any]:
    """Score every captioned image in `folder` with the shapes judge at its native size; JSON-ready results."""
    from argen.data.imagefolder import index_folder
    from argen.data.transforms import ImageDecodeError, load_image
    from argen.eval.judge import judge

    index = index_folder(folder)
    rows: list[dict[str, Any]] = []
    attr: dict[str, list[int]] = {}  # name -> [correct, total]
    for f in index.files:
        row: dict[str, Any] = {"file": f.key, "caption": f.caption}
        try:
            image = np.asarray(load_image(f.path, name=f.key))  # (H, W, 3) uint8, native size
            result = judge(f.caption, image)
        except ImageDecodeError as err:
            row["error"] = err.reason
        except (ValueError, LookupError) as err:  # e.g. a caption word the judge does not know
            row["error"] = f"{type(err).__name__}: {err}"
        else:
            row.update(correct=bool(result.correct), attributes=dict(result.attributes),
                       reason=str(getattr(result, "reason", "")))
            for name, ok in result.attributes.items():
                if ok is not None:
                    c = attr.setdefault(name, [0, 0])
                    c[0] += bool(ok)
                    c[1] += 1
        rows.append(row)
    scored = [r for r in rows if "error" not in r]
    n_correct = sum(r["correct"] for r in scored)
    totals = {
        "images": len(rows),
        "scored": len(scored),
        "errors": len(rows) - len(scored),
        "skipped": len(index.skips),
        "correct": n_correct,
        "accuracy": n_correct / len(scored) if scored else None,
        "attributes": {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(attr.items())},
    }
    return {
        "folder": str(index.root),
        "totals": totals,
        "images": rows,
        "skipped": [{"file": s.key, "reason": s.reason} for s in index.skips],
    }


def judge_markdown(res: dict[str, Any]) -> str:
    t = res["totals"]
    acc = "n/a" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
    lines = [
        f"# Judge: {printable(res['folder'])}", "",
        f"{t['scored']} images scored, {t['errors']} errors, {t['skipped']} skipped.", "",
        "| measure | accuracy | correct | total |", "| --- | ---: | ---: | ---: |",
        f"| whole prompt | {acc} | {t['correct']} | {t['scored']} |",
    ]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['correct']} | {v['total']} |" for k, v in t["attributes"].items()]
    errors = [r for r in res["images"] if "error" in r]
    if errors:
        lines += ["", "## Errors", ""] + [f"- `{printable(r['file'])}`: {r['error']}" for r in errors]
    if res["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{printable(s['file'])}`: {s['reason']}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def judge_main(args: argparse.Namespace) -> int:
    from argen.data.skips import DatasetError

    try:
        res = judge_folder(args.images)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output or args.images
    md = judge_markdown(res)
    out.mkdir(parents=True, exist_ok=True)
    write_marked_json(out / "judge.json", res)  # beside the user's images: never over a file argen did not write
    write_marked_markdown(out / "judge.md", md)
    print(md, end="")
    print(f"wrote {out / 'judge.json'} and {out / 'judge.md'}")
    return 0
