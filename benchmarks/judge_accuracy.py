"""Measure the shapes judge: clean, degraded and deliberately wrong renders at every resolution; write JSON + markdown."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from argen.data.shapes import RESOLUTIONS, parse_caption, render, scene_and_caption
from argen.eval.judge import CORRUPTIONS, corrupt_scene, degrade, judge
from tokenizers_img.serialization import atomic_write_bytes


def measure(*, n: int, split: str, seed: int, resolutions: tuple[int, ...]) -> dict:
    """Per resolution: accuracy on clean and degraded renders of the caption's own scene, and the rejection
    rate of images rendered from a scene corrupted by each kind (over the items where that kind applies)."""
    rows = {}
    for res in resolutions:
        generator = np.random.default_rng([seed, res])
        counts = {"clean": [0, 0], "degraded": [0, 0]} | {f"wrong_{k}": [0, 0] for k in CORRUPTIONS}
        counts["wrong_degraded"] = [0, 0]
        failures: list[str] = []
        start = time.perf_counter()
        for i in range(n):
            scene, caption = scene_and_caption(i, split, seed=seed)
            spec = parse_caption(caption)
            image = render(scene, res)
            for name, img in (("clean", image), ("degraded", degrade(image, generator=generator))):
                result = judge(caption, img)
                counts[name][0] += result.correct
                counts[name][1] += 1
                if not result.correct and len(failures) < 10:
                    failures.append(f"{name} {res}px #{i} '{caption}': {result.reason}")
            for kind in CORRUPTIONS:
                wrong = corrupt_scene(scene, spec, kind=kind, generator=generator)
                if wrong is None:
                    continue
                wrong_image = render(wrong, res)
                for name, img in ((f"wrong_{kind}", wrong_image),
                                  ("wrong_degraded", degrade(wrong_image, generator=generator))):
                    result = judge(caption, img)
                    counts[name][0] += not result.correct
                    counts[name][1] += 1
                    if result.correct and len(failures) < 10:
                        failures.append(f"{name} ({kind}) {res}px #{i} '{caption}' accepted; image: {wrong.describe()}")
        rows[str(res)] = {
            name: {"rate": ok / total if total else None, "n": total} for name, (ok, total) in counts.items()
        } | {"seconds": time.perf_counter() - start, "failures": failures}
    return rows


def to_markdown(rows: dict, *, command: str) -> str:
    names = [k for k in next(iter(rows.values())) if k not in ("seconds", "failures")]
    head = "| resolution | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 1)]
    for res, row in rows.items():
        cells = [f"{row[k]['rate'] * 100:.2f}% (n={row[k]['n']})" if row[k]["rate"] is not None else "n/a"
                 for k in names]
        lines.append(f"| {res} | " + " | ".join(cells) + " |")
    note = ("clean/degraded: whole-prompt accuracy on renders of the caption's own scene (degraded: "
            "`argen.eval.judge.degrade`). wrong_*: rate at which the judge rejects a render of a scene "
            "corrupted by that kind, over the items where the caption states something that kind can break. "
            "wrong_degraded: the same wrong renders of every kind, passed through `degrade` first.")
    return "\n".join([f"Command: `{command}`", "", *lines, "", note, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="scenes per resolution")
    parser.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/judge"))
    args = parser.parse_args(argv)
    command = "python benchmarks/judge_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = measure(n=args.n, split=args.split, seed=args.seed, resolutions=tuple(args.resolutions))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "n": args.n, "split": args.split, "seed": args.seed, "results": rows}
    for name, text in (("judge.json", json.dumps(payload, indent=2)), ("judge.md", to_markdown(rows, command=command))):
        atomic_write_bytes(args.out / name, text.encode())
    print(to_markdown(rows, command=command))
    for row in rows.values():
        for line in row["failures"]:
            print("FAIL", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
