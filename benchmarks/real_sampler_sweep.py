"""Sweep the GPT sampler's settings on a captioned dataset, judged by a separately trained CLIP: R-precision, CLIP
score and image+caption Fréchet distance of the generated images per setting, beside the real images (the ceiling)
and the real images under shuffled captions (the floor), with bootstrap intervals.

Choose a setting on one split and report it on another, so the choice does not fit the figures it is judged by:

    python benchmarks/real_sampler_sweep.py --pipeline runs/icons_s0/gpt_run/final \
        --dataset imagefolder:/work/data/icons10_64 --judge-clip runs/icons_s0/judge_clip_run/final/clip \
        --splits heldout val --cfg 1 2 3 5 --temperature 1.0 -o OUT

writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png (R-precision and FD against the guidance scale, per split).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from argen.eval.suite import EvalSettings, PairScorer, caption_set, shuffled
from argen.host import host_info
from argen.pipeline import Pipeline
from argen.sample import SamplingConfig
from argen.unclip.clip import ClipEncoder
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir

FIGURES = ("r_precision", "clip_score", "frechet_pairs")


def sweep(pipe: Pipeline, judge, *, dataset: str, settings: EvalSettings, configs: list[SamplingConfig]) -> dict:
    """Per split: the ceiling and floor once, then the generated images' figures under each sampler config."""
    out = {}
    for split in settings.splits:
        cset = caption_set(dataset, split, resolution=pipe.vq.config.resolution, settings=settings)
        scorer = PairScorer(judge, cset, settings)
        own = torch.arange(len(cset.captions))
        rows = {"real (ceiling)": scorer.score(cset.images, own),
                "shuffled captions (floor)": scorer.score(cset.images, shuffled(len(own), seed=settings.seed),
                                                          true_index=own)}
        for config in configs:
            start = time.perf_counter()
            gen = pipe.generate(cset.captions, n_per_prompt=1, seed=settings.seed, sampling=config,
                                batch_size=settings.batch_size)
            rows[label(config)] = {**scorer.score(gen.images, own), "seconds": time.perf_counter() - start}
            r = rows[label(config)]["r_precision"]
            print(f"{split} {label(config)}: R-precision {r['estimate']:.1f}% [{r['low']:.1f}, {r['high']:.1f}], "
                  f"FD pairs {rows[label(config)]['frechet_pairs']['estimate']:.3f}", flush=True)
        out[split] = {"candidates": min(settings.candidates, len(cset.captions)), "rows": rows}
    return out


def label(config: SamplingConfig) -> str:
    top = f", top-k {config.top_k}" if config.top_k else ""
    return f"cfg {config.cfg_scale:g}{' linear' if config.cfg_schedule == 'linear' else ''}, T {config.temperature:g}{top}"


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "", f"Host: {payload['host']}", ""]
    for split, block in payload["splits"].items():
        lines += [f"### {split} ({block['candidates']} candidate captions; chance {100 / block['candidates']:.1f}%)", "",
                  "| images | R-precision % | CLIP score | FD image+caption |", "| --- | --- | --- | --- |"]
        for name, row in block["rows"].items():
            cells = [f"{row[f]['estimate']:.{1 if f != 'frechet_pairs' else 3}f} [{row[f]['low']:.{1 if f != 'frechet_pairs' else 3}f}, "
                     f"{row[f]['high']:.{1 if f != 'frechet_pairs' else 3}f}]" for f in FIGURES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, block in payload["splits"].items():
        rows = {k: v for k, v in block["rows"].items() if k.startswith("cfg")}
        for ax, figure, title in zip(axes, ("r_precision", "frechet_pairs"), ("R-precision %", "FD image+caption")):
            xs = range(len(rows))
            line = ax.errorbar(xs, [r[figure]["estimate"] for r in rows.values()],
                               yerr=[[r[figure]["estimate"] - r[figure]["low"] for r in rows.values()],
                                     [r[figure]["high"] - r[figure]["estimate"] for r in rows.values()]],
                               marker="o", capsize=3, label=f"{split} generated")
            for name, style in (("real (ceiling)", "--"), ("shuffled captions (floor)", ":")):
                ax.axhline(block["rows"][name][figure]["estimate"], color=line[0].get_color(), linestyle=style,
                           label=f"{split} {name}")
            ax.set_xticks(list(xs), list(rows), rotation=30, ha="right", fontsize=7)
            ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--judge-clip", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["heldout", "val"])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--schedule", choices=["constant", "linear"], default="constant")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    parser.add_argument("--top-k", type=int, nargs="+", default=[0], help="0 keeps all codes")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--reference", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = claim_output_dir(args.out, kind="benchmark")
    configs = [SamplingConfig(cfg_scale=c, cfg_schedule=args.schedule, temperature=t, top_k=k or None)
               for c, t, k in itertools.product(args.cfg, args.temperature, args.top_k)]
    settings = EvalSettings(prompts=args.prompts, reference=args.reference, seed=args.seed, splits=tuple(args.splits))
    pipe = Pipeline.from_pretrained(args.pipeline)
    judge = ClipEncoder.load(args.judge_clip)
    payload = {"command": "python benchmarks/real_sampler_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "host": host_info(measure_bf16=False).describe(), "pipeline": str(args.pipeline),
               "settings": {"prompts": args.prompts, "reference": args.reference, "seed": args.seed},
               "splits": sweep(pipe, judge, dataset=args.dataset, settings=settings, configs=configs)}
    atomic_write_bytes(out / "sweep.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "sweep.md", markdown(payload).encode())
    plot(payload, out / "sweep.png")
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
