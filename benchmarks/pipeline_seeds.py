"""Collect the report.json of several `argen train pipeline` runs (seeds of one recipe) into one JSON and one table.

    python benchmarks/pipeline_seeds.py runs/icons10_s0 runs/icons10_s1 runs/icons10_s2 \
        -o benchmarks/results/icons10_pipeline/seeds

writes seeds.json (per run: GPT seed, val loss, timings, host, and every argen.eval figure of every split with its
interval) and seeds.md (R-precision, CLIP score and image+caption Fréchet distance per split, with the spread over
runs), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from argen.eval.suite import ROWS

FIGURES = ("r_precision", "clip_score", "frechet_images", "frechet_pairs", "precision", "recall")


def run_record(run: Path) -> dict:
    """The figures of one pipeline run directory (its report.json)."""
    report = json.loads((run / "report.json").read_text())
    train = yaml.safe_load((run / "gpt_run" / "train_config.yaml").read_text())
    record = {"run": str(run), "gpt_seed": train["seed"], "gpt_steps": report["gpt"]["steps"],
              "gpt_val_loss": report["gpt"]["eval"]["val/loss"],
              "gpt_val_loss_uncond": report["gpt"]["eval"].get("val/loss_uncond"),
              "total_s": report["total_s"], "timings_s": report["timings_s"], "host": report["host"],
              "sampling": report["eval"]["sampling"], "splits": {}}
    for split, row in report["eval"]["splits"].items():
        record["splits"][split] = {name: {k: row[name][k] for k in FIGURES} for name in ROWS if name in row}
        record["splits"][split]["candidates"] = row["candidates"]
        if "reranked r_precision gain" in row:
            record["splits"][split]["reranked r_precision gain"] = row["reranked r_precision gain"]
    return record


def _cell(values: list[float]) -> str:
    spread = f" (range {max(values) - min(values):.1f})" if len(values) > 1 else ""
    return " / ".join(f"{v:.1f}" for v in values) + spread


def table(records: list[dict]) -> str:
    """Markdown: one line per split and kind of image, the runs' estimates side by side."""
    seeds = " / ".join(f"seed {r['gpt_seed']}" for r in records)
    lines = [f"| split | images | R-precision % ({seeds}) | CLIP score | FD image+caption |",
             "| --- | --- | --- | --- | --- |"]
    for split in records[0]["splits"]:
        for name in (n for n in ROWS if all(n in r["splits"][split] for r in records)):
            cells = [_cell([r["splits"][split][name][f]["estimate"] for r in records])
                     for f in ("r_precision", "clip_score")]
            fd = " / ".join(f"{r['splits'][split][name]['frechet_pairs']['estimate']:.3f}" for r in records)
            lines.append(f"| {split} | {name} | {cells[0]} | {cells[1]} | {fd} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="pipeline output directories (each with report.json)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "report.json").is_file()]
    if missing:
        print(f"error: no report.json in {', '.join(missing)}: run argen train pipeline there first.", file=sys.stderr)
        return 2
    records = [run_record(r) for r in args.runs]
    text = table(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/pipeline_seeds.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": records}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"`{command}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
