"""`argen eval`: a pipeline judged on any captioned dataset without a rule-based judge, by a separately trained judge
CLIP: caption retrieval (R-precision), CLIP score, Fréchet distances and precision/recall, each beside the real
images' ceiling, the same images through the tokenizer (what the tokenizer alone loses of it) and the shuffled-caption
floor, with prompt-bootstrap intervals; plus the tokenizer's own figures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from argen.eval.caption_metrics import knn_radii, precision_recall, r_precision_hits, within_manifold
from argen.eval.clip_metrics import clip_scores, feature_statistics, frechet_distance
from argen.eval.stats import Interval, PromptBootstrap
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir

RECONSTRUCTED = "real, reconstructed"  # the real images through the tokenizer
# a split's rows in report order; "reranked" only with rerank > 1
ROWS = ("generated", "reranked", RECONSTRUCTED, "real (ceiling)", "shuffled captions (floor)")


@dataclass(frozen=True)
class EvalSettings:
    """How much to generate and score.

    prompts: distinct captions per split, each with the real image it came from. images_per_prompt: generated per
    caption (1 keeps the generated set the size of the real one it is compared with: Fréchet distances grow as sets
    shrink). reference: further real (image, caption) pairs, disjoint from the prompts' own, that the distances and
    the precision/recall manifolds compare against.
    candidates: captions each image is ranked among for R-precision (chance = 1 / candidates). k: neighbours for the
    precision/recall manifolds. lpips: a local LPIPS weights file (tokenizers_img.lpips) or None to skip LPIPS.
    rerank: draws per kept image for a second "reranked" row, the best by a rerank CLIP (DALL-E's best of N); 1: off.
    """

    prompts: int = 200
    images_per_prompt: int = 1
    reference: int = 1000
    candidates: int = 100
    k: int = 3
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 64
    lpips: str | None = None
    splits: tuple[str, ...] = ("val",)
    rerank: int = 1

    def __post_init__(self) -> None:
        for name in ("prompts", "images_per_prompt", "reference", "n_boot", "batch_size", "k", "rerank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2 (chance is 1 / candidates), got {self.candidates}.")


@dataclass
class CaptionSet:
    """Distinct captions of one split with the real image each came from, and disjoint reference images."""

    split: str
    captions: list[str]
    images: torch.Tensor       # (P, 3, R, R) the captions' own images, in [-1, 1]
    reference: torch.Tensor    # (M, 3, R, R) other real images of the split
    reference_captions: list[str] = field(default_factory=list)  # (M,) their captions


def dataset_items(dataset, *, seed: int | None = None) -> Iterator[dict[str, Any]]:
    """The items of a dataset: a stream in its order; an indexable one in index order, or in a permutation seeded by
    `seed`, so that the first items are a random sample of the split, not its first folder."""
    if isinstance(dataset, IterableDataset):
        yield from dataset
        return
    order = range(len(dataset)) if seed is None else torch.randperm(
        len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for i in order:
        yield dataset[i]


def caption_set(spec: str, split: str, *, resolution: int, settings: EvalSettings, **dataset_options: Any) -> CaptionSet:
    """`settings.prompts` distinct captions of `split` with their images, then `settings.reference` more images of the
    split for the reference set; drawn in a seeded random order where the split is indexable (image folders), in
    stream order otherwise."""
    from argen.data.registry import build_dataset

    dataset = build_dataset(spec, split=split, resolution=resolution, seed=settings.seed, **dataset_options)
    captions: dict[str, torch.Tensor] = {}
    reference: list[tuple[torch.Tensor, str]] = []
    for item in dataset_items(dataset, seed=settings.seed):
        if item["caption"] not in captions and len(captions) < settings.prompts:
            captions[item["caption"]] = item["image"]
        elif len(reference) < settings.reference:
            reference.append((item["image"], item["caption"]))
        if len(captions) == settings.prompts and len(reference) == settings.reference:
            break
    if len(captions) < 2 or len(reference) <= settings.k:
        raise ValueError(f"the {split} split of {spec} gave {len(captions)} distinct caption(s) and {len(reference)} "
                         f"reference image(s); the evaluation needs at least 2 and more than k={settings.k}. Use a "
                         "larger split or lower --prompts / --reference.")
    return CaptionSet(split=split, captions=list(captions), images=torch.stack(list(captions.values())),
                      reference=torch.stack([image for image, _ in reference]),
                      reference_captions=[caption for _, caption in reference])


def _iv(interval: Interval, scale: float = 1.0) -> dict[str, float]:
    return {k: v * scale if isinstance(v, float) and k != "level" else v for k, v in interval.as_dict().items()}


class PairScorer:
    """Scores (image, caption) pairs of one CaptionSet with the judge CLIP; the same scores for generated images, the
    real images (the ceiling) and the real images under shuffled captions (the floor)."""

    def __init__(self, clip, cset: CaptionSet, settings: EvalSettings) -> None:
        self.clip, self.cset, self.settings = clip, cset, settings
        self.text = clip.encode_text(cset.captions).embeds.double()  # (P, D)
        self.reference = clip.encode_images(cset.reference).double()  # (M, D)
        self.reference_stats = feature_statistics(self.reference.numpy())
        reference_text = clip.encode_text(cset.reference_captions).embeds.double().numpy()
        self.pair_stats = feature_statistics(_pairs(self.reference.numpy(), reference_text))
        self.radii = knn_radii(self.reference, settings.k)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The judge CLIP's features of images (N, 3, R, R) in [-1, 1] -> (N, D) float64."""
        return self.clip.encode_images(images).double()

    def score(self, images: torch.Tensor, caption_index: torch.Tensor, *, true_index: torch.Tensor | None = None
              ) -> dict[str, Any]:
        """images (N, 3, R, R) in [-1, 1], image i scored against caption caption_index[i]; true_index (the floor):
        the caption image i really shows, kept out of its R-precision distractors."""
        return self.score_features(self.encode(images), caption_index, true_index=true_index)

    def score_features(self, feats: torch.Tensor, caption_index: torch.Tensor, *,
                       true_index: torch.Tensor | None = None) -> dict[str, Any]:
        """`score` on images already encoded (`encode`), so that one set of images scored twice is encoded once."""
        s = self.settings
        text = self.text[caption_index]
        boot = PromptBootstrap(caption_index.tolist(), n_boot=s.n_boot, seed=s.seed)
        hits = self.hits(feats, caption_index, true_index=true_index)
        feats_np = feats.numpy()
        pairs = _pairs(feats_np, text.numpy())
        precision_hits = within_manifold(feats, self.reference, self.radii)
        return {
            "images": len(feats),
            "r_precision": _iv(boot.mean(hits.astype(np.float64)), 100),
            "clip_score": _iv(boot.mean(clip_scores(feats.float(), text.float()))),
            "frechet_images": _iv(boot.interval(
                lambda idx: frechet_distance(*feature_statistics(feats_np[idx]), *self.reference_stats), recentred=True)),
            "frechet_pairs": _iv(boot.interval(
                lambda idx: frechet_distance(*feature_statistics(pairs[idx]), *self.pair_stats), recentred=True)),
            "precision": _iv(boot.mean(precision_hits.astype(np.float64)), 100),
            "recall": 100 * precision_recall(self.reference, feats, k=s.k)[1],
        }

    def hits(self, feats: torch.Tensor, caption_index: torch.Tensor, *, true_index: torch.Tensor | None = None
             ) -> np.ndarray:
        """R-precision hit (0/1) of each image's judge-CLIP features against its caption (see `score`)."""
        s = self.settings
        return r_precision_hits(feats, caption_index, self.text, candidates=s.candidates, exclude=true_index, seed=s.seed)

    def paired_r_precision_gain(self, feats: torch.Tensor, baseline: torch.Tensor, caption_index: torch.Tensor
                                ) -> dict[str, float]:
        """R-precision of the images with features `feats` minus that of `baseline`'s (`encode`; the same captions,
        row for row), in points, with a prompt-bootstrap interval of the paired difference."""
        s = self.settings
        gain = np.subtract(*(self.hits(f, caption_index).astype(np.float64) for f in (feats, baseline)))
        return _iv(PromptBootstrap(caption_index.tolist(), n_boot=s.n_boot, seed=s.seed).mean(gain), 100)


def _pairs(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    """Joint (image, caption) features: both unit-normalised, side by side (N, 2D). A distance between two sets of
    pairs sees whether images go with their captions, which one between image sets cannot."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)  # noqa: E731
    return np.concatenate([unit(image_feats), unit(text_feats)], axis=1)


def shuffled(n: int, *, seed: int) -> torch.Tensor:
    """A permutation of range(n) with no fixed point (every caption moves), n >= 2."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while (perm == np.arange(n)).any():
        perm = rng.permutation(n)
    return torch.from_numpy(perm)


def evaluate_pipeline(pipe, *, dataset: str, judge_clip, settings: EvalSettings, out: str | Path | None = None,
                      sampling=None, rerank_clip=None, progress=print, **dataset_options: Any) -> dict[str, Any]:
    """Generate for the captions of each split in `settings.splits` and score everything; returns the report dict and,
    with `out`, writes out/report.json, out/report.md and a grid of generated beside real images per split.
    `sampling` (a SamplingConfig) defaults to the pipeline's recommended setting. With `settings.rerank` N > 1, each
    kept image is also chosen as the best of N draws by `rerank_clip` (a ClipEncoder that is not the judge) and scored
    in a "reranked" row; the "generated" row holds the first draws, the same images as without reranking."""
    from argen.eval.tokenizer import evaluate_tokenizer

    _check_rerank(settings, rerank_clip, judge_clip)
    resolution = pipe.vq.config.resolution
    out = claim_output_dir(out, kind="eval") if out is not None else None
    sampling = sampling if sampling is not None else pipe.sampling
    report: dict[str, Any] = {"dataset": dataset, "sampling": _fields(sampling), "precision": pipe.sampling_precision,
                              "settings": _fields(settings),
                              "splits": {}}
    if settings.rerank > 1:
        report["rerank_clip"] = {"path": rerank_clip.source, "sha256": rerank_clip.sha256}
    first = None
    per = settings.images_per_prompt
    for split in settings.splits:
        cset = caption_set(dataset, split, resolution=resolution, settings=settings, **dataset_options)
        first = first or cset
        progress(f"[eval] {split}: {len(cset.captions)} captions, {len(cset.reference)} reference images")
        scorer = PairScorer(judge_clip, cset, settings)
        own = torch.arange(len(cset.captions))
        gen = pipe.generate(cset.captions, n_per_prompt=per * settings.rerank, seed=settings.seed,
                            sampling=sampling, batch_size=settings.batch_size)
        draws = gen.images.unflatten(0, (len(own), per * settings.rerank))  # (P, draws, 3, R, R)
        first_draws = draws[:, :per].flatten(0, 1)  # draw k of a prompt does not depend on how many are drawn
        index = own.repeat_interleave(per)
        real, first_feats = scorer.encode(cset.images), scorer.encode(first_draws)
        reconstructed = pipe.vq.reconstruct(cset.images, batch_size=settings.batch_size)
        row = {"generated": scorer.score_features(first_feats, index),
               "real (ceiling)": scorer.score_features(real, own),
               RECONSTRUCTED: scorer.score(reconstructed, own),
               "shuffled captions (floor)": scorer.score_features(real, shuffled(len(own), seed=settings.seed),
                                                                  true_index=own),
               "candidates": min(settings.candidates, len(cset.captions))}
        row["chance r_precision"] = 100 / row["candidates"]
        row["reference"] = len(cset.reference)
        if (warning := reference_warning(row["reference"], len(scorer.pair_stats[0]), settings.prompts)) is not None:
            row["warning"] = warning
            progress(f"[eval] {split}: {warning}")
        columns = {"reconstructed": reconstructed, "generated": first_draws}
        if settings.rerank > 1:
            from argen.rerank import clip_similarity

            sims = clip_similarity(rerank_clip, gen.prompts, gen.images).view(len(own), -1)
            keep = sims.topk(per, dim=1).indices  # (P, per): the best `per` of each prompt's draws
            columns["reranked"] = draws[own[:, None], keep].flatten(0, 1)
            reranked = scorer.encode(columns["reranked"])
            row["reranked"] = scorer.score_features(reranked, index)
            row["reranked r_precision gain"] = scorer.paired_r_precision_gain(reranked, first_feats, index)
        if dataset.split(":")[0] == "shapes":
            from argen.eval.generation import judge_images

            verdicts = np.array([r.correct for r in judge_images([cset.captions[i] for i in index], first_draws)],
                                dtype=np.float64)
            row["shapes judge"] = _iv(PromptBootstrap(index.tolist(), n_boot=settings.n_boot, seed=settings.seed)
                                      .mean(verdicts), 100)
        report["splits"][split] = row
        if out is not None:
            _grid(columns, cset, out / f"samples_{split}.png")
    report["tokenizer"] = _tokenizer_figures(pipe.vq, torch.cat([first.images, first.reference]), judge_clip, settings,
                                             evaluate_tokenizer)
    if out is not None:
        atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
        atomic_write_bytes(out / "report.md", markdown(report).encode())
    return report


def reference_warning(reference: int, pair_dims: int, prompts: int) -> str | None:
    """Why a split's Fréchet distances and precision/recall cannot be read, or None: with no more reference pairs than
    the judge's image+caption feature width, their covariance is singular (the split had few images beyond the
    prompts' own)."""
    if reference > pair_dims:
        return None
    return (f"only {reference} reference images beside the {prompts} prompts' own, for {pair_dims}-wide "
            "image+caption features: the Fréchet distances and precision/recall of this split are biased and cannot "
            "be compared with other runs (R-precision and CLIP score can). Give fewer --prompts, so that more of the "
            "split's images are left for the reference.")


def _check_rerank(settings: EvalSettings, rerank_clip, judge_clip) -> None:
    if settings.rerank == 1:
        if rerank_clip is not None:
            raise ValueError(f"a rerank CLIP ({rerank_clip.source}) was given without reranking: give --rerank N (N > 1) "
                             "to also score the best of N draws per caption, or leave out --rerank-clip.")
        return
    if rerank_clip is None:
        raise ValueError(f"rerank={settings.rerank} needs a rerank CLIP (--rerank-clip): a CLIP trained separately "
                         "from the judge, e.g. `argen train clip ... train.seed=1`.")
    if rerank_clip.sha256 == judge_clip.sha256:
        raise ValueError(f"the rerank CLIP {rerank_clip.source} is the judge CLIP: an image chosen by the judge would "
                         "be graded by the model that chose it. Rerank with a CLIP trained separately (another seed).")


def _fields(obj) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _tokenizer_figures(vq, images: torch.Tensor, clip, settings: EvalSettings, evaluate_tokenizer) -> dict[str, Any]:
    """PSNR, SSIM, codebook usage (evaluate_tokenizer), the judge-CLIP Fréchet distance of reconstructions to the
    originals, and LPIPS when a weights file is given."""
    dataset = [{"image": x, "caption": "", "key": str(i)} for i, x in enumerate(images)]
    metrics = evaluate_tokenizer(vq, dataset, batch_size=settings.batch_size)
    recon = vq.reconstruct(images, batch_size=settings.batch_size)
    orig_f, recon_f = clip.encode_images(images).double().numpy(), clip.encode_images(recon).double().numpy()
    fig = {**metrics.__dict__, "frechet_reconstructions": frechet_distance(*feature_statistics(recon_f),
                                                                            *feature_statistics(orig_f))}
    fig.pop("judge_agreement", None)
    fig.pop("judge_recon_correct", None)
    if settings.lpips is not None:
        from tokenizers_img.lpips import LPIPS

        lp = LPIPS.from_file(settings.lpips)
        with torch.inference_mode():
            fig["lpips"] = float(torch.cat([lp(images[i:i + 32], recon[i:i + 32]).flatten()
                                            for i in range(0, len(images), 32)]).mean())
    return fig


def _grid(columns: dict[str, torch.Tensor], cset: CaptionSet, path: Path, *, prompts: int = 8) -> None:
    """The first prompts' real image, then their images of each column (reconstructed, generated, reranked), one row
    per prompt; a column holds k images per prompt, prompt-major."""
    from argen.viz import contact_sheet, save_png

    per = {name: len(images) // len(cset.captions) for name, images in columns.items()}
    tiles, labels = [], []
    for p in range(min(prompts, len(cset.captions))):
        tiles.append(cset.images[p])
        labels.append(f"real: {cset.captions[p]}")
        for name, images in columns.items():
            k = per[name]
            tiles += list(images[p * k:(p + 1) * k])
            labels += [name] * k
    save_png(contact_sheet(tiles, labels, columns=1 + sum(per.values())), path)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per split (generated, reranked if any, ceiling, floor), then the tokenizer."""
    def cell(x, digits: int = 1) -> str:
        if x is None:
            return "n/a"
        if isinstance(x, dict):
            return f"{x['estimate']:.{digits}f} [{x['low']:.{digits}f}, {x['high']:.{digits}f}]"
        return f"{x:.{digits}f}"

    precision = f" in {report['precision']}" if report.get("precision") else ""  # not recorded by older reports
    rerank = report["settings"].get("rerank", 1)
    lines = [f"# argen eval: {report['dataset']}", "",
             f"Sampling: {report['sampling']}{precision}. Judge CLIP trained on the train split, never the "
             "generator's. 95% prompt-bootstrap intervals (recall: a point figure). Real, reconstructed: the real images "
             "encoded and decoded by the tokenizer, so the gap to the ceiling is what the tokenizer alone loses.", ""]
    if rerank > 1:
        lines += [f"Reranked: each image is the best of {rerank} draws by the rerank CLIP "
                  f"`{report['rerank_clip']['path']}` (not the judge); generated: the first draws.", ""]
    for split, row in report["splits"].items():
        lines += [f"## {split} captions", "",
                  f"R-precision: the image retrieves its own caption first among {row['candidates']} "
                  f"(chance {row['chance r_precision']:.1f}%).", "",
                  "| images | R-precision % | CLIP score | FD images | FD image+caption | precision % | recall % |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in ROWS:
            if name not in row:  # reranked without rerank; reconstructed in reports from before it was scored
                continue
            r = row[name]
            label = f"best of {rerank} by the rerank CLIP" if name == "reranked" else name
            lines.append(f"| {label} ({r['images']}) | {cell(r['r_precision'])} | {cell(r['clip_score'])} | "
                         f"{cell(r['frechet_images'])} | {cell(r['frechet_pairs'], 3)} | {cell(r['precision'])} | "
                         f"{cell(r['recall'])} |")
        if "warning" in row:
            lines += ["", f"**Warning:** {row['warning']}"]
        if "reranked r_precision gain" in row:
            lines += ["", f"Reranked minus generated R-precision, paired over captions: "
                          f"{cell(row['reranked r_precision gain'])} points."]
        if "shapes judge" in row:
            lines += ["", f"Shapes judge, whole prompt: {cell(row['shapes judge'])}%."]
        lines += ["", f"![real, reconstructed and generated](samples_{split}.png)", ""]
    t = report["tokenizer"]
    lines += ["## Tokenizer (reconstructions of the same images)", "",
              f"PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.3f}, codebook usage {100 * t['codebook_usage']:.1f}% "
              f"({t['used_codes']} of {t['num_codes']}), judge-CLIP FD of reconstructions to originals "
              f"{t['frechet_reconstructions']:.2f}" + (f", LPIPS {t['lpips']:.3f}" if "lpips" in t else "") + ".", ""]
    return "\n".join(lines)
