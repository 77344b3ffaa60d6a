"""`argen compare`: the AR token GPT and unCLIP (AR prior, diffusion prior, no prior) on one prompt set with the same
seeds, judge and judge CLIP. Reports judge accuracy, judge-CLIP score, Fréchet distance, prior-only metrics, diversity
and cost, each quality figure with a 95% prompt-bootstrap interval, plus grids, plots and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from argen.data.shapes import parse_caption, scene_and_caption
from argen.eval.clip_metrics import clip_scores, feature_statistics, frechet_distance, pairwise_diversity
from argen.eval.generation import judge_images, prompt_kind
from argen.eval.judge import ATTRIBUTES
from argen.eval.stats import Interval, PromptBootstrap
from argen.unclip.clip import ClipEncoder
from argen.unclip.priors import PRIORS, prior_label
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptSet:
    """Distinct prompts with their kind ("single", "relation", "other" from val; "heldout") and the dataset image each
    caption was written for (its "true image", (3, H, W) in [-1, 1]), used by the prior-only metrics."""

    prompts: list[str]
    kinds: list[str]
    true_images: Tensor  # (P, 3, H, W)


def compare_prompts(*, num_val: int, num_heldout: int, resolution: int = 32, seed: int = 0) -> PromptSet:
    """The first `num_val` distinct val captions (every template, so the set is the val distribution) and the first
    `num_heldout` distinct held-out captions, each with the image it describes."""
    from argen.data.shapes import render

    prompts, kinds, images = [], [], []
    for split, want, size in (("val", num_val, 2000), ("heldout", num_heldout, 1000)):
        seen: set[str] = set()
        for i in range(size):
            if len(seen) == want:
                break
            scene, caption = scene_and_caption(i, split, seed=seed)
            if caption in seen:
                continue
            seen.add(caption)
            prompts.append(caption)
            kinds.append("heldout" if split == "heldout" else prompt_kind(parse_caption(caption)) or "other")
            images.append(torch.from_numpy(render(scene, resolution)).permute(2, 0, 1).float() / 127.5 - 1)
        if len(seen) < want:
            raise ValueError(f"the {split} split has only {len(seen)} distinct captions, fewer than the {want} asked for.")
    return PromptSet(prompts=prompts, kinds=kinds, true_images=torch.stack(images))


# ----------------------------------------------------------------------------------------------- systems
@dataclass
class Generation:
    """Images of one system for prompts repeated n_per_prompt times (row r: sample sample_index[r] of prompts[r]).
    image_embeds: (N, D) unit-norm image embeddings the system's prior produced (unCLIP with a prior), else None."""

    images: Tensor  # (N, 3, H, W) float32 in [-1, 1]
    prompts: list[str]
    sample_index: list[int]
    image_embeds: Tensor | None = None


class System(Protocol):
    """One generator under comparison. `settings` is shown in the report; `calls_per_image` counts the sequential
    network evaluations one image needs (a CFG pair run as one batch counts once; FLOPs count it twice)."""

    name: str
    family: str  # "gpt" or "unclip"
    settings: dict[str, Any]

    def generate(self, prompts: Sequence[str], *, n_per_prompt: int, seed: int) -> Generation: ...

    def calls_per_image(self) -> int: ...

    def flops_per_image(self, prompt: str, *, seed: int) -> float: ...


def _mkldnn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]


