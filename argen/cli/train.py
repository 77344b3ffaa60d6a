"""`argen train MODEL ...`: tokenizer, GPT, CLIP, prior and decoder experiments from YAML through the shared loop, and the
BPE text tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from argen.cli.args import add_dataset_options, dataset_options, float_in, int_in, positive_int, seed
from argen.configs import resolve as resolve_config
from argen.train.processes import ends_processes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    models = p.add_subparsers(dest="model", metavar="MODEL")
    t = models.add_parser("tokenizer", help="train a VQ-VAE / VQGAN image tokenizer")
    t.add_argument("config", help="YAML experiment, or a shipped preset: shapes_32, shapes_32_conv, real_64, real_256, ...")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=2000 optimizer.lr=3e-4")
    _add_run_flags(t)
    t.set_defaults(func=run_train_tokenizer)

    g = models.add_parser("gpt", help="train the image-token GPT on pre-extracted code shards (see `argen tokenize`)")
    g.add_argument("config", help="YAML experiment, or a shipped preset: shapes_32, gpu_100m, gpu_300m")
    g.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=2000 model.n_layer=4")
    _add_run_flags(g)
    g.set_defaults(func=run_train_gpt)

    c = models.add_parser("clip", help="train a small CLIP (contrastive) on a captioned dataset, with val retrieval")
    c.add_argument("config", help="YAML experiment, or a shipped preset: shapes_clip, shapes_judge_clip")
    c.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=600 model.vision.layers=4")
    _add_run_flags(c)
    c.set_defaults(func=run_train_clip)

    pr = models.add_parser("prior", help="train a unCLIP prior (text -> CLIP image embedding): diffusion or AR")
    pr.add_argument("config", help="YAML experiment whose `kind` is diffusion or ar, or a shipped preset: shapes_prior_diffusion, shapes_prior_ar")
    pr.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=2000")
    _add_run_flags(pr)
    pr.set_defaults(func=run_train_prior)

    d = models.add_parser("decoder", help="train the unCLIP diffusion decoder (CLIP image embedding -> image)")
    d.add_argument("config", help="YAML experiment, or a shipped preset: shapes_decoder")
    d.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=2000")
    _add_run_flags(d)
    d.set_defaults(func=run_train_decoder)

    u = models.add_parser("unclip", help="train the whole unCLIP stack on shapes (the argen/configs/unclip/shapes_*.yaml presets): CLIP, "
                          "embeddings, both priors, decoder, judge CLIP, pipeline; finished stages are reused")
    u.add_argument("-o", "--out", default="runs/unclip_stack", help="output directory (default runs/unclip_stack)")
    u.add_argument("overrides", nargs="*", help="STAGE.key.path=value, STAGE one of clip, prior_diffusion, prior_ar, "
                   "decoder, judge_clip; e.g. decoder.train.max_steps=500")
    u.set_defaults(func=run_train_unclip)

    pl = models.add_parser("pipeline", help="every stage from a captioned dataset to a trained, evaluated pipeline: image "
                           "tokenizer, codes, BPE, GPT, judge CLIP, samples, evaluation; finished stages are reused")
    pl.add_argument("--dataset", required=True, help="shapes | imagefolder:PATH | webdataset:PATTERN")
    pl.add_argument("--resolution", type=int_in(8), required=True,
                    help="image side in pixels: 32, 64, 128 or 256 choose the presets (see argen/recipe.py)")
    pl.add_argument("-o", "--out", required=True, help="output directory (finished stages in it are reused)")
    pl.add_argument("--tokenizer-config", default=None, help="YAML or preset replacing the resolution's tokenizer preset")
    pl.add_argument("--gpt-config", default=None, help="YAML or preset replacing the resolution's GPT preset")
    pl.add_argument("--clip-config", default=None, help="YAML or preset replacing the resolution's judge-CLIP preset")
    pl.add_argument("--train-items", type=positive_int, default=None,
                    help="encode at most this many training items for the GPT (default: the whole train split)")
    pl.add_argument("--val-fraction", type=float_in(0.0, 0.99), default=0.05,
                    help="image folders and shards: share of files in val (default 0.05)")
    pl.add_argument("--no-judge-clip", action="store_true", help="skip the judge CLIP and the argen.eval suite")
    pl.add_argument("--eval-prompts", type=positive_int, default=200, help="val captions evaluated (default 200)")
    pl.add_argument("--eval-reference", type=positive_int, default=1000,
                    help="further real val images the distances compare with (default 1000)")
    pl.add_argument("--rerank", type=int_in(1, 1024), default=1,
                    help="also train a rerank CLIP (the judge's preset, another seed) and score the best of N draws "
                         "per caption beside the first draws (DALL-E's reranking; default 1: off)")
    pl.add_argument("overrides", nargs="*", help="tokenizer.KEY=VALUE, gpt.KEY=VALUE, clip.KEY=VALUE, e.g. "
                    "gpt.train.max_steps=2000 tokenizer.loss.perceptual_weight=0")
    add_dataset_options(pl)
    pl.set_defaults(func=run_train_pipeline)

    b = models.add_parser("text-tokenizer", help="train a byte-level BPE caption tokenizer; writes DIR/tokenizer.json")
    b.add_argument("--dataset", default="shapes",
                   help="shapes | imagefolder:PATH | webdataset:PATTERN | codes:DIR (a code shard's captions)")
    b.add_argument("--split", default="train")
    b.add_argument("--limit", type=positive_int, default=100_000, help="train on at most this many captions (default 100000)")
    b.add_argument("--vocab-size", type=int_in(16, 1 << 20), default=512, help="upper bound on the vocabulary, specials included")
    b.add_argument("--min-frequency", type=positive_int, default=2, help="a merge must occur at least this often")
    case = b.add_mutually_exclusive_group()
    case.add_argument("--lowercase", action="store_true",
                      help="lowercase captions (and every prompt encoded later); the default keeps case")
    case.add_argument("--keep-case", action="store_true", help=argparse.SUPPRESS)  # the default since case is kept
    b.add_argument("--val-fraction", type=float_in(0.0, 0.99), default=0.05,
                   help="image folders and shards: share of files in val (default 0.05); use the training run's value")
    b.add_argument("--seed", type=seed, default=0, help="shapes scene seed")
    b.add_argument("-o", "--out", required=True, help="output directory")
    add_dataset_options(b)
    b.set_defaults(func=run_train_text_tokenizer)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in train.out_dir that verifies")
    which.add_argument("--overwrite", action="store_true",
                       help="delete the previous run's checkpoints/, logs/ and final/ in train.out_dir and start over")


@ends_processes
def run_train_tokenizer(args: argparse.Namespace) -> int:
    from argen.tasks.tokenizer import (
        TOKENIZER_DIR,
        TokenizerExperiment,
        train_tokenizer,
    )
    from tokenizers_img.config import load_config

    experiment = load_config(resolve_config("tokenizer", args.config), TokenizerExperiment, args.overrides)
    result = train_tokenizer(experiment, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:  # under torchrun / accelerate launch, one process reports
        return 0
    print(json.dumps(result.eval, indent=2))
    print(f"tokenizer saved to {result.artifacts_dir / TOKENIZER_DIR}; metrics in {Path(experiment.train.out_dir) / 'metrics.json'}")
    return 0


@ends_processes
def run_train_gpt(args: argparse.Namespace) -> int:
    from argen.tasks.gpt import GPT_DIR, GPTExperiment, train_gpt
    from tokenizers_img.config import load_config

    experiment = load_config(resolve_config("gpt", args.config), GPTExperiment, args.overrides)
    result = train_gpt(experiment, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:  # under torchrun / accelerate launch, one process reports
        return 0
    print(json.dumps(result.eval, indent=2))
    final = result.artifacts_dir
    if experiment.data.vq_tokenizer is not None:
        print(f"pipeline saved to {final}: sample with `argen sample --pipeline {final} \"a red circle\" -o grid.png`")
    else:
        print(f"GPT saved to {final / GPT_DIR} with {final / 'tokenizer.json'}; set data.vq_tokenizer (or use "
              "argen.pipeline.build_pipeline) to make a pipeline for `argen sample`")
    return 0


@ends_processes
def run_train_clip(args: argparse.Namespace) -> int:
    from argen.tasks.clip import CLIP_DIR, CLIPExperiment, train_clip
    from tokenizers_img.config import load_config

    experiment = load_config(resolve_config("unclip", args.config), CLIPExperiment, args.overrides)
    result = train_clip(experiment, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:
        return 0
    print(json.dumps(result.eval, indent=2))
    print(f"CLIP saved to {result.artifacts_dir / CLIP_DIR}; embed a dataset with "
          f"`argen embed --clip {result.artifacts_dir / CLIP_DIR} --dataset {experiment.data.spec} --split train -o OUT`")
    return 0


@ends_processes
def run_train_prior(args: argparse.Namespace) -> int:
    import yaml

    from argen.unclip.priors import PRIORS
    from tokenizers_img.config import load_config

    data = yaml.safe_load(resolve_config("unclip", args.config).read_text()) or {}
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in PRIORS:
        raise ValueError(f"{args.config}: a prior config needs a top-level `kind:` naming the prior, one of "
                         f"{', '.join(PRIORS)}; got {kind!r}.")
    experiment_class, train_fn = PRIORS[kind].trainer()
    experiment = load_config(data, experiment_class, args.overrides)
    result = train_fn(experiment, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:
        return 0
    print(json.dumps(result.eval, indent=2))
    print(f"{kind} prior saved under {result.artifacts_dir}")
    return 0


@ends_processes
def run_train_decoder(args: argparse.Namespace) -> int:
    from argen.tasks.decoder import DecoderExperiment, train_decoder
    from tokenizers_img.config import load_config

    experiment = load_config(resolve_config("unclip", args.config), DecoderExperiment, args.overrides)
    result = train_decoder(experiment, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:
        return 0
    print(json.dumps(result.eval, indent=2))
    print(f"decoder saved under {result.artifacts_dir}")
    return 0


@ends_processes
def run_train_unclip(args: argparse.Namespace) -> int:
    from argen.tasks.unclip_stack import train_unclip_stack
    from argen.unclip.priors import PRIORS

    stages = ("clip", *(p.part_dir for p in PRIORS.values()), "decoder", "judge_clip")

    overrides: dict[str, list[str]] = {}
    for item in args.overrides:
        stage, _, rest = item.partition(".")
        if stage not in stages or "=" not in rest:
            raise ValueError(f"override {item!r} must look like STAGE.key.path=value with STAGE one of {stages}.")
        overrides.setdefault(stage, []).append(rest)
    train_unclip_stack(args.out, overrides=overrides)
    return 0


@ends_processes
def run_train_pipeline(args: argparse.Namespace) -> int:
    from argen.eval.suite import EvalSettings
    from argen.recipe import RecipeSettings, run_recipe

    settings = RecipeSettings(num_train_codes=args.train_items, judge_clip=not args.no_judge_clip,
                              eval=EvalSettings(prompts=args.eval_prompts, reference=args.eval_reference,
                                                rerank=args.rerank))
    run_recipe(args.out, dataset=args.dataset, resolution=args.resolution, overrides=tuple(args.overrides),
               tokenizer_config=args.tokenizer_config, gpt_config=args.gpt_config, clip_config=args.clip_config,
               settings=settings, val_fraction=args.val_fraction, follow_symlinks=args.follow_symlinks,
               strict=args.strict_metadata, allow_pipe=args.allow_pipe)
    return 0


def run_train_text_tokenizer(args: argparse.Namespace) -> int:
    import numpy as np

    from argen.text import TOKENIZER_FILE, dataset_captions, train_text_tokenizer
    from tokenizers_img.serialization import claim_output_dir

    out = claim_output_dir(args.out, kind="text-tokenizer")  # checked before the captions are read, not after
    captions = dataset_captions(args.dataset, split=args.split, limit=args.limit, seed=args.seed,
                                val_fraction=args.val_fraction, **dataset_options(args))
    tok = train_text_tokenizer(captions, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                               lowercase=args.lowercase)
    file = tok.save(out / TOKENIZER_FILE)
    lengths = np.array([len(tok.tokenize(c)) for c in captions[:20_000]])
    print(f"trained on {len(captions)} captions of {args.dataset} ({args.split}): vocab {tok.vocab_size} "
          f"(asked <= {args.vocab_size}), pad {tok.pad_token!r} = id {tok.pad_id}")
    print(f"caption length in tokens: mean {lengths.mean():.1f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()} "
          "(choose data.text_len >= the max to avoid truncation)")
    print(f"wrote {file} (sha256 {tok.sha256[:12]})")
    return 0
