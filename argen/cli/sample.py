"""`argen sample --pipeline DIR PROMPT ...`: images from text with a pipeline directory (the AR token GPT's or a unCLIP
one), written as a grid, files with metadata.jsonl (for `argen data judge`) and a JSON record."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from argen.cli.args import device, float_in, int_in, positive_int, seed
from argen.sample import DECODINGS, MAX_CFG_SCALE, MAX_TEMPERATURE, MAX_WINDOW, PRECISIONS
from argen.unclip.priors import PRIOR_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images from prompts with a pipeline directory",
                       description="Generate images. The empty prompt \"\" samples the unconditional model.")
    p.add_argument("--pipeline", required=True, help="pipeline directory: the GPT's (pipeline.json) or unCLIP's (unclip.json)")
    p.add_argument("prompts", nargs="*", help='prompts, e.g. "a red circle above a blue square"; "" is unconditional')
    p.add_argument("--prompts-file", help="more prompts, one per line (blank lines are unconditional prompts)")
    p.add_argument("-n", "--num", type=positive_int, default=4, help="images per prompt (default 4)")
    add_sampler_flags(p, cfg_help="classifier-free guidance scale of the GPT (unCLIP: of the decoder); 1 turns it off")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per GPT batch")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-verify", action="store_true", help="skip re-hashing the parts (faster start for big models)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: compile the GPT's decode step with torch.compile (needs a C++ compiler; about 30 s once "
                        "for the demo GPT, then faster decoding: for many images, not for one grid)")
    u = p.add_argument_group("unCLIP pipelines")
    u.add_argument("--prior", choices=PRIOR_CHOICES, default=None,
                   help="which prior (default: diffusion when the pipeline has one, else ar); none feeds the decoder the "
                   "text embedding")
    u.add_argument("--prior-cfg", type=float_in(0.0, MAX_CFG_SCALE), default=1.0, help="guidance scale of the prior (default 1)")
    u.add_argument("--prior-steps", type=positive_int, default=25, help="diffusion prior sampler steps (default 25)")
    u.add_argument("--decoder-steps", type=positive_int, default=10, help="decoder sampler steps (default 10)")
    p.add_argument("-o", "--out", default="samples.png", help="grid PNG; images go to OUT_images/, the record to OUT.json")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from argen.pipeline import Pipeline, part_hashes
    from tokenizers_img.serialization import write_marked_json

    prompts = [_check_utf8(p, "the command line") for p in args.prompts]
    if args.prompts_file:
        prompts += _read_prompts(Path(args.prompts_file))
    _check_outputs(Path(args.out))
    if not prompts:
        print("error: give at least one prompt (\"\" samples unconditionally).", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from argen.unclip.pipeline import UNCLIP_FILE

    overrides = sampler_overrides(args)
    if (Path(args.pipeline) / UNCLIP_FILE).is_file():
        gpt_only = ([flag for flag, field in GPT_ONLY_FLAGS.items() if field in overrides] + (["--compile"] * args.compile)
                    + (["--precision"] * (args.precision != "auto")))
        if gpt_only:
            print(f"error: {', '.join(gpt_only)} set the GPT of a token pipeline (pipeline.json); this is a unCLIP "
                  f"pipeline (its CLIP, prior and decoder take --cfg and the unCLIP options): drop them.", file=sys.stderr)
            return 2
        return _run_sample_unclip(args, prompts, device)
    if args.compile and device != "cpu":
        print(f"note: --compile applies to CPU sampling; on {device} the GPT runs eagerly.")
    pipe = Pipeline.load(args.pipeline, device=device, verify=not args.no_verify, compile=args.compile,
                         precision=args.precision)
    try:
        sampling = sampling_from_flags(args, pipe)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prompt in dict.fromkeys(prompts):
        if not prompt.strip():
            print("note: the empty prompt samples the unconditional model (no caption).")
            continue
        unseen = pipe.unseen_words(prompt)
        if unseen:
            print(f"warning: in {prompt!r}, {', '.join(map(repr, unseen))} never occurred in a training caption: the model "
                  "cannot know what that means and will mostly ignore it.")

    start = time.perf_counter()
    result = pipe.generate(prompts, n_per_prompt=args.num, sampling=sampling, seed=args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    files = _write_images(out, result.images, result.prompts, result.sample_index, num=args.num)
    record = {
        "pipeline": str(Path(args.pipeline).resolve()), "pipeline_parts": part_hashes(pipe.manifest),
        "prompts": prompts, "n_per_prompt": args.num, "seed": args.seed,
        "sampling": dataclasses.asdict(sampling),
        "images": [{"file": f, "prompt": p, "sample": k, "row_seed": s}
                   for f, p, k, s in zip(files, result.prompts, result.sample_index, result.row_seeds)],
        "grid": str(out), "device": device, "precision": pipe.sampling_precision, "seconds": round(seconds, 3),
        "images_per_s": round(len(files) / max(seconds, 1e-9), 3),
    }
    record_file = out.with_suffix(".json")
    write_marked_json(record_file, record)
    print(f"wrote {out} ({len(files)} images, {len(prompts)} prompt(s) x {args.num}), {_images_dir(out)}/ and {record_file}; "
          f"sampling took {seconds:.1f} s on {device} ({pipe.sampling_precision})")
    return 0



def add_sampler_flags(parser: argparse.ArgumentParser, *, cfg_help: str = "classifier-free guidance scale; 1 turns it off"
                      ) -> None:
    """The GPT sampler's flags (argen sample, edit and eval); each defaults to the pipeline's recommended setting.
    `sampler_overrides` reads them back."""
    g = parser.add_argument_group("the GPT's sampler", "each defaults to the pipeline's recommended setting "
                                  "(pipeline.json, which `argen demo` fills with what its sweep chose)")
    g.add_argument("--cfg", type=float_in(0.0, MAX_CFG_SCALE), default=None, help=cfg_help)
    g.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None)
    g.add_argument("--temperature", type=float_in(0.0, MAX_TEMPERATURE), default=None, help="0 is greedy")
    g.add_argument("--top-k", type=int_in(0), default=None, help="keep the k likeliest codes; 0 keeps all")
    g.add_argument("--top-p", type=float_in(0.0, 1.0), default=None, help="nucleus mass to keep; 1 keeps all")
    g.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="token: one image token per forward pass; jacobi / spatial: speculative Jacobi decoding, several "
                        "tokens per pass from the same distribution (new drafts uniform / copied from the code above); zipar: "
                        "several grid rows per pass, approximate (a token does not see the undecoded end of the row above)")
    g.add_argument("--window", type=int_in(1, MAX_WINDOW), default=None,
                   help="draft tokens checked per forward pass with --decoding jacobi or spatial; with zipar, how many "
                        "tokens a grid row runs ahead of the row below (the grid's width or more is exact)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the GPT samples in: bf16 holds its blocks' weights and the KV cache in bfloat16 (as "
                        "bf16 autocast trains them; faster where bf16 is native), fp32 its own weights; auto (the "
                        "default) is bf16 on a CPU with AVX512-BF16 or AMX or a GPU with bf16, else fp32")


# Flags of the GPT's sampler and the SamplingConfig field each sets (--cfg also sets a unCLIP decoder's guidance).
GPT_ONLY_FLAGS = {"--cfg-schedule": "cfg_schedule", "--temperature": "temperature", "--top-k": "top_k",
                  "--top-p": "top_p", "--decoding": "decoding", "--window": "window"}


def sampler_overrides(args: argparse.Namespace) -> dict:
    """The SamplingConfig fields given on the command line (--top-k 0 and --top-p 1 mean off)."""
    given = {field: getattr(args, field) for field in GPT_ONLY_FLAGS.values() if getattr(args, field) is not None}
    if args.cfg is not None:
        given["cfg_scale"] = args.cfg
    if given.get("top_k") == 0:
        given["top_k"] = None
    if given.get("top_p") == 1.0:
        given["top_p"] = None
    return given


def sampling_from_flags(args: argparse.Namespace, pipe):
    """The pipeline's recommended sampler with the flags given on top, printed (argen sample, edit and eval)."""
    overrides = sampler_overrides(args)
    sampling = dataclasses.replace(pipe.sampling, **overrides)
    print(f"sampling with {describe_sampling(sampling)} ({'flags over pipeline.json' if overrides else 'pipeline.json recommends it'})")
    return sampling