def count_flops(fn) -> float:
    """FLOPs of the matmuls, convolutions and attention that `fn()` runs (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    # keyed by the overload packet, as FlopCounterMode looks ops up (an OpOverload key is silently never matched)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.mkldnn._linear_pointwise: _mkldnn_linear_flops}) as counter:
        fn()
    return float(counter.get_total_flops())


class GPTSystem:
    """The AR token road: a GPT pipeline directory (argen.pipeline) with a SamplingConfig."""

    family = "gpt"

    def __init__(self, pipeline_dir: str | Path, sampling, *, name: str = "AR token GPT") -> None:
        from argen.pipeline import Pipeline

        self.pipeline = Pipeline.load(pipeline_dir)
        self.pipeline_dir = Path(pipeline_dir)
        self.sampling = sampling
        self.name = name
        self.settings = {"cfg_scale": sampling.cfg_scale, "cfg_schedule": sampling.cfg_schedule, "top_k": sampling.top_k,
                         "top_p": sampling.top_p, "temperature": sampling.temperature}

    def generate(self, prompts: Sequence[str], *, n_per_prompt: int, seed: int) -> Generation:
        out = self.pipeline.generate(list(prompts), n_per_prompt=n_per_prompt, sampling=self.sampling, seed=seed,
                                     batch_size=128)
        return Generation(images=out.images, prompts=out.prompts, sample_index=out.sample_index)

    def calls_per_image(self) -> int:
        return self.pipeline.layout.num_image_tokens + 1  # prefill + one decode step per further token, + VQ decode

    def flops_per_image(self, prompt: str, *, seed: int) -> float:
        from argen.pipeline import Pipeline

        plain = Pipeline(vq=self.pipeline.vq, text=self.pipeline.text, gpt=self.pipeline.gpt, layout=self.pipeline.layout,
                         manifest=self.pipeline.manifest, pack=False)  # FlopCounterMode cannot see prepacked weights
        return count_flops(lambda: plain.generate([prompt], sampling=self.sampling, seed=seed))


class UnclipSystem:
    """The unCLIP road with one prior (a kind of argen.unclip.priors.PRIORS, or "none") of a unCLIP pipeline directory."""

    family = "unclip"

    def __init__(self, pipeline, sampling, *, name: str) -> None:
        self.pipeline, self.sampling, self.name = pipeline, sampling, name
        s = sampling
        self.settings: dict[str, Any] = {"prior": s.prior, **(PRIORS[s.prior].settings(s) if s.prior in PRIORS else {})}
        self.settings.update(decoder_sampler=s.decoder.sampler, decoder_steps=s.decoder.steps,
                             decoder_cfg=s.decoder.cfg_scale)

    def generate(self, prompts: Sequence[str], *, n_per_prompt: int, seed: int) -> Generation:
        out = self.pipeline.generate(list(prompts), n_per_prompt=n_per_prompt, seed=seed, sampling=self.sampling)
        return Generation(images=out.images, prompts=out.prompts, sample_index=out.sample_index,
                          image_embeds=out.image_embeds)

    def calls_per_image(self) -> int:
        return self.pipeline.calls_per_image(self.sampling)

    def flops_per_image(self, prompt: str, *, seed: int) -> float:
        return count_flops(lambda: self.pipeline.generate([prompt], seed=seed, sampling=self.sampling))


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class SystemResult:
    """Everything measured for one system (intervals are 95% prompt-bootstrap intervals)."""

    name: str
    family: str
    settings: dict[str, Any]
    accuracy: Interval
    accuracy_by_kind: dict[str, Interval]
    attributes: dict[str, Interval]
    clip_score: Interval
    frechet: Interval
    diversity: Interval | None
    prior: dict[str, Interval] | None
    seconds_per_image: float
    calls_per_image: int
    flops_per_image: float
    per_image_correct: list[bool] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def iv(x):
            return None if x is None else x.as_dict()

        return {
            "name": self.name, "family": self.family, "settings": self.settings,
            "accuracy": iv(self.accuracy), "accuracy_by_kind": {k: iv(v) for k, v in self.accuracy_by_kind.items()},
            "attributes": {k: iv(v) for k, v in self.attributes.items()}, "clip_score": iv(self.clip_score),
            "frechet_distance": iv(self.frechet), "diversity": iv(self.diversity),
            "prior": None if self.prior is None else {k: iv(v) for k, v in self.prior.items()},
            "seconds_per_image": self.seconds_per_image, "calls_per_image": self.calls_per_image,
            "flops_per_image": self.flops_per_image,
        }


class Scorer:
    """Scores Generations against one PromptSet with the judge, the judge CLIP and (for priors) the generator CLIP.

    The reference set for the Fréchet distance is the judge-CLIP features of `reference_images` (real val images).
    Prior-only metrics compare each predicted image embedding with the generator CLIP's embedding of its prompt's true
    image; ranks are among the true images of all prompts in the set.
    """

    def __init__(self, prompt_set: PromptSet, *, judge_clip: ClipEncoder, reference_images: Tensor,
                 generator_clip: ClipEncoder | None = None, n_boot: int = 1000, seed: int = 0) -> None:
        self.prompt_set = prompt_set
        self.judge_clip = judge_clip
        self.kind_of = dict(zip(prompt_set.prompts, prompt_set.kinds))
        self.reference = judge_clip.encode_images(reference_images).double().numpy()
        self.reference_stats = feature_statistics(self.reference)
        self.text_embeds = dict(zip(prompt_set.prompts, judge_clip.encode_text(prompt_set.prompts).embeds))
        self.n_boot, self.seed = n_boot, seed
        self.true_embeds: dict[str, Tensor] | None = None
        self.candidates: Tensor | None = None
        if generator_clip is not None:
            true = torch.nn.functional.normalize(generator_clip.encode_images(prompt_set.true_images), dim=-1)
            self.true_embeds = dict(zip(prompt_set.prompts, true))
            self.candidates = true

    def real_floor(self, images: Tensor) -> float:
        """Fréchet distance of real images (not the reference set) at a generated set's size: the noise floor."""
        feats = self.judge_clip.encode_images(images).double().numpy()
        return frechet_distance(*feature_statistics(feats), *self.reference_stats)

    def score(self, system: System, generation: Generation, *, seconds: float, flops_per_image: float) -> SystemResult:
        from argen.eval.prior_metrics import prior_metrics

        prompts = generation.prompts
        boot = PromptBootstrap(prompts, n_boot=self.n_boot, seed=self.seed)
        results = judge_images(prompts, generation.images)
        correct = np.array([r.correct for r in results], dtype=np.float64)
        by_kind = {}
        for kind in dict.fromkeys(self.kind_of[p] for p in prompts):
            idx = [i for i, p in enumerate(prompts) if self.kind_of[p] == kind]
            kind_boot = PromptBootstrap([prompts[i] for i in idx], n_boot=self.n_boot, seed=self.seed)
            by_kind[kind] = kind_boot.mean(correct[idx])
        attributes = {}
        for a in ATTRIBUTES:
            idx = [i for i, r in enumerate(results) if r.attributes[a] is not None]
            if idx:
                sub = PromptBootstrap([prompts[i] for i in idx], n_boot=self.n_boot, seed=self.seed)
                attributes[a] = sub.mean([float(results[i].attributes[a]) for i in idx])
        feats = self.judge_clip.encode_images(generation.images)  # (N, D)
        text = torch.stack([self.text_embeds[p] for p in prompts])
        clip = boot.mean(clip_scores(feats, text))
        feats_np = feats.double().numpy()
        frechet = boot.interval(lambda idx: frechet_distance(*feature_statistics(feats_np[idx]), *self.reference_stats),
                                recentred=True)
        per_prompt = pairwise_diversity(feats, prompts)
        diversity = None
        if per_prompt:
            keys = list(per_prompt)
            diversity = PromptBootstrap(keys, n_boot=self.n_boot, seed=self.seed).mean([per_prompt[k] for k in keys])
        prior = None
        if generation.image_embeds is not None and self.true_embeds is not None:
            true = torch.stack([self.true_embeds[p] for p in prompts])
            m = prior_metrics(generation.image_embeds, true, candidates=self.candidates)
            prior = {"cosine": boot.mean(m.cosine.double().numpy()),
                     "top1": boot.mean((m.rank == 1).double().numpy()),
                     "top5": boot.mean((m.rank <= 5).double().numpy())}
        return SystemResult(
            name=system.name, family=system.family, settings=dict(system.settings), accuracy=boot.mean(correct),
            accuracy_by_kind=by_kind, attributes=attributes, clip_score=clip, frechet=frechet, diversity=diversity,
            prior=prior, seconds_per_image=seconds / len(prompts), calls_per_image=system.calls_per_image(),
            flops_per_image=flops_per_image, per_image_correct=[bool(c) for c in correct],
        )


