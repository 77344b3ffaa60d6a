"""How much of its captions a text-to-image GPT uses, read two ways on the captions `argen eval` draws:

1. The GPT as a classifier. For each real image of the caption set, log p(its codes | caption j) for every caption
   j of the set: does the image's own caption come first (top-1, top-5, median rank)? And the pointwise mutual
   information log p(codes | caption) - log p(codes | empty caption), for its own caption and for the others.
2. The GPT as a reranker. N draws per caption with the pipeline's sampler; the kept one is the draw of highest PMI,
   of highest conditional log-likelihood, or (with --rerank-clip) of highest rerank-CLIP similarity. The judge CLIP
   scores each choice as `argen eval` does (R-precision, CLIP score, image+caption Fréchet distance, 95% intervals).
   `--draws 0` leaves this part out.

    python benchmarks/caption_use.py --pipeline runs/icons_z0/gpt_run/final \
        --dataset imagefolder:/work/data/icons10_64 --judge-clip runs/icons_z0/judge_clip_run/final/clip \
        --rerank-clip runs/icons_z0/rerank_clip_run/final/clip --draws 8 -o OUT

writes OUT/caption_use.json and OUT/caption_use.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from argen.eval.suite import EvalSettings, PairScorer, caption_set
from argen.host import host_info
from argen.layout import SequenceLayout
from argen.pipeline import Pipeline
from argen.rerank import best_of, clip_similarity, load_clip
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir


@torch.no_grad()
def log_likelihood(gpt: torch.nn.Module, layout: SequenceLayout, text_ids: torch.Tensor, codes: torch.Tensor, *,
                   batch_size: int = 128) -> torch.Tensor:
    """log p(codes | caption) in nats, summed over the image tokens: text_ids (N, text_len), codes (N, h*w) -> (N,)."""
    first = layout.prefix_len - 1  # the input position that predicts the first image token
    out = []
    for s in range(0, len(codes), batch_size):
        inputs, targets = layout.split(layout.build(text_ids[s:s + batch_size], codes[s:s + batch_size]))
        out.append(gpt(inputs, logits_from=first, targets=targets[:, first:]).float().sum(dim=1))
    return torch.cat(out)


def classifier(pipe: Pipeline, captions: list[str], images: torch.Tensor) -> dict:
    """The GPT's retrieval of each real image's caption among `captions` by log p(codes | caption)."""
    layout, n = pipe.layout, len(captions)
    codes = pipe.vq.encode(images.to(pipe.device)).flatten(1).cpu()
    text_ids = pipe.text.encode(captions, text_len=layout.prefix_len - 1)
    scores = torch.stack([log_likelihood(pipe.gpt, layout, text_ids[j:j + 1].expand(n, -1), codes)
                          for j in range(n)], dim=1)  # (image, caption)
    uncond = log_likelihood(pipe.gpt, layout, torch.full_like(text_ids, layout.pad_id), codes)
    own = scores.diag()
    rank = (scores > own[:, None]).sum(dim=1).float()  # captions scored above the image's own
    pmi = scores - uncond[:, None]
    return {"images": n, "top1 %": 100 * float((rank == 0).float().mean()), "top5 %": 100 * float((rank < 5).float().mean()),
            "median rank": float(rank.median()) + 1, "pmi own caption (nats)": float(pmi.diag().mean()),
            "pmi other captions (nats)": float((pmi.sum() - pmi.diag().sum()) / (n * n - n))}


def reranker(pipe: Pipeline, scorer: PairScorer, captions: list[str], *, draws: int, seed: int, rerank_clip) -> dict:
    """Best of `draws` per caption by the GPT's PMI, its conditional log-likelihood and the rerank CLIP."""
    layout, n = pipe.layout, len(captions)
    gen = pipe.generate(captions, n_per_prompt=draws, seed=seed, sampling=pipe.sampling)
    text_ids = pipe.text.encode(gen.prompts, text_len=layout.prefix_len - 1)
    cond = log_likelihood(pipe.gpt, layout, text_ids, gen.codes)
    uncond = log_likelihood(pipe.gpt, layout, torch.full_like(text_ids, layout.pad_id), gen.codes)
    scores = {"gpt pmi": (cond - uncond).view(n, draws), "gpt log-likelihood": cond.view(n, draws)}
    if rerank_clip is not None:
        scores["rerank clip"] = clip_similarity(rerank_clip, gen.prompts, gen.images).view(n, draws)
    images = gen.images.unflatten(0, (n, draws))
    own = torch.arange(n)
    rows = {"first draw": scorer.score(images[:, 0], own)}
    for name, s in scores.items():
        for m in sorted({2, draws}):
            rows[f"{name}, best of {m}"] = scorer.score(images[own, best_of(s, m)], own)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", required=True, help="a GPT pipeline directory (gpt_run/final)")
    ap.add_argument("--dataset", required=True, help="the dataset spec it was trained on")
    ap.add_argument("--judge-clip", required=True, help="the judge CLIP directory")
    ap.add_argument("--rerank-clip", help="a CLIP that is not the judge, to rerank by beside the GPT's own scores")
    ap.add_argument("--splits", nargs="+", default=["val"])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--draws", type=int, default=8, help="draws per caption to rerank (0: the classifier only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    if args.draws == 1:
        ap.error("--draws 1 leaves nothing to rerank: give 0 (the classifier only) or at least 2.")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = claim_output_dir(args.out, kind="benchmark")
    pipe = Pipeline.load(args.pipeline)
    pipe.gpt.float().eval()
    judge = load_clip(args.judge_clip)
    rerank_clip = load_clip(args.rerank_clip) if args.rerank_clip else None
    settings = EvalSettings(prompts=args.prompts, seed=args.seed, n_boot=args.n_boot, splits=tuple(args.splits))
    report = {"command": " ".join(["python", *sys.argv]), "host": host_info().describe(), "pipeline": args.pipeline,
              "sampling": str(pipe.sampling), "draws": args.draws, "splits": {}}
    start = time.perf_counter()
    for split in settings.splits:
        cset = caption_set(args.dataset, split, resolution=pipe.vq.config.resolution, settings=settings)
        scorer = PairScorer(judge, cset, settings)
        own = torch.arange(len(cset.captions))
        report["splits"][split] = {
            "gpt as a classifier of real images": classifier(pipe, cset.captions, cset.images),
            "real (ceiling)": scorer.score(cset.images, own),
            "best of N": reranker(pipe, scorer, cset.captions, draws=args.draws, seed=args.seed, rerank_clip=rerank_clip)
            if args.draws else {}}
        print(f"[caption_use] {split} done, {time.perf_counter() - start:.0f} s", flush=True)
    atomic_write_bytes(out / "caption_use.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(out / "caption_use.md", markdown(report).encode())
    print((out / "caption_use.md").read_text())


def markdown(report: dict) -> str:
    def iv(d: dict) -> str:
        return f"{d['estimate']:.3g} [{d['low']:.3g}, {d['high']:.3g}]"

    lines = [f"# How the GPT uses its captions: `{report['pipeline']}`", "", f"`{report['command']}`", "",
             f"Host: {report['host']}. Sampler: {report['sampling']}.", ""]
    for split, row in report["splits"].items():
        c = row["gpt as a classifier of real images"]
        lines += [f"## {split}", "",
                  f"The GPT as a classifier of the {c['images']} real images: own caption first {c['top1 %']:.0f}%, "
                  f"in the top 5 {c['top5 %']:.0f}%, median rank {c['median rank']:.0f}; PMI {c['pmi own caption (nats)']:.2f} "
                  f"nats for the own caption, {c['pmi other captions (nats)']:.2f} for the others.", "",
                  "| images | R-precision % | CLIP score | FD image+caption |", "| --- | --- | --- | --- |"]
        for name, r in [("real (ceiling)", row["real (ceiling)"]), *row["best of N"].items()]:
            lines.append(f"| {name} | {iv(r['r_precision'])} | {iv(r['clip_score'])} | {iv(r['frechet_pairs'])} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
