"""`argen edit ...`: editing and control. On an AR token pipeline: inpaint, outpaint, complete (token space) and rerank
(best of N by the generator-side CLIP); on a unCLIP pipeline: variations, interpolate, text-diff and sdedit. Each writes
a captioned grid, the images (OUT_images/ with metadata.jsonl) and a JSON record."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from argen.cli.args import device, float_in, fraction, int_in, positive_int, seed
from argen.cli.sample import add_sampler_flags, sampling_from_flags
from argen.sample import MAX_CFG_SCALE
from argen.unclip.priors import PRIOR_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit images: inpaint, outpaint, complete, rerank (AR GPT); variations, interpolate, "
                       "text-diff, sdedit (unCLIP)", description="Editing and control on a loaded pipeline (docs/editing.md).")
    cmds = p.add_subparsers(dest="edit_command", metavar="EDIT", required=True)

    for name, help_text in (("inpaint", "regenerate a region (--mask or --box) under a prompt"),
                            ("outpaint", "keep a region (--keep-mask or --keep-box) and generate around it"),
                            ("complete", "keep the top rows (--keep-rows) and generate the rest")):
        c = cmds.add_parser(name, help=help_text, description=help_text + ". The region is snapped outward to the "
                            "tokenizer's code grid (reported); pixels outside it are the source's.")
        _common(c, gpt=True)
        c.add_argument("--image", required=True, help="source image at the pipeline's resolution (or --resize)")
        c.add_argument("prompt", help="the caption of the edited image")
        if name == "inpaint":
            where = c.add_mutually_exclusive_group(required=True)
            where.add_argument("--mask", help="mask image of the source's size: white (> 127) is regenerated")
            where.add_argument("--box", type=_box, help="x0,y0,x1,y1 in pixels (x1, y1 exclusive) to regenerate")
        elif name == "outpaint":
            where = c.add_mutually_exclusive_group(required=True)
            where.add_argument("--keep-mask", help="mask image of the source's size: white (> 127) is kept")
            where.add_argument("--keep-box", type=_box, help="x0,y0,x1,y1 in pixels (x1, y1 exclusive) to keep")
        else:
            c.add_argument("--keep-rows", type=positive_int, required=True, help="pixel rows kept from the top")
        c.add_argument("--method", choices=("ar", "resample", "gibbs"), default=None,
                       help="how the region agrees with the kept tokens after it: ar (raster order only; the default "
                            "for complete, where it is exact), resample (AR drafts weighted by the kept suffix's "
                            "likelihood) or gibbs (passes of p(x_i | all others) over the region); default: "
                            "argen.edit.EditConfig's")
        c.add_argument("--proposals", type=int_in(1, 256), default=8, help="resample: AR drafts per image (default 8)")
        c.add_argument("--passes", type=int_in(1, 64), default=2, help="gibbs: sweeps over the region (default 2)")
        c.add_argument("--candidates", type=int_in(2, 1024), default=8,
                       help="gibbs: values tried per token, the most likely under p(x_i | x_<i) (default 8)")
        c.add_argument("--no-paste", action="store_true",
                       help="keep the decoded codes everywhere instead of pasting the source pixels back outside the region")
        c.set_defaults(func=run_token_edit)

    c = cmds.add_parser("rerank", help="best of N draws per prompt by the generator-side CLIP",
                        description="Draw -n images per prompt with the GPT and keep the one the generator-side CLIP "
                                    "(the unCLIP stack's, never the judge CLIP) scores highest.")
    _common(c, gpt=True)
    c.add_argument("prompts", nargs="+", help="prompts")
    c.add_argument("--clip", required=True, help="the generator-side CLIP directory, or a unCLIP pipeline directory")
    c.set_defaults(func=run_rerank, num=8)

    c = cmds.add_parser("variations", help="decode an image's CLIP image embedding several times")
    _common(c, gpt=False)
    c.add_argument("--image", required=True)
    c.set_defaults(func=run_unclip_control)
    c = cmds.add_parser("interpolate", help="decode along slerp between two images' CLIP embeddings")
    _common(c, gpt=False)
    c.add_argument("--image", required=True, help="the start of the path")
    c.add_argument("--to-image", required=True, help="the end of the path")
    c.add_argument("--steps", type=int_in(2, 64), default=5, help="images along the path, both ends included (default 5)")
    c.set_defaults(func=run_unclip_control)
    c = cmds.add_parser("text-diff", help="move an image's embedding along the difference of two captions")
    _common(c, gpt=False)
    c.add_argument("--image", required=True)
    c.add_argument("--from", dest="source_caption", required=True, help="caption describing the image now")
    c.add_argument("--to", dest="target_caption", required=True, help="caption describing the change wanted")
    c.add_argument("--steps", type=int_in(2, 64), default=5, help="images along the path (default 5)")
    c.add_argument("--max-angle", type=float_in(0.01, 1.0), default=0.5,
                   help="slerp fraction from the image embedding towards the diff at the last step (default 0.5)")
    c.set_defaults(func=run_unclip_control)
    c = cmds.add_parser("sdedit", help="noise an image part way and denoise it under a new caption")
    _common(c, gpt=False)
    c.add_argument("--image", required=True)
    c.add_argument("prompt", help="the new caption")
    c.add_argument("--strength", type=fraction, default=0.5, help="noise level in [0, 1]: 0 keeps the image, 1 is pure "
                   "noise (default 0.5)")
    c.add_argument("--prior", choices=PRIOR_CHOICES, default=None,
                   help="the prior giving the caption's image embedding (default: the pipeline's first)")
    c.set_defaults(func=run_unclip_control)


def _common(c: argparse.ArgumentParser, *, gpt: bool) -> None:
    c.add_argument("--pipeline" if gpt else "--unclip", required=True, dest="pipeline",
                   help="AR token pipeline directory (pipeline.json)" if gpt else "unCLIP pipeline directory (unclip.json)")
    c.add_argument("-n", "--num", type=int_in(1, 1024), default=4, help="images per source or prompt (default 4; rerank: "
                   "draws per prompt, default 8)")
    c.add_argument("--seed", type=seed, default=0)
    c.add_argument("--resize", action="store_true", help="resize and centre-crop source images to the pipeline's resolution")
    c.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--no-verify", action="store_true", help="skip re-hashing the pipeline's parts")
    c.add_argument("-o", "--out", default="edit.png", help="grid PNG; images go to OUT_images/, the record to OUT.json")
    if gpt:
        add_sampler_flags(c)
        c.add_argument("--batch-size", type=positive_int, default=64, help="rows per GPT batch")
    else:
        c.add_argument("--cfg", type=float_in(0.0, MAX_CFG_SCALE), default=2.0, help="the decoder's guidance scale (default 2)")
        c.add_argument("--decoder-steps", type=int_in(1, 1000), default=10, help="decoder sampler steps (default 10)")


def _box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 (four numbers), got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 (four numbers), got {len(values)}: {text!r}")
    return values


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _read_image(path: str, *, resolution: int, resize: bool):
    """The image at `path` as (3, R, R) in [-1, 1]; one that is not R x R is refused unless --resize."""
    from argen.data.transforms import load_image, pil_to_tensor, resize_center_crop

    img = load_image(path)
    if img.size != (resolution, resolution):
        if not resize:
            raise ValueError(f"{path} is {img.size[0]}x{img.size[1]} px, but the pipeline reads {resolution}x{resolution}; "
                             "pass --resize to resize and centre-crop it.")
        img = resize_center_crop(img, resolution)
    return pil_to_tensor(img)


def _outputs(out: Path) -> tuple[Path, Path, Path]:
    """The grid, its image folder and its JSON record."""
    return out, out.with_name(out.stem + "_images"), out.with_suffix(".json")


def _check_outputs(out: Path) -> None:
    """Refuse, before any work, to replace outputs argen did not write."""
    from tokenizers_img.serialization import check_replaceable

    for path in _outputs(out):
        check_replaceable(path)


def _write(args: argparse.Namespace, tiles: list, labels: list[str], images, captions: list[str], record: dict[str, Any],
           *, columns: int) -> None:
    """Grid at OUT, images at OUT_images/, record at OUT.json; nothing argen did not write is replaced."""
    from argen.viz import contact_sheet, save_image_folder, save_png
    from tokenizers_img.serialization import write_marked_json

    out, folder, record_file = _outputs(Path(args.out))
    _check_outputs(out)
    names = [f"{i:03d}.png" for i in range(len(images))]
    files = save_image_folder(folder, list(images), captions, names)
    save_png(contact_sheet(tiles, labels, columns=columns), out)
    write_marked_json(record_file, {**record, "images": [str(f) for f in files], "grid": str(out)})
    print(f"wrote {out}, {folder}/ and {record_file}")


def run_token_edit(args: argparse.Namespace) -> int:
    from argen import edit
    from argen.data.transforms import load_image
    from argen.pipeline import Pipeline

    _check_outputs(Path(args.out))
    method = args.method or ("ar" if args.edit_command == "complete" else edit.EditConfig.method)
    config = edit.EditConfig(method=method, proposals=args.proposals, passes=args.passes,
                             candidates=args.candidates, paste=not args.no_paste)
    pipe = Pipeline.load(args.pipeline, device=_device(args), verify=not args.no_verify, precision=args.precision)
    sampling = sampling_from_flags(args, pipe)
    R = pipe.vq.config.resolution
    source = _read_image(args.image, resolution=R, resize=args.resize)
    unseen = pipe.unseen_words(args.prompt)
    if unseen:
        print(f"warning: {', '.join(map(repr, unseen))} never occurred in a training caption; the GPT will mostly ignore it.")
    kw = dict(n=args.num, sampling=sampling, config=config, seed=args.seed, batch_size=args.batch_size)
    if args.edit_command == "inpaint":
        mask = load_image(args.mask) if args.mask else None
        result = edit.inpaint(pipe, source, args.prompt, mask=mask, box=args.box, **kw)
    elif args.edit_command == "outpaint":
        keep = load_image(args.keep_mask) if args.keep_mask else None
        result = edit.outpaint(pipe, source, args.prompt, keep=keep, keep_box=args.keep_box, **kw)
    else:
        result = edit.complete(pipe, source, args.prompt, keep_rows=args.keep_rows, **kw)
    print(result.mask.describe(0))
    summary = result.summary()
    recon = summary["recon_psnr_outside_db"][0]
    print(f"outside the region: the decoded codes are {summary['psnr_outside_decoded_db']:.1f} dB from the source (the "
          f"tokenizer's own reconstruction: {recon:.1f} dB); "
          + ("the source pixels were pasted back there." if config.paste else "kept as decoded (--no-paste)."))
    tiles = [source, edit.mask_overlay(source, result.mask.pixels[0])] + list(result.images)
    labels = ["source", "regenerated region"] + [args.prompt] * len(result.images)
    record = {"command": f"edit {args.edit_command}", "pipeline": str(Path(args.pipeline).resolve()),
              "image": args.image, "prompt": args.prompt, "seed": args.seed, "sampling": dataclasses.asdict(sampling),
              "precision": pipe.sampling_precision,
              "edit": dataclasses.asdict(config), **summary,
              **{k: getattr(args, k) for k in ("mask", "box", "keep_mask", "keep_box", "keep_rows") if getattr(args, k, None)},
              "row_seeds": result.row_seeds}
    _write(args, tiles, labels, result.images, [args.prompt] * len(result.images), record, columns=len(tiles))
    return 0


def run_rerank(args: argparse.Namespace) -> int:
    from argen.pipeline import Pipeline
    from argen.rerank import rerank

    if any(not p.strip() for p in args.prompts):
        raise ValueError("reranking scores images against their prompt: give non-empty prompts.")
    _check_outputs(Path(args.out))
    pipe = Pipeline.load(args.pipeline, device=_device(args), verify=not args.no_verify, precision=args.precision)
    sampling = sampling_from_flags(args, pipe)
    start = time.perf_counter()
    result = rerank(pipe, args.prompts, clip=args.clip, n=args.num, sampling=sampling, seed=args.seed,
                    batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    n = args.num
    tiles, labels = [], []
    for p, prompt in enumerate(result.prompts):
        for k in range(n):
            tiles.append(result.draws.images[p * n + k])
            mark = " (kept)" if k == int(result.best[p]) else ""
            labels.append(f"{prompt}: CLIP {float(result.scores[p, k]):.3f}{mark}")
    record = {"command": "edit rerank", "pipeline": str(Path(args.pipeline).resolve()), "clip": str(args.clip),
              "prompts": result.prompts, "draws_per_prompt": n, "seed": args.seed,
              "sampling": dataclasses.asdict(sampling), "precision": pipe.sampling_precision,
              "best": result.best.tolist(), "scores": result.scores.tolist(),
              "seconds": round(seconds, 3)}
    print(f"kept the best of {n} draws for {len(result.prompts)} prompt(s) in {seconds:.1f} s")
    _write(args, tiles, labels, result.images, result.prompts, record, columns=n)
    return 0


def run_unclip_control(args: argparse.Namespace) -> int:
    from argen.unclip import controls
    from argen.unclip.pipeline import DecoderSampling, UnclipPipeline, UnclipSampling

    _check_outputs(Path(args.out))
    pipe = UnclipPipeline.load(args.pipeline, device=_device(args), verify=not args.no_verify)
    R = pipe.decoder.config.resolution
    source = _read_image(args.image, resolution=R, resize=args.resize)
    decoder = DecoderSampling(steps=args.decoder_steps, cfg_scale=args.cfg)
    cmd = args.edit_command
    extra: dict[str, Any] = {}
    if cmd == "variations":
        result = controls.variations(pipe, source, n=args.num, seed=args.seed, decoder=decoder)
        sources, source_labels = [source], ["source"]
    elif cmd == "interpolate":
        other = _read_image(args.to_image, resolution=R, resize=args.resize)
        result = controls.interpolate(pipe, source, other, steps=args.steps, seed=args.seed, decoder=decoder)
        sources, source_labels = [source, other], ["start", "end"]
        extra = {"to_image": args.to_image}
    elif cmd == "text-diff":
        result = controls.text_diff(pipe, source, args.source_caption, args.target_caption, steps=args.steps,
                                    max_angle=args.max_angle, seed=args.seed, decoder=decoder)
        sources, source_labels = [source], [f"source: {args.source_caption}"]
        extra = {"from": args.source_caption, "to": args.target_caption, "max_angle": args.max_angle}
    else:
        sampling = UnclipSampling(prior=args.prior or pipe.priors[0], decoder=decoder)
        result = controls.sdedit(pipe, source, args.prompt, strength=args.strength, n=args.num, seed=args.seed,
                                 sampling=sampling)
        sources, source_labels = [source], ["source"]
        extra = {"prompt": args.prompt, "strength": args.strength, "prior": sampling.prior}
    record = {"command": f"edit {cmd}", "unclip": str(Path(args.pipeline).resolve()), "image": args.image,
              "seed": args.seed, "decoder": dataclasses.asdict(decoder), "values": result.values,
              "row_seeds": result.seeds, **extra}
    tiles, labels = sources + list(result.images), source_labels + result.labels
    captions = [extra.get("prompt", "")] * len(result.images)
    _write(args, tiles, labels, result.images, captions, record, columns=len(tiles))
    return 0