def run_system(system: System, scorer: Scorer, *, n_per_prompt: int, seed: int, prompts: Sequence[str] | None = None,
               samples_dir: Path | None = None) -> tuple[SystemResult, Generation]:
    """Generate (timed), count one image's FLOPs, score; optionally save the images with a metadata.jsonl that
    `argen data judge` reads."""
    prompts = list(scorer.prompt_set.prompts if prompts is None else prompts)
    start = time.perf_counter()
    generation = system.generate(prompts, n_per_prompt=n_per_prompt, seed=seed)
    seconds = time.perf_counter() - start
    flops = system.flops_per_image(prompts[0], seed=seed)
    result = scorer.score(system, generation, seconds=seconds, flops_per_image=flops)
    if samples_dir is not None:
        save_samples(generation, samples_dir)
    return result, generation


def save_samples(generation: Generation, out: Path) -> None:
    """The images as PNGs with a metadata.jsonl, the image-folder format `argen data judge` scores."""
    from argen.viz import save_image_folder

    names = [f"{r:05d}_s{k}.png" for r, k in enumerate(generation.sample_index)]
    save_image_folder(out, generation.images, generation.prompts, names)


# ----------------------------------------------------------------------------------------------- report
def _fmt(iv: Interval | None, *, percent: bool = False, digits: int = 1) -> str:
    if iv is None:
        return "n/a"
    return iv.format(scale=100, digits=digits, unit="%") if percent else iv.format(digits=digits)