def describe_sampling(sampling) -> str:
    """A sampler setting in one line, e.g. "CFG 2 linear, T 0.5, top-k 4"."""
    schedule = f" {sampling.cfg_schedule}" if sampling.cfg_scale != 1 else ""
    parts = [f"CFG {sampling.cfg_scale:g}{schedule}", f"T {sampling.temperature:g}", f"top-k {sampling.top_k or 'all'}"]
    if sampling.top_p is not None:
        parts.append(f"top-p {sampling.top_p:g}")
    if sampling.decoding != "token":
        parts.append(f"{sampling.decoding} decoding, window {sampling.window}")
    return ", ".join(parts)


def _check_utf8(prompt: str, where: str) -> str:
    """The prompt, or a ValueError naming it when it holds bytes that are not UTF-8 (argv arrives surrogate-escaped)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        shown = prompt.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise ValueError(f"prompt '{shown}' from {where} is not valid UTF-8; write prompts in UTF-8.") from None
    return prompt


def _read_prompts(file: Path) -> list[str]:
    """One prompt per line of `file` (blank lines are unconditional); a line that is not UTF-8 is named."""
    prompts = []
    for lineno, raw in enumerate(file.read_bytes().splitlines(), 1):
        try:
            prompts.append(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start}); write prompts "
                             "in UTF-8.") from None
    return prompts


def _check_outputs(out: Path) -> None:
    """Refuse, before any sampling, to replace a grid, record or image folder at OUT that argen did not write."""
    from tokenizers_img.serialization import check_replaceable

    for path in (out, out.with_suffix(".json"), _images_dir(out)):
        check_replaceable(path)


def _images_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_images")


# The grid shows at most this many prompts' rows (every image is in OUT_images/ anyway): a few hundred prompts made
# one PNG tens of thousands of pixels tall.
GRID_PROMPTS = 16


def _write_images(out: Path, images, prompts: list[str], sample_index: list[int], *, num: int) -> list[str]:
    """The images in OUT_images/ (PNG + metadata.jsonl) and the captioned grid of the first GRID_PROMPTS prompts at OUT."""
    from argen.viz import contact_sheet, save_image_folder, save_png

    names = [f"p{r // num:03d}_s{k:02d}.png" for r, k in enumerate(sample_index)]
    files = save_image_folder(_images_dir(out), images, prompts, names)
    shown = min(len(prompts), GRID_PROMPTS * num)
    captions = [p if p.strip() else "(unconditional)" for p in prompts[:shown]]
    save_png(contact_sheet(list(images[:shown]), captions, columns=num), out)
    if shown < len(prompts):
        print(f"note: the grid {out} shows the first {GRID_PROMPTS} prompts; all {len(prompts)} images are in "
              f"{_images_dir(out)}/")
    return [str(f) for f in files]


def _run_sample_unclip(args: argparse.Namespace, prompts: list[str], device: str) -> int:
    from argen.unclip.pipeline import UnclipPipeline, sampling_from_options
    from tokenizers_img.serialization import write_marked_json

    if any(not p.strip() for p in prompts):
        raise ValueError("a unCLIP pipeline needs non-empty prompts (its CLIP embeds the caption).")
    pipe = UnclipPipeline.load(args.pipeline, device=device, verify=not args.no_verify)
    prior = args.prior or pipe.priors[0]
    sampling = sampling_from_options(prior, prior_steps=args.prior_steps, prior_cfg=args.prior_cfg,
                                     decoder_steps=args.decoder_steps, decoder_cfg=args.cfg)
    start = time.perf_counter()
    result = pipe.generate(prompts, n_per_prompt=args.num, seed=args.seed, sampling=sampling, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    files = _write_images(out, result.images, result.prompts, result.sample_index, num=args.num)
    record = {
        "pipeline": str(Path(args.pipeline).resolve()), "pipeline_parts": pipe.manifest.get("parts"),
        "prompts": prompts, "n_per_prompt": args.num, "seed": args.seed, "sampling": dataclasses.asdict(sampling),
        "images": [{"file": f, "prompt": p, "sample": k, "row_seed": s}
                   for f, p, k, s in zip(files, result.prompts, result.sample_index, result.row_seeds)],
        "grid": str(out), "device": device, "seconds": round(seconds, 3),
    }
    write_marked_json(out.with_suffix(".json"), record)
    print(f"wrote {out} ({len(files)} images with the {prior} prior) and {out.with_suffix('.json')}; "
          f"sampling took {seconds:.1f} s on {device}")
    return 0
