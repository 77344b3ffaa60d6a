"""`argen compare`: the AR token GPT against unCLIP with the AR prior, the diffusion prior and no prior, on one
prompt set with the same seeds, judge and judge CLIP (see argen.compare)."""

from __future__ import annotations

import argparse

from argen.cli.args import float_in, fraction, int_in, positive_int, seed
from argen.sample import MAX_CFG_SCALE, MAX_TEMPERATURE

cfg_scale = float_in(0.0, MAX_CFG_SCALE)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the AR token GPT and unCLIP (AR / diffusion / no prior) on one prompt set")
    p.add_argument("--judge-clip", required=True, help="the judge CLIP directory (trained separately, e.g. "
                   "the shapes_judge_clip preset); never a generator's CLIP")
    p.add_argument("--gpt", default=None, help="GPT pipeline directory (argen train gpt ... final/)")
    p.add_argument("--unclip", default=None, help="unCLIP pipeline directory (argen unclip-pipeline / build_unclip_pipeline)")
    p.add_argument("--train-embeddings", default=None,
                   help="embedding shard of the training set (argen embed), for the trivial-prior rows")
    p.add_argument("-o", "--out", default="compare", help="output directory (default: compare)")
    p.add_argument("--prompts", type=positive_int, default=200, help="distinct val prompts (default 200)")
    p.add_argument("--heldout", type=int_in(0), default=40, help="distinct held-out prompts (default 40)")
    p.add_argument("-n", "--num", type=positive_int, default=2, help="images per prompt (default 2; >= 2 for diversity)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--gpt-cfg", type=cfg_scale, default=1.0)
    p.add_argument("--gpt-cfg-schedule", choices=("constant", "linear"), default="constant",
                   help="GPT guidance over the image tokens (linear: from 1 at the first to --gpt-cfg at the last)")
    p.add_argument("--gpt-top-k", type=positive_int, default=4)
    p.add_argument("--gpt-temperature", type=float_in(0.0, MAX_TEMPERATURE), default=1.0, help="GPT sampling temperature (0 is greedy)")
    p.add_argument("--prior-sampler", choices=("ddpm", "ddim", "dpm++"), default="ddim")
    p.add_argument("--prior-steps", type=positive_int, default=10, help="diffusion prior steps (default 10: DDIM 10 matched 25 on val)")
    p.add_argument("--prior-cfg", type=cfg_scale, default=1.0, help="guidance of both priors")
    p.add_argument("--best-of", type=positive_int, default=1, help="diffusion prior: best of N by similarity to the text (DALL-E 2: 2)")
    p.add_argument("--dot-quantile", type=fraction, default=0.5, help="AR prior: draw the dot-product token at or above "
                   "this quantile (0.5 = DALL-E 2's top half)")
    p.add_argument("--decoder-sampler", choices=("ddpm", "ddim", "dpm++"), default="dpm++")
    p.add_argument("--decoder-steps", type=positive_int, default=10, help="decoder steps (default 10, as DecoderSampling)")
    p.add_argument("--decoder-cfg", type=cfg_scale, default=2.0, help="decoder guidance (default 2, as DecoderSampling)")
    p.add_argument("--sweep-prompts", type=positive_int, default=48, help="prompts used by the sweeps")
    p.add_argument("--sweep-gpt-cfg", type=cfg_scale, nargs="*", default=())
    p.add_argument("--sweep-prior-cfg", type=cfg_scale, nargs="*", default=())
    p.add_argument("--sweep-decoder-cfg", type=cfg_scale, nargs="*", default=())
    p.add_argument("--sweep-prior-steps", type=positive_int, nargs="*", default=())
    p.add_argument("--sweep-decoder-steps", type=positive_int, nargs="*", default=())
    p.set_defaults(func=run_compare_cli)


def run_compare_cli(args: argparse.Namespace) -> int:
    from argen.compare import CompareSettings, run_compare
    from argen.sample import SamplingConfig
    from argen.unclip.ar_prior_sampling import ARPriorSamplingConfig
    from argen.unclip.pipeline import DecoderSampling, DiffusionPriorSampling, UnclipSampling

    if args.gpt is None and args.unclip is None:
        raise ValueError("give --gpt and/or --unclip: there is nothing to compare.")
    settings = CompareSettings(
        num_val_prompts=args.prompts, num_heldout_prompts=args.heldout, n_per_prompt=args.num, seed=args.seed,
        n_boot=args.n_boot, sweep_prompts=args.sweep_prompts, sweep_gpt_cfg=tuple(args.sweep_gpt_cfg),
        sweep_prior_cfg=tuple(args.sweep_prior_cfg), sweep_decoder_cfg=tuple(args.sweep_decoder_cfg),
        sweep_prior_steps=tuple(args.sweep_prior_steps), sweep_decoder_steps=tuple(args.sweep_decoder_steps))
    unclip_sampling = UnclipSampling(
        diffusion=DiffusionPriorSampling(sampler=args.prior_sampler, steps=args.prior_steps, cfg_scale=args.prior_cfg,
                                         best_of=args.best_of),
        ar=ARPriorSamplingConfig(tokens=SamplingConfig(cfg_scale=args.prior_cfg), dot_quantile=args.dot_quantile),
        decoder=DecoderSampling(sampler=args.decoder_sampler, steps=args.decoder_steps, cfg_scale=args.decoder_cfg))
    run_compare(args.out, judge_clip=args.judge_clip, gpt_pipeline=args.gpt, unclip_pipeline=args.unclip,
                gpt_sampling=SamplingConfig(cfg_scale=args.gpt_cfg, cfg_schedule=args.gpt_cfg_schedule,
                                            temperature=args.gpt_temperature, top_k=args.gpt_top_k), unclip_sampling=unclip_sampling,
                train_embeddings=args.train_embeddings, settings=settings)
    return 0