def _flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x < 1e12 else f"{x / 1e12:.2f} TFLOP"


def results_table(results: Sequence[SystemResult], *, kinds: Sequence[str]) -> list[str]:
    """The main markdown table: one row per system, every quality figure with its 95% interval."""
    head = (["system", "settings", "whole prompt"] + [f"{k}" for k in kinds]
            + ["judge-CLIP score", "Fréchet distance", "diversity", "s / image", "calls / image", "FLOPs / image"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        settings = ", ".join(f"{k} {v}" for k, v in r.settings.items() if v is not None)
        cells = [r.name, settings, _fmt(r.accuracy, percent=True)]
        cells += [_fmt(r.accuracy_by_kind.get(k), percent=True) for k in kinds]
        cells += [_fmt(r.clip_score), _fmt(r.frechet, digits=3), _fmt(r.diversity, digits=3),
                  f"{r.seconds_per_image:.3f}", str(r.calls_per_image), _flops(r.flops_per_image)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attribute_table(results: Sequence[SystemResult]) -> list[str]:
    attrs = [a for a in ATTRIBUTES if any(a in r.attributes for r in results)]
    lines = ["| system | " + " | ".join(attrs) + " |", "|" + " --- |" * (len(attrs) + 1)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(_fmt(r.attributes.get(a), percent=True) for a in attrs) + " |")
    return lines


def plot_quality_vs_cost(results: Sequence[SystemResult], path: Path) -> None:
    """Whole-prompt accuracy (with its interval) against FLOPs per image, log x; one point per system, all scored on
    the same prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    markers = "os^Dv<>PX*"
    for i, r in enumerate(results):  # colour and marker both vary, so no two of up to 20 systems look alike
        y, lo, hi = r.accuracy.estimate * 100, r.accuracy.low * 100, r.accuracy.high * 100
        ax.errorbar([r.flops_per_image], [y], yerr=[[y - lo], [hi - y]], fmt=markers[i % len(markers)], capsize=3,
                    color=plt.cm.tab20(i % 20), label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per image (measured, torch.utils.flop_counter)")
    ax.set_ylabel("whole-prompt judge accuracy (%)")
    ax.set_title("Quality against cost (95% prompt-bootstrap intervals)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweeps(sweeps: dict[str, list[tuple[float, SystemResult]]], path: Path) -> None:
    """One column per swept knob: accuracy (top) and diversity (bottom) against the knob's value, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sweeps)
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), squeeze=False)
    for col, knob in enumerate(names):
        points = sorted(sweeps[knob], key=lambda p: p[0])
        xs = [x for x, _ in points]
        for row, (metric, scale, label) in enumerate((("accuracy", 100, "whole-prompt accuracy (%)"),
                                                      ("diversity", 1, "diversity (1 - cos)"))):
            ax = axes[row][col]
            ivs = [getattr(r, metric) for _, r in points]
            if all(iv is not None for iv in ivs):
                ys = [iv.estimate * scale for iv in ivs]
                err = [[(iv.estimate - iv.low) * scale for iv in ivs], [(iv.high - iv.estimate) * scale for iv in ivs]]
                ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
            ax.set_xlabel(knob)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
    fig.suptitle("Sampler sweeps (one knob at a time, others at their defaults)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- the comparison
@dataclass
class CompareSettings:
    """What `run_compare` generates. Sweeps run one knob at a time (others at the main settings) on the first
    `sweep_prompts` prompts; an empty tuple skips that sweep."""

    num_val_prompts: int = 200
    num_heldout_prompts: int = 40
    n_per_prompt: int = 2
    seed: int = 0
    n_boot: int = 1000
    reference_images: int = 2000
    sweep_prompts: int = 48
    sweep_gpt_cfg: tuple[float, ...] = ()
    sweep_prior_cfg: tuple[float, ...] = ()
    sweep_decoder_cfg: tuple[float, ...] = ()
    sweep_prior_steps: tuple[int, ...] = ()
    sweep_decoder_steps: tuple[int, ...] = ()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _grid(generation: Generation, path: Path, *, prompts: int = 8) -> None:
    from argen.viz import contact_sheet, save_png

    keep = [i for i, p in enumerate(generation.prompts) if p in list(dict.fromkeys(generation.prompts))[:prompts]]
    n = max(generation.sample_index) + 1
    save_png(contact_sheet([generation.images[i] for i in keep], [generation.prompts[i] for i in keep], columns=n), path)


def _verdicts(results: dict[str, SystemResult], gens: dict[str, Generation], *, n_boot: int, seed: int) -> list[str]:
    """Paired prompt-bootstrap differences AR prior - diffusion prior (and each prior - no prior)."""
    lines = []
    pairs = [("unCLIP AR prior", "unCLIP diffusion prior"), ("unCLIP AR prior", "unCLIP no prior"),
             ("unCLIP diffusion prior", "unCLIP no prior"), ("AR token GPT", "unCLIP diffusion prior"),
             ("AR token GPT", "unCLIP AR prior")]
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        ra, rb = results[a], results[b]
        boot = PromptBootstrap(gens[a].prompts, n_boot=n_boot, seed=seed)
        acc = boot.difference(ra.per_image_correct, rb.per_image_correct)
        verdict = ("no significant difference" if acc.low <= 0 <= acc.high
                   else f"{a if acc.estimate > 0 else b} is more accurate")
        lines.append(f"- Whole-prompt accuracy, {a} minus {b}: {_fmt(acc, percent=True)} points: {verdict}.")
        for metric, label in (("clip_score", "judge-CLIP score"), ("diversity", "diversity")):
            x, y = getattr(ra, metric), getattr(rb, metric)
            if x is None or y is None:
                continue
            overlap = not (x.low > y.high or y.low > x.high)
            lines.append(f"  - {label}: {_fmt(x, digits=3)} vs {_fmt(y, digits=3)}"
                         + (" (intervals overlap)" if overlap else f" ({a if x.estimate > y.estimate else b} higher)"))
        cost = ra.flops_per_image / max(rb.flops_per_image, 1.0)
        lines.append(f"  - cost: {_flops(ra.flops_per_image)} vs {_flops(rb.flops_per_image)} per image ({cost:.2f}x), "
                     f"{ra.seconds_per_image:.3f} vs {rb.seconds_per_image:.3f} s per image.")
    return lines


def run_compare(out: str | Path, *, judge_clip: str | Path, gpt_pipeline: str | Path | None = None,
                unclip_pipeline: str | Path | None = None, gpt_sampling=None, unclip_sampling=None,
                train_embeddings: str | Path | None = None, settings: CompareSettings | None = None) -> dict:
    """Run every available system on one prompt set and write out/report.md, out/results.json, grids, plots and the
    samples (out/samples/<system>/ with metadata.jsonl, for `argen data judge`)."""
    from argen.data.shapes import ShapesDataset
    from argen.sample import SamplingConfig
    from argen.unclip.pipeline import UnclipPipeline, UnclipSampling

    out = claim_output_dir(out, kind="compare")
    settings = settings or CompareSettings()
    gpt_sampling = gpt_sampling or SamplingConfig(top_k=4)
    base = unclip_sampling or UnclipSampling()
    start_all = time.perf_counter()
    prompt_set = compare_prompts(num_val=settings.num_val_prompts, num_heldout=settings.num_heldout_prompts)
    judge = ClipEncoder.load(judge_clip)
    unclip = UnclipPipeline.load(unclip_pipeline) if unclip_pipeline is not None else None
    if unclip is not None and judge.sha256 == unclip.clip.sha256:
        raise ValueError("the judge CLIP is the generators' CLIP: train a separate judge CLIP (its own seed and data).")
    val = ShapesDataset("val")
    reference = torch.stack([val[i]["image"] for i in range(min(settings.reference_images, len(val)))])
    scorer = Scorer(prompt_set, judge_clip=judge, reference_images=reference,
                    generator_clip=unclip.clip if unclip is not None else None, n_boot=settings.n_boot, seed=settings.seed)
    n_images = len(prompt_set.prompts) * settings.n_per_prompt
    train = ShapesDataset("train")
    floor = scorer.real_floor(torch.stack([train[i]["image"] for i in range(n_images)]))

    def systems_for(gpt_s, unclip_s: UnclipSampling) -> list:
        systems = []
        if gpt_pipeline is not None:
            systems.append(GPTSystem(gpt_pipeline, gpt_s))
        if unclip is not None:
            for prior in unclip.priors:
                systems.append(UnclipSystem(unclip, dataclasses.replace(unclip_s, prior=prior), name=prior_label(prior)))
        return systems

    results: dict[str, SystemResult] = {}
    gens: dict[str, Generation] = {}
    for system in systems_for(gpt_sampling, base):
        print(f"[compare] {system.name}: {len(prompt_set.prompts)} prompts x {settings.n_per_prompt}", flush=True)
        result, gen = run_system(system, scorer, n_per_prompt=settings.n_per_prompt, seed=settings.seed,
                                 samples_dir=out / "samples" / _slug(system.name))
        results[system.name], gens[system.name] = result, gen
        _grid(gen, out / f"grid_{_slug(system.name)}.png")
        print(f"[compare]   whole prompt {_fmt(result.accuracy, percent=True)}, {result.seconds_per_image:.3f} s/image",
              flush=True)

    trivial = {}
    if unclip is not None and train_embeddings is not None:
        trivial = trivial_prior_rows(scorer, unclip.clip, train_embeddings, n_per_prompt=settings.n_per_prompt,
                                     n_boot=settings.n_boot, seed=settings.seed)

    sweeps: dict[str, list[tuple[float, SystemResult]]] = {}
    sweep_prompts = prompt_set.prompts[: settings.sweep_prompts]
    def sweep(knob: str, values, make) -> None:
        for v in values:
            system = make(v)
            print(f"[compare] sweep {knob} = {v}: {system.name}", flush=True)
            result, _ = run_system(system, scorer, n_per_prompt=settings.n_per_prompt, seed=settings.seed,
                                   prompts=sweep_prompts)
            sweeps.setdefault(knob, []).append((float(v), result))

    if gpt_pipeline is not None and settings.sweep_gpt_cfg:
        sweep("GPT cfg", settings.sweep_gpt_cfg,
              lambda v: GPTSystem(gpt_pipeline, dataclasses.replace(gpt_sampling, cfg_scale=v), name=f"AR token GPT cfg {v:g}"))
    if unclip is not None:
        for prior in (p for p in unclip.priors if p in PRIORS):
            if settings.sweep_prior_cfg:
                def make_prior(v, prior=prior):
                    s = PRIORS[prior].with_cfg(dataclasses.replace(base, prior=prior), v)
                    return UnclipSystem(unclip, s, name=f"{prior} prior cfg {v:g}")
                sweep(f"{prior} prior cfg", settings.sweep_prior_cfg, make_prior)
        if "diffusion" in unclip.priors and settings.sweep_prior_steps:
            sweep("diffusion prior steps", settings.sweep_prior_steps, lambda v: UnclipSystem(unclip, UnclipSampling(
                prior="diffusion", diffusion=dataclasses.replace(base.diffusion, steps=int(v)), ar=base.ar,
                decoder=base.decoder), name=f"diffusion prior steps {v}"))
        main_prior = "diffusion" if "diffusion" in unclip.priors else unclip.priors[0]
        if settings.sweep_decoder_cfg:
            sweep("decoder cfg", settings.sweep_decoder_cfg, lambda v: UnclipSystem(unclip, UnclipSampling(
                prior=main_prior, diffusion=base.diffusion, ar=base.ar,
                decoder=dataclasses.replace(base.decoder, cfg_scale=v)), name=f"decoder cfg {v:g}"))
        if settings.sweep_decoder_steps:
            sweep("decoder steps", settings.sweep_decoder_steps, lambda v: UnclipSystem(unclip, UnclipSampling(
                prior=main_prior, diffusion=base.diffusion, ar=base.ar,
                decoder=dataclasses.replace(base.decoder, steps=int(v))), name=f"decoder steps {v}"))

    # the systems only: they are scored on every prompt, the sweep points on the sweep prompts (sweeps.png shows them)
    plot_quality_vs_cost(list(results.values()), out / "quality_vs_cost.png")
    if sweeps:
        plot_sweeps(sweeps, out / "sweeps.png")
    seconds = time.perf_counter() - start_all
    payload = {
        "settings": dataclasses.asdict(settings), "prompts": prompt_set.prompts, "kinds": prompt_set.kinds,
        "judge_clip": {"path": str(judge_clip), "sha256": judge.sha256},
        "gpt_pipeline": None if gpt_pipeline is None else str(gpt_pipeline),
        "unclip_pipeline": None if unclip_pipeline is None else str(unclip_pipeline),
        "frechet_real_floor": floor, "systems": {k: v.as_dict() for k, v in results.items()},
        "trivial_priors": {k: {m: iv.as_dict() for m, iv in v.items()} for k, v in trivial.items()},
        "sweeps": {k: [{"value": x, **r.as_dict()} for x, r in pts] for k, pts in sweeps.items()},
        "verdicts": _verdicts(results, gens, n_boot=settings.n_boot, seed=settings.seed), "seconds": seconds,
    }
    atomic_write_bytes(out / "results.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "report.md", compare_report(payload, results, trivial, sweeps).encode())
    print(f"[compare] wrote {out / 'report.md'} and {out / 'results.json'} in {seconds / 60:.1f} min", flush=True)
    return payload


def trivial_prior_rows(scorer: Scorer, clip: ClipEncoder, train_embeddings: str | Path, *, n_per_prompt: int,
                       n_boot: int, seed: int) -> dict[str, dict[str, Interval]]:
    """Prior-only metrics of the two trivial priors on the compare prompts (same rows, ranks and intervals as the
    real priors): the mean training image embedding, and the image of the nearest training caption."""
    from argen.eval.prior_metrics import mean_embedding_prior, nearest_caption_prior, prior_metrics
    from argen.unclip.embeddings import EmbeddingShard

    shard = EmbeddingShard(train_embeddings, clip_sha256=clip.sha256)
    rows = [p for p in scorer.prompt_set.prompts for _ in range(n_per_prompt)]
    true = torch.stack([scorer.true_embeds[p] for p in rows])
    boot = PromptBootstrap(rows, n_boot=n_boot, seed=seed)
    query = clip.encode_text(rows).embeds
    preds = {"trivial: mean image embedding": mean_embedding_prior(shard.image_embeds, len(rows)),
             "trivial: nearest training caption": nearest_caption_prior(shard.text_embeds, shard.image_embeds, query)}
    out = {}
    for name, pred in preds.items():
        m = prior_metrics(pred, true, candidates=scorer.candidates)
        out[name] = {"cosine": boot.mean(m.cosine.double().numpy()), "top1": boot.mean((m.rank == 1).double().numpy()),
                     "top5": boot.mean((m.rank <= 5).double().numpy())}
    return out


def compare_report(payload: dict, results: dict[str, SystemResult], trivial: dict[str, dict[str, Interval]],
                   sweeps: dict[str, list[tuple[float, SystemResult]]]) -> str:
    kinds = list(dict.fromkeys(payload["kinds"]))
    s = payload["settings"]
    counts = ", ".join(f"{payload['kinds'].count(k)} {k}" for k in kinds)
    lines = [
        "# argen compare", "",
        f"{len(payload['prompts'])} prompts ({counts}) x "
        f"{s['n_per_prompt']} images, seed {s['seed']}, the same for every system. Every quality figure is the estimate "
        f"with its 95% bootstrap interval over prompts ({s['n_boot']} resamples; for the Fréchet distance, whose resamples "
        "repeat images and so score worse, their spread placed at the estimate). Judge: the rule-based shapes judge. "
        f"Judge CLIP: `{payload['judge_clip']['path']}` (trained separately, used by no generator). Fréchet distance on "
        f"judge-CLIP image features against {s['reference_images']} real val images; real train images at the same "
        f"count score {payload['frechet_real_floor']:.3f} (the floor). Diversity: mean pairwise cosine distance of a "
        "prompt's images (judge-CLIP features). FLOPs: one image measured with torch.utils.flop_counter (CFG "
        "included). Wall time: the whole set on this machine, per image.", "",
        "## Systems", "",
    ]
    lines += results_table(list(results.values()), kinds=kinds)
    lines += ["", "## Judge accuracy per attribute", ""] + attribute_table(list(results.values()))
    priors = {k: v.prior for k, v in results.items() if v.prior is not None}
    if priors or trivial:
        lines += ["", "## Prior only (no decoder)", "",
                  "Cosine between the embedding the decoder is given and the generator CLIP's embedding of the image the "
                  "caption was written for; top-1 / top-5: that image is the nearest / among the 5 nearest of the "
                  f"{len(payload['prompts'])} prompts' images. 'no prior' gives the text embedding itself.", "",
                  "| prior | cosine | top-1 | top-5 |", "| --- | --- | --- | --- |"]
        for name, m in list(priors.items()) + list(trivial.items()):
            lines.append(f"| {name} | {_fmt(m['cosine'], digits=3)} | {_fmt(m['top1'], percent=True)} | "
                         f"{_fmt(m['top5'], percent=True)} |")
    lines += ["", "## What the measurement says", ""] + (payload["verdicts"] or ["- (fewer than two systems)"])
    lines += ["", "![quality against cost](quality_vs_cost.png)", ""]
    if sweeps:
        lines += ["## Sweeps", "", f"First {s['sweep_prompts']} prompts, one knob at a time.", "", "![sweeps](sweeps.png)", ""]
        for knob, pts in sweeps.items():
            lines += [f"**{knob}**", ""] + results_table([r for _, r in sorted(pts, key=lambda p: p[0])], kinds=kinds) + [""]
    lines += ["## Samples", ""]
    for name in results:
        lines += [f"**{name}** (first 8 prompts)", "", f"![{name}](grid_{_slug(name)}.png)", ""]
    lines += [f"Samples: `samples/<system>/` (PNG + metadata.jsonl; `argen data judge samples/<system>` re-scores them). "
              f"Total time {payload['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
