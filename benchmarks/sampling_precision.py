"""Does sampling in bf16 (`Pipeline(precision="bf16")`, what `argen sample` runs where bf16 is native) change what a
trained demo GPT draws? For each demo directory: the judge's whole-prompt accuracy on the report's prompts, seeds and
sampler setting, float32 against bf16, with a paired prompt-bootstrap interval, and each one's sampling time; JSON +
markdown + a PNG of the first relation prompts side by side."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from argen.eval.generation import PROMPT_KINDS, judge_images, prompt_set
from argen.eval.stats import PromptBootstrap
from argen.host import host_info
from argen.pipeline import Pipeline
from argen.recipe import RecipeSettings
from argen.sample import SamplingConfig
from argen.viz import contact_sheet, save_png
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir

PRECISIONS = ("fp32", "bf16")


def compare_demo(demo: Path, *, n_boot: int, batch_size: int) -> tuple[dict, list]:
    """Both precisions on one demo's prompts: accuracy, paired difference (bf16 - fp32), seconds, and whether fp32
    reproduces the report's figure (it sampled in float32)."""
    report = json.loads((demo / "report.json").read_text())
    chosen = report["sampling"]
    sampling = SamplingConfig(cfg_scale=chosen["cfg_scale"], cfg_schedule=chosen["cfg_schedule"],
                              temperature=chosen["temperature"], top_k=chosen["top_k"])
    settings = RecipeSettings()
    pipes = {p: Pipeline.load(demo / "gpt_run/final", precision=p) for p in PRECISIONS}
    out: dict = {"demo": str(demo), "sampling": str(sampling), "seed": chosen["seed"], "kinds": {}}
    tiles: list = []
    for kind in PROMPT_KINDS:
        prompts = prompt_set(kind, max_prompts=settings.eval_prompts[kind])
        n = settings.samples_per_prompt[kind]
        verdicts, seconds, codes = {}, {}, {}
        for precision, pipe in pipes.items():
            start = time.perf_counter()
            gen = pipe.generate(prompts, n_per_prompt=n, sampling=sampling, seed=chosen["seed"], batch_size=batch_size)
            seconds[precision] = time.perf_counter() - start
            verdicts[precision] = np.array([j.correct for j in judge_images(gen.prompts, gen.images)], dtype=np.float64)
            codes[precision] = gen.codes
            if kind == "relation":
                tiles.append([(img, f"{precision}: {p}") for img, p in zip(gen.images[:8], gen.prompts[:8])])
        boot = PromptBootstrap([p for p in prompts for _ in range(n)], n_boot=n_boot, seed=0)
        out["kinds"][kind] = {
            "images": len(verdicts["fp32"]),
            "accuracy": {p: boot.mean(v).as_dict() for p, v in verdicts.items()},
            "difference": boot.difference(verdicts["bf16"], verdicts["fp32"]).as_dict(),
            "report_accuracy": report["generation"][kind]["accuracy"],
            "same_codes": float((codes["fp32"] == codes["bf16"]).float().mean()),
            "seconds": seconds,
        }
        k = out["kinds"][kind]
        print(f"{demo} {kind}: fp32 {k['accuracy']['fp32']['estimate']:.1%} (report {k['report_accuracy']:.1%}), "
              f"bf16 {k['accuracy']['bf16']['estimate']:.1%}, difference {k['difference']['estimate'] * 100:+.1f} "
              f"[{k['difference']['low'] * 100:+.1f}, {k['difference']['high'] * 100:+.1f}]; "
              f"{seconds['fp32']:.1f} s vs {seconds['bf16']:.1f} s", flush=True)
    return out, tiles


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "", f"Host: {payload['host']}, torch {payload['torch']}.", "",
             "Whole-prompt judge accuracy of each demo GPT at its report's sampler setting, prompts and seed, sampled in "
             "float32 and in bf16 (`Pipeline.load(dir, precision=...)`). 95% prompt-bootstrap intervals; the "
             "difference bf16 - float32 is paired (same prompts, same row seeds). `same codes`: the share of image "
             "tokens that came out identical.", "",
             "| demo | prompts | float32 (report) | bf16 | bf16 - float32 | same codes | seconds float32 / bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for demo in payload["demos"]:
        for kind, k in demo["kinds"].items():
            a, d = k["accuracy"], k["difference"]
            lines.append(f"| {demo['demo']} | {kind} ({k['images']} images) | {a['fp32']['estimate'] * 100:.1f}% "
                         f"({k['report_accuracy'] * 100:.1f}%) | {a['bf16']['estimate'] * 100:.1f}% | "
                         f"{d['estimate'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}] | "
                         f"{k['same_codes'] * 100:.0f}% | {k['seconds']['fp32']:.1f} / {k['seconds']['bf16']:.1f} |")
    lines += ["", "![first relation prompts: float32 row, then bf16 row, per demo](relation_fp32_bf16.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("demos", type=Path, nargs="+", help="`argen demo -o DIR` output directories")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per GPT batch (the demo's own is 256)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/sampling_precision"))
    args = parser.parse_args(argv)
    command = "python benchmarks/sampling_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = claim_output_dir(args.out, kind="benchmark")
    demos, rows = [], []
    for demo in args.demos:
        result, tiles = compare_demo(demo, n_boot=args.n_boot, batch_size=args.batch_size)
        demos.append(result)
        rows += tiles
    payload = {"command": command, "host": host_info(measure_bf16=False).describe(), "torch": torch.__version__,
               "demos": demos}
    save_png(contact_sheet([img for row in rows for img, _ in row], [label for row in rows for _, label in row],
                           columns=8), out / "relation_fp32_bf16.png")
    atomic_write_bytes(out / "sampling_precision.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "sampling_precision.md", markdown(payload).encode())
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
