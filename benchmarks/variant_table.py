"""One table of GPT variants, each trained on several seeds and each GPT judged on several evaluation seeds.

    python benchmarks/variant_table.py benchmarks/results/icons10_pipeline/gpt_variants/seeds3 \
        --variant a_preset_before=runs/icons_d10_s{S}:runs/ev_icons_d10_s{S}_e{E} --seeds 0 1 2 --eval-seeds 0 1 2

With --variant NAME=GPT_RUN:EVAL_DIR ({S}: the GPT seed, {E}: the evaluation seed), it first copies each GPT run's
metrics.json and each `argen eval` report.json into OUT/NAME/gptS/; without, it reads what OUT already holds. It then
writes OUT/variants.json and OUT/variants.md: per GPT, its val loss with and without the caption and, averaged over
its evaluation seeds, the generated images' R-precision, CLIP score and image+caption Fréchet distance per split
(first draws, and the best of N where the evaluations reranked), with the ceiling and the floor; then the mean and
range over the GPT seeds of each variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

FIGURES = (("r_precision", "R-precision %"), ("clip_score", "CLIP score"), ("frechet_pairs", "FD image+caption"))
ROWS = (("generated", ""), ("reranked", ", best of N"), ("real (ceiling)", ", real images"),
        ("shuffled captions (floor)", ", shuffled captions"))  # "reranked" only where every report has it


def collect(out: Path, spec: str, seeds: list[int], eval_seeds: list[int]) -> None:
    name, _, paths = spec.partition("=")
    gpt, _, evals = paths.partition(":")
    if not (name and gpt and evals):
        raise SystemExit(f"--variant {spec!r}: expected NAME=GPT_RUN:EVAL_DIR with {{S}} and {{E}} placeholders.")
    for s in seeds:
        dest = out / name / f"gpt{s}"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(gpt.format(S=s)) / "metrics.json", dest / "metrics.json")
        for e in eval_seeds:
            shutil.copyfile(Path(evals.format(S=s, E=e)) / "report.json", dest / f"eval_seed{e}.json")


def gpt_record(gpt_dir: Path) -> dict:
    metrics = json.loads((gpt_dir / "metrics.json").read_text())
    reports = [json.loads(p.read_text()) for p in sorted(gpt_dir.glob("eval_seed*.json"))]
    record = {"val_loss": metrics["eval"]["val/loss"], "val_loss_uncond": metrics["eval"].get("val/loss_uncond"),
              "train_seconds": metrics.get("train_seconds"), "eval_seeds": [r["settings"]["seed"] for r in reports],
              "prompts": sorted({r["settings"]["prompts"] for r in reports}), "splits": {}}
    for split in reports[0]["splits"]:
        rows = [r["splits"][split] for r in reports]
        record["splits"][split] = {
            row: {key: statistics.mean(r[row][key]["estimate"] for r in rows) for key, _ in FIGURES}
            for row, _ in ROWS if all(row in r for r in rows)}
        if any("warning" in r for r in rows):
            record["splits"][split]["warning"] = next(r["warning"] for r in rows if "warning" in r)
    return record


def spread(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) + f" (mean {statistics.mean(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--variant", action="append", default=[], help="NAME=GPT_RUN:EVAL_DIR, {S} and {E} placeholders")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    for spec in args.variant:
        collect(args.out, spec, args.seeds, args.eval_seeds)
    variants = {v.name: {g.name: gpt_record(g) for g in sorted(v.glob("gpt*"))} for v in sorted(args.out.iterdir())
                if v.is_dir()}
    if not variants:
        raise SystemExit(f"{args.out} holds no variant folders: give --variant NAME=GPT_RUN:EVAL_DIR.")
    lines = ["Per GPT seed, each figure averaged over its evaluation seeds; generated images are first draws, best of N "
             "the draws a rerank CLIP kept.", "",
             "| figure | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]

    def row(label: str, get, digits: int) -> None:
        cells = []
        for gpts in variants.values():
            values = [get(r) for r in gpts.values()]  # None where a GPT lacks the figure
            cells.append(spread(values, digits) if None not in values else "n/a")
        if all(cell == "n/a" for cell in cells):
            return
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("val loss", lambda r: r["val_loss"], 3)
    row("val loss, empty caption", lambda r: r["val_loss_uncond"], 3)
    splits = next(iter(next(iter(variants.values())).values()))["splits"]
    for split in splits:
        for key, label in FIGURES:
            for name, suffix in ROWS:
                row(f"{split} {label}{suffix}", lambda r, s=split, n=name, k=key: r["splits"][s].get(n, {}).get(k),
                    3 if key == "frechet_pairs" else 1)
    warnings = {w for gpts in variants.values() for r in gpts.values() for s in r["splits"].values()
                if (w := s.get("warning"))}
    lines += [""] + [f"Warning from argen eval: {w}" for w in sorted(warnings)]
    (args.out / "variants.json").write_text(json.dumps(variants, indent=2))
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
