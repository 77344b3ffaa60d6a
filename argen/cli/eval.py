"""`argen eval`: a GPT pipeline judged on a captioned dataset by a separately trained judge CLIP (see argen.eval.suite)."""

from __future__ import annotations

import argparse

from argen.cli.args import add_dataset_options, dataset_options, device, int_in, positive_int, seed
from argen.cli.sample import add_sampler_flags, sampling_from_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="judge a pipeline on a captioned dataset with a judge CLIP: R-precision, CLIP score, "
                                    "Fréchet distances, precision/recall, against real images and shuffled captions")
    p.add_argument("--pipeline", required=True, help="GPT pipeline directory (pipeline.json)")
    p.add_argument("--dataset", required=True, help="shapes | imagefolder:PATH | webdataset:PATTERN (its val split)")
    p.add_argument("--judge-clip", required=True,
                   help="a CLIP trained separately on the train split (argen train clip), never the generator's")
    p.add_argument("--splits", nargs="+", default=None,
                   help="caption splits to score on their own (default: val, and heldout where the dataset has one)")
    p.add_argument("--prompts", type=positive_int, default=200, help="distinct captions per split (default 200)")
    p.add_argument("-n", "--num", type=positive_int, default=1, help="images per caption (default 1)")
    p.add_argument("--reference", type=positive_int, default=1000, help="real reference images per split (default 1000)")
    p.add_argument("--candidates", type=int_in(2), default=100, help="captions ranked for R-precision (default 100)")
    p.add_argument("--rerank", type=int_in(1, 1024), default=1,
                   help="also score the best of N draws per image by --rerank-clip (DALL-E's reranking; default 1: off)")
    p.add_argument("--rerank-clip", default=None,
                   help="the CLIP that reranks: trained separately from the judge (argen train clip ... train.seed=1)")
    p.add_argument("--lpips", default=None, help="LPIPS weights file (python -m tokenizers_img.lpips convert ...)")
    p.add_argument("--n-boot", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("-o", "--out", required=True, help="output directory: report.md, report.json, sample grids")
    add_sampler_flags(p)
    add_dataset_options(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from argen.data.registry import has_heldout
    from argen.eval.suite import RECONSTRUCTED, EvalSettings, evaluate_pipeline
    from argen.pipeline import Pipeline
    from argen.unclip.clip import ClipEncoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    splits = tuple(args.splits or (("val", "heldout") if has_heldout(args.dataset) else ("val",)))
    settings = EvalSettings(prompts=args.prompts, images_per_prompt=args.num, reference=args.reference,
                            candidates=args.candidates, n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size,
                            lpips=args.lpips, splits=splits, rerank=args.rerank)
    pipe = Pipeline.from_pretrained(args.pipeline, device=device, precision=args.precision)
    sampling = sampling_from_flags(args, pipe)
    judge = ClipEncoder.load(args.judge_clip, device=device)
    reranker = ClipEncoder.load(args.rerank_clip, device=device) if args.rerank_clip else None
    report = evaluate_pipeline(pipe, dataset=args.dataset, judge_clip=judge, settings=settings, out=args.out,
                               sampling=sampling, rerank_clip=reranker, **dataset_options(args))
    for split, row in report["splits"].items():
        g, c, f = row["generated"], row["real (ceiling)"], row["shuffled captions (floor)"]
        print(f"{split}: R-precision generated {g['r_precision']['estimate']:.1f}% (real {c['r_precision']['estimate']:.1f}%, "
              f"reconstructed {row[RECONSTRUCTED]['r_precision']['estimate']:.1f}%, "
              f"shuffled {f['r_precision']['estimate']:.1f}%, chance {row['chance r_precision']:.1f}%); "
              f"FD image+caption {g['frechet_pairs']['estimate']:.2f} (real {c['frechet_pairs']['estimate']:.2f}, "
              f"shuffled {f['frechet_pairs']['estimate']:.2f})")
        if "warning" in row:
            print(f"{split}: warning: {row['warning']}")
        if "reranked" in row:
            r = row["reranked"]
            print(f"{split}: best of {args.rerank} by the rerank CLIP: R-precision {r['r_precision']['estimate']:.1f}%, "
                  f"FD image+caption {r['frechet_pairs']['estimate']:.2f}")
    print(f"wrote {args.out}/report.md and report.json")
    return 0
