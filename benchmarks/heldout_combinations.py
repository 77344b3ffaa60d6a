"""Each held-out combination of the shapes world on its own, by the judge: tokenizer reconstructions and GPT samples.

A GPT can only draw what its tokenizer can write: if the codebook has no code for the edge of an orange triangle,
the tokenizer itself turns held-out orange triangles into a seen colour, whatever the GPT does. This scores the
reconstructions of the held-out split's scenes for every tokenizer given, and the images of every pipeline given
(the demo's held-out prompts and images: seed 1, two per prompt, the pipeline's recommended sampler), one row per
held-out colour-shape pair and one for the coloured relations.

    python benchmarks/heldout_combinations.py --tokenizer demo/tokenizer_run/final/tokenizer --pipeline demo/gpt_run/final
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from argen.data.shapes import heldout_pair, parse_caption, render, scene_and_caption
from argen.demo import DemoSettings
from argen.eval.generation import judge_images, prompt_set
from argen.eval.judge import judge
from argen.host import host_info
from tokenizers_img import VQModel


def combination(objects) -> str:
    """The held-out combination that held-out scene or caption objects were built around: "orange triangle", ... or
    "coloured relation"."""
    pair = heldout_pair(objects)
    return " ".join(pair) if pair is not None else "coloured relation"


def _rows(counts: dict[str, list[int]]) -> dict[str, dict]:
    return {k: {"n": n, "correct": ok / n} for k, (n, ok) in sorted(counts.items())}


@torch.no_grad()
def measure(tokenizer: str | Path, *, n: int, resolution: int = 32, batch: int = 250) -> dict[str, dict]:
    """Per combination: scenes (n), and the share whose reconstruction the judge reads as the caption (correct)."""
    vq = VQModel.from_pretrained(tokenizer).eval()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for start in range(0, n, batch):
        items = [scene_and_caption(i, "heldout") for i in range(start, min(n, start + batch))]
        images = torch.from_numpy(np.stack([render(s, resolution) for s, _ in items])).permute(0, 3, 1, 2)
        rec = vq.reconstruct(images.float() / 127.5 - 1)
        for (scene, caption), image in zip(items, rec):
            row = counts[combination(scene.objects)]
            row[0] += 1
            row[1] += judge(caption, image).correct
    return _rows(counts)


def measure_pipeline(pipeline: str | Path, *, prompts: int) -> dict[str, dict]:
    """Per combination: generated images (n) and the share the judge passes (correct), as the demo samples them."""
    from argen.pipeline import Pipeline

    demo = DemoSettings()
    captions = prompt_set("heldout", max_prompts=prompts)
    gen = Pipeline.load(pipeline).generate(captions, n_per_prompt=demo.samples_per_prompt["heldout"],
                                           seed=demo.seed + 1, batch_size=256)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for caption, result in zip(gen.prompts, judge_images(gen.prompts, gen.images)):
        row = counts[combination(parse_caption(caption).objects)]
        row[0] += 1
        row[1] += result.correct
    return _rows(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", action="append", default=[], help="a tokenizer directory (repeatable)")
    ap.add_argument("--pipeline", action="append", default=[], help="a pipeline directory (repeatable)")
    ap.add_argument("--n", type=int, default=600, help="held-out scenes for the tokenizers (the split's first n)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts for the pipelines (default: argen demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.tokenizer and not args.pipeline:
        ap.error("give at least one --tokenizer or --pipeline")
    results = {"tokenizers": {t: measure(t, n=args.n) for t in args.tokenizer},
               "pipelines": {p: measure_pipeline(p, prompts=args.prompts or DemoSettings().eval_prompts["heldout"])
                             for p in args.pipeline}}
    for kind, what in (("tokenizers", "reconstructions the judge reads right"), ("pipelines", "images the judge passes")):
        for name, rows in results[kind].items():
            print(f"{name}: {what}")
            for k, r in rows.items():
                print(f"  {k:20s} {r['n']:4d}  {r['correct']:.1%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "host": str(host_info(measure_bf16=False)),
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
