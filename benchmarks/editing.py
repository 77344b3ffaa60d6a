"""Editing and control measured on shapes with the rule-based judge, which does not know what was edited: token-space
inpainting, completion and outpainting; best-of-N reranking of AR samples by the generator-side CLIP; unCLIP
variations, interpolations, text diffs and SDEdit. One JSON per part, plots and grids, and editing.md from all parts
found, in benchmarks/results/editing/.

    python benchmarks/editing.py --parts inpaint complete outpaint rerank            # the AR token GPT
    python benchmarks/editing.py --parts variations interpolate text_diff sdedit     # unCLIP (needs --unclip)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from argen.data.shapes import (
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    image_to_tensor,
    object_geometry,
    parse_caption,
    render,
    scene_and_caption,
    scene_has_heldout,
)
from argen.eval.generation import prompt_kind, prompt_set
from argen.eval.judge import judge
from argen.eval.stats import Interval, PromptBootstrap
from argen.sample import SamplingConfig
from argen.viz import contact_sheet, save_png
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir

PARTS = ("inpaint", "complete", "outpaint", "rerank", "variations", "interpolate", "text_diff", "sdedit", "overview")
DEMO_SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=0.25, top_k=4)  # runs/demo/report.json's chosen sampler
RESOLUTION = 32


# ----------------------------------------------------------------------------------------------- edit tasks
@dataclass
class EditTask:
    """A val scene, its caption, and the same caption with one object's colour or shape changed."""

    index: int  # the val scene index
    scene: Scene
    caption: str
    changed: ShapeObject  # the object as it was
    new: ShapeObject  # the object as the new caption says
    new_caption: str
    attribute: str  # "color" or "shape"

    @property
    def image(self) -> torch.Tensor:
        return image_to_tensor(render(self.scene, RESOLUTION))

    def box(self, margin: float = 1.0) -> tuple[float, float, float, float]:
        """The changed object's bounding box plus `margin` px, inside the image."""
        cx, cy, extent = object_geometry(self.changed, RESOLUTION)
        half = extent / 2 + margin
        return (max(0.0, cx - half), max(0.0, cy - half), min(RESOLUTION, cx + half), min(RESOLUTION, cy + half))


def _fix_articles(text: str) -> str:
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    return re.sub(r"\ban (?=[^aeiou])", "a ", text)


def edit_tasks(kind: str, count: int, *, seed: int = 0) -> list[EditTask]:
    """`count` val scenes of `kind` ("single": one object, every attribute stated; "relation": two objects and a
    relation), each with one object's colour or shape changed (half each, at random) to a value that keeps the
    scene out of the held-out combinations and the two objects distinguishable."""
    rng = np.random.default_rng(seed)
    out, index = [], 0
    while len(out) < count:
        scene, caption = scene_and_caption(index, "val")
        index += 1
        if prompt_kind(parse_caption(caption)) != kind:
            continue
        j = int(rng.integers(len(scene.objects)))
        obj = scene.objects[j]
        attribute = "color" if rng.integers(2) else "shape"
        for _ in range(100):
            value = str(rng.choice(list(COLORS) if attribute == "color" else list(SHAPES)))
            new = ShapeObject(**{**obj.__dict__, attribute: value})
            objects = tuple(new if k == j else o for k, o in enumerate(scene.objects))
            if new != obj and not scene_has_heldout(Scene(objects)) and \
                    len({(o.color, o.shape) for o in objects}) == len(objects):
                break
        else:
            continue
        new_caption = _fix_articles(caption.replace(f"{obj.color} {obj.shape}", f"{new.color} {new.shape}"))
        parse_caption(new_caption)  # still in the grammar
        out.append(EditTask(index - 1, scene, caption, obj, new, new_caption, attribute))
    return out


def _iv(interval: Interval) -> dict:
    return interval.as_dict()


def _pct(d: dict) -> str:
    return f"{d['estimate'] * 100:.1f}% [{d['low'] * 100:.1f}, {d['high'] * 100:.1f}]"


def _pts(d: dict) -> str:
    return f"{d['estimate'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"


# ----------------------------------------------------------------------------------------------- AR token parts
def run_inpaint(pipe, out: Path, *, scenes: int, n: int, seed: int, n_boot: int, clip_dir: str | None,
                rerank_draws: int = 8) -> dict:
    """Inpaint one object's box (+1 px) under the caption with its colour or shape changed; every method, and on the
    relation scenes also the best of `rerank_draws` resampled edits by the generator-side CLIP."""
    from argen.edit import EditConfig, edit_images, mask_overlay, mask_pixels
    from argen.rerank import clip_similarity, load_clip

    result: dict = {"scenes_per_kind": scenes, "edits_per_scene": n, "sampling": str(DEMO_SAMPLING), "kinds": {}}
    grid_tiles, grid_labels = [], []
    for kind in ("single", "relation"):
        tasks = edit_tasks(kind, scenes, seed=seed)
        images = torch.stack([t.image for t in tasks])
        masks = torch.stack([mask_pixels(box=t.box(), resolution=RESOLUTION) for t in tasks])
        prompts = [t.new_caption for t in tasks]
        rows: dict = {}
        verdicts: dict[str, np.ndarray] = {}
        shown: dict[str, torch.Tensor] = {}
        for method in ("ar", "resample", "gibbs"):
            r, judged, verdicts[method], boot, seconds = _edit_and_judge(pipe, images, masks, prompts, method=method,
                                                                         n=n, seed=seed, n_boot=n_boot)
            nll = r.suffix_nll[~r.suffix_nll.isnan()]
            rows[method] = {
                "accuracy": _iv(boot.mean(verdicts[method])),
                "edited_attribute_right": float(np.mean([bool(j.attributes[tasks[i].attribute])
                                                         for j, i in zip(judged, r.source_index)])),
                "object_missing": float(np.mean([not j.attributes["count"] for j in judged])),
                "suffix_nll": float(nll.mean()) if len(nll) else None,
                "psnr_outside_decoded_db": float(r.psnr_outside.mean()),
                "recon_psnr_outside_db": float(r.recon_psnr_outside.mean()),
                "psnr_outside_pasted_db": "inf (the source pixels)",
                "codes_regenerated": float(r.mask.cells.flatten(1).sum(1).float().mean()),
                "seconds_per_image": seconds / len(r.prompts), "forward_passes": r.forward_passes,
                "failures": [f"{p}: {j.reason}" for p, j in zip(r.prompts, judged) if not j.correct][:6],
            }
            if method != "ar":
                rows[method]["difference_vs_ar"] = _iv(boot.difference(verdicts[method], verdicts["ar"]))
            print(json.dumps({"part": "inpaint", "kind": kind, "method": method, "accuracy": rows[method]["accuracy"],
                              "suffix_nll": rows[method]["suffix_nll"], "s": round(seconds, 1)}), flush=True)
            if kind == "relation":
                shown[method], snapped = r.images[::n][:6], r.mask.pixels
        if kind == "relation" and clip_dir:
            start = time.perf_counter()
            r = edit_images(pipe, images, masks, prompts, n=rerank_draws, sampling=DEMO_SAMPLING,
                            config=EditConfig(method="resample"), seed=seed)
            scores = clip_similarity(load_clip(clip_dir), r.prompts, r.images).view(len(tasks), rerank_draws)
            seconds = time.perf_counter() - start
            ok = np.array([judge(p, im).correct for p, im in zip(r.prompts, r.images)], dtype=float).reshape(len(tasks), -1)
            # the first n of the draws are the plain resample rows above (same seeds): pair against them
            best = ok[np.arange(len(tasks)), scores.argmax(dim=1).numpy()]
            per_task = np.repeat(best, n)
            boot = PromptBootstrap([i for i in range(len(tasks)) for _ in range(n)], n_boot=n_boot, seed=seed)
            rows[f"resample, best of {rerank_draws} by CLIP"] = {
                "accuracy": _iv(boot.mean(per_task)), "difference_vs_ar": _iv(boot.difference(per_task, verdicts["ar"])),
                "any_of_draws_right": float(ok.any(axis=1).mean()), "seconds_per_image": seconds / len(tasks),
                "clip": clip_dir}
        result["kinds"][kind] = {"tasks": [{"scene": t.index, "caption": t.caption, "new_caption": t.new_caption,
                                            "attribute": t.attribute, "box": t.box()} for t in tasks], "methods": rows}
        if kind == "relation":  # one row per scene: source, region, then each method's first edit
            for i in range(min(6, len(tasks))):
                grid_tiles += [images[i], mask_overlay(images[i], snapped[i])]
                grid_labels += [tasks[i].caption, "region; new caption: " + tasks[i].new_caption]
                for method, shown_images in shown.items():
                    grid_tiles.append(shown_images[i])
                    grid_labels.append(f"{method}: {'right' if verdicts[method][i * n] else 'wrong'}")
    save_png(contact_sheet(grid_tiles, grid_labels, columns=5), out / "inpaint_grid.png")
    return result


def run_complete(pipe, out: Path, *, scenes: int, n: int, seed: int, n_boot: int) -> dict:
    """Keep the top half of two-object relation scenes and complete the rest under their caption (plain AR: exact,
    nothing kept follows the region)."""
    from argen.edit import EditConfig, edit_images, mask_overlay, mask_pixels

    tasks = edit_tasks("relation", scenes, seed=seed)
    images = torch.stack([t.image for t in tasks])
    prompts = [t.caption for t in tasks]
    keep_rows = RESOLUTION // 2
    start = time.perf_counter()
    r = edit_images(pipe, images, mask_pixels(box=(0, keep_rows, RESOLUTION, RESOLUTION), resolution=RESOLUTION),
                    prompts, n=n, sampling=DEMO_SAMPLING, config=EditConfig(method="ar"), seed=seed)
    seconds = time.perf_counter() - start
    judged = [judge(p, im) for p, im in zip(r.prompts, r.images)]
    ok = np.array([j.correct for j in judged], dtype=float)
    # how much of the scene the kept half shows: objects whose box centre lies in the kept rows
    kept_objects = [sum(object_geometry(o, RESOLUTION)[1] < keep_rows for o in t.scene.objects) for t in tasks]
    by_kept = {}
    for k in (0, 1, 2):
        idx = [i for i, (s, _) in enumerate(zip(r.source_index, ok)) if kept_objects[s] == k]
        by_kept[str(k)] = {"images": len(idx), "accuracy": float(ok[idx].mean()) if idx else None}
    boot = PromptBootstrap(r.source_index, n_boot=n_boot, seed=seed)
    tiles, labels = [], []
    for i in range(8):
        tiles += [images[i], mask_overlay(images[i], r.mask.pixels[i])] + [r.images[i * n + k] for k in range(min(n, 3))]
        labels += [tasks[i].caption, "regenerated"] + [f"completion {k}: {'right' if ok[i * n + k] else 'wrong'}"
                                                       for k in range(min(n, 3))]
    save_png(contact_sheet(tiles, labels, columns=2 + min(n, 3)), out / "complete_grid.png")
    return {"scenes": scenes, "completions_per_scene": n, "keep_rows": keep_rows, "sampling": str(DEMO_SAMPLING),
            "method": "ar", "accuracy": _iv(boot.mean(ok)), "accuracy_by_objects_in_kept_half": by_kept,
            "seconds_per_image": seconds / len(ok),
            "failures": [f"{p}: {j.reason}" for p, j in zip(r.prompts, judged) if not j.correct][:6]}


def _edit_and_judge(pipe, images, masks, prompts, *, method: str, n: int, seed: int, n_boot: int):
    """(the edit, each image's judgement, its 0/1 verdicts, a bootstrap over source scenes, seconds) of one method."""
    from argen.edit import EditConfig, edit_images

    start = time.perf_counter()
    r = edit_images(pipe, images, masks, prompts, n=n, sampling=DEMO_SAMPLING, config=EditConfig(method=method), seed=seed)
    seconds = time.perf_counter() - start
    judged = [judge(p, im) for p, im in zip(r.prompts, r.images)]
    verdicts = np.array([j.correct for j in judged], dtype=float)
    return r, judged, verdicts, PromptBootstrap(r.source_index, n_boot=n_boot, seed=seed), seconds


def run_outpaint(pipe, out: Path, *, scenes: int, n: int, seed: int, n_boot: int) -> dict:
    """Keep the left half of relation scenes and generate the right half under their caption: every row has kept
    tokens after the region, so agreeing with the suffix matters most here."""
    from argen.edit import mask_overlay, mask_pixels

    tasks = edit_tasks("relation", scenes, seed=seed)
    images = torch.stack([t.image for t in tasks])
    prompts = [t.caption for t in tasks]
    regenerate = ~mask_pixels(box=(0, 0, RESOLUTION // 2, RESOLUTION), resolution=RESOLUTION)
    rows, verdicts, shown = {}, {}, {}
    for method in ("ar", "resample", "gibbs"):
        r, judged, verdicts[method], boot, seconds = _edit_and_judge(pipe, images, regenerate, prompts, method=method,
                                                                     n=n, seed=seed, n_boot=n_boot)
        rows[method] = {"accuracy": _iv(boot.mean(verdicts[method])), "suffix_nll": float(r.suffix_nll.nanmean()),
                        "seconds_per_image": seconds / len(judged)}
        if method != "ar":
            rows[method]["difference_vs_ar"] = _iv(boot.difference(verdicts[method], verdicts["ar"]))
        shown[method] = r
        print(json.dumps({"part": "outpaint", "method": method, **rows[method]}), flush=True)
    tiles, labels = [], []
    for i in range(6):
        tiles += [images[i], mask_overlay(images[i], shown["ar"].mask.pixels[i])]
        labels += [tasks[i].caption, "regenerated"]
        for method in rows:
            tiles.append(shown[method].images[i * n])
            labels.append(f"{method}: {'right' if verdicts[method][i * n] else 'wrong'}")
    save_png(contact_sheet(tiles, labels, columns=5), out / "outpaint_grid.png")
    return {"scenes": scenes, "edits_per_scene": n, "kept": "left half (x < 16)", "sampling": str(DEMO_SAMPLING),
            "methods": rows}


DIVERSE_SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=4)  # the demo sweep's T 1 column


def run_rerank(pipe, out: Path, *, clip_dir: str, prompts: int, draws: int, seed: int, n_boot: int) -> dict:
    """Best-of-N by the generator-side CLIP on relation val prompts, at the demo's sampler and at temperature 1;
    N = 1, 2, 4, ..., `draws` from one set of draws per sampler (draw k of a prompt does not depend on N), best-of-N
    averaged over the draws // N disjoint groups of N draws."""
    from argen.rerank import clip_similarity, load_clip

    prompt_list = prompt_set("relation", max_prompts=prompts)
    clip = load_clip(clip_dir)
    boot = PromptBootstrap(prompt_list, n_boot=n_boot, seed=seed)
    ns = [2**k for k in range(int(np.log2(draws)) + 1)]
    settings: dict = {}
    reference = None
    for name, sampling in (("demo", DEMO_SAMPLING), ("temperature 1", DIVERSE_SAMPLING)):
        start = time.perf_counter()
        gen = pipe.generate(prompt_list, n_per_prompt=draws, sampling=sampling, seed=seed, batch_size=64)
        sample_s = time.perf_counter() - start
        scores = clip_similarity(clip, gen.prompts, gen.images).view(len(prompt_list), draws).numpy()
        ok = np.array([judge(p, im).correct for p, im in zip(gen.prompts, gen.images)],
                      dtype=float).reshape(len(prompt_list), draws)

        def best_of(n: int, key: np.ndarray, ok=ok) -> np.ndarray:
            """Per prompt, the mean over draws // n disjoint groups of the verdict of the group's highest-key draw."""
            groups = ok[:, :draws // n * n].reshape(len(prompt_list), -1, n)
            keys = key[:, :draws // n * n].reshape(len(prompt_list), -1, n)
            return np.take_along_axis(groups, keys.argmax(axis=2)[..., None], axis=2)[..., 0].mean(axis=1)

        base = best_of(1, scores)
        reference = base if reference is None else reference
        curve, oracle = {}, {}
        for n in ns:
            per_prompt = best_of(n, scores)
            curve[str(n)] = {"accuracy": _iv(boot.mean(per_prompt)), "difference_vs_1": _iv(boot.difference(per_prompt, base)),
                             "difference_vs_demo_1": _iv(boot.difference(per_prompt, reference))}
            oracle[str(n)] = float(best_of(n, ok + 1e-3 * scores).mean())  # any right draw among n
        settings[name] = {"sampling": str(sampling), "curve": curve, "oracle_any_right": oracle,
                          "sampling_seconds": sample_s, "distinct_images_per_prompt": float(np.mean([
                              len({gen.codes[p * draws + k].numpy().tobytes() for k in range(draws)})
                              for p in range(len(prompt_list))])),
                          "clip_score_right_vs_wrong": [float(scores[ok == 1].mean()), float(scores[ok == 0].mean())]}
        print(json.dumps({"part": "rerank", "setting": name, "best_of_8": curve.get("8")}), flush=True)
        if name == "demo":
            tiles, labels = [], []
            for p in range(6):
                order = np.argsort(-scores[p, :8], kind="stable")
                for rank, k in enumerate(order):
                    tiles.append(gen.images[p * draws + k])
                    labels.append(f"{'KEPT ' if rank == 0 else ''}CLIP {scores[p, k]:.3f}, {'right' if ok[p, k] else 'wrong'}"
                                  + (f": {prompt_list[p]}" if rank == 0 else ""))
            save_png(contact_sheet(tiles, labels, columns=8), out / "rerank_grid.png")
    _plot_rerank(settings, out / "rerank_curve.png", prompts=len(prompt_list), draws=draws)
    return {"prompts": len(prompt_list), "draws_per_prompt": draws, "clip": clip_dir, "settings": settings}


def _plot_rerank(settings: dict, path: Path, *, prompts: int, draws: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (name, s), color in zip(settings.items(), ("tab:blue", "tab:orange")):
        ns = [int(n) for n in s["curve"]]
        acc = [s["curve"][str(n)]["accuracy"] for n in ns]
        ax.fill_between(ns, [a["low"] * 100 for a in acc], [a["high"] * 100 for a in acc], alpha=0.15, color=color)
        ax.plot(ns, [a["estimate"] * 100 for a in acc], "o-", color=color, label=f"{name}: best of N by CLIP")
        ax.plot(ns, [s["oracle_any_right"][str(n)] * 100 for n in ns], "s:", color=color, alpha=0.7,
                label=f"{name}: any of N right (ceiling)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (draws per prompt)")
    ax.set_ylabel("relation whole-prompt accuracy (%)")
    ax.set_title(f"demo GPT, {prompts} relation val prompts x {draws} draws\n(bands: 95% prompt-bootstrap intervals)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- unCLIP parts
def _judged_value(image: torch.Tensor, attribute: str) -> tuple[str, int]:
    """What the judge reads for `attribute` on the largest object it finds ("none" when it finds none), and how many
    objects it finds."""
    from argen.eval.judge import classify, measure

    blobs = measure(image)
    if not blobs:
        return "none", 0
    return getattr(classify(max(blobs, key=lambda b: b.area), resolution=image.shape[-1]), attribute), len(blobs)


def _path_report(paths: list[list[str]], starts: list[str], ends: list[str], counts: list[list[int]]) -> dict:
    """How the judged attribute moves along each path. monotone: no value comes back once the path has left it (each
    value holds one contiguous run, e.g. red, red, magenta, blue, blue); ends_right: the first step shows the start's
    value and the last the end's; direct: only those two values appear; one_object: the judge finds exactly one
    object at every step (the attribute is read on the largest)."""
    def contiguous(path: list[str]) -> bool:
        runs = [v for k, v in enumerate(path) if k == 0 or v != path[k - 1]]
        return len(runs) == len(set(runs))

    monotone = [contiguous(p) for p in paths]
    ends_right = [p[0] == a and p[-1] == b for p, a, b in zip(paths, starts, ends)]
    direct = [set(p) <= {a, b} for p, a, b in zip(paths, starts, ends)]
    return {"paths": len(paths), "monotone": float(np.mean(monotone)), "ends_right": float(np.mean(ends_right)),
            "monotone_and_ends_right": float(np.mean([m and e for m, e in zip(monotone, ends_right)])),
            "direct_and_ends_right": float(np.mean([m and e and d for m, e, d in zip(monotone, ends_right, direct)])),
            "reaches_target": float(np.mean([p[-1] == b for p, b in zip(paths, ends)])),
            "one_object": float(np.mean([all(c == 1 for c in cs) for cs in counts]))}


def _by_attribute(paths: list, starts: list, ends: list, counts: list, kinds: list) -> dict:
    """_path_report of all paths and of the paths that change each attribute."""
    out = {}
    for attr in ("color", "shape", "all"):
        keep = [i for i, k in enumerate(kinds) if k == attr or attr == "all"]
        if keep:
            out[attr] = _path_report(*([seq[i] for i in keep] for seq in (paths, starts, ends, counts)))
    return out


def _scene_image(scene: Scene) -> torch.Tensor:
    return image_to_tensor(render(scene, RESOLUTION))


def _swap(task: EditTask) -> Scene:
    return Scene(tuple(task.new if o == task.changed else o for o in task.scene.objects))


def run_variations(upipe, judge_clip, out: Path, *, scenes: int, n: int, seed: int, n_boot: int) -> dict:
    """n variations of single-object and relation val scenes, judged against the source caption, with their
    diversity (compare's figure: mean 1 - cos between the judge CLIP's embeddings of one source's images) beside
    the unCLIP text-to-image samples of the same caption (diffusion prior)."""
    from argen.eval.clip_metrics import pairwise_diversity
    from argen.eval.judge import ATTRIBUTES
    from argen.unclip.controls import variations
    from argen.unclip.pipeline import UnclipSampling

    result: dict = {"scenes_per_kind": scenes, "variations_per_scene": n, "kinds": {}}
    tiles, labels = [], []
    for kind in ("single", "relation"):
        tasks = edit_tasks(kind, scenes, seed=seed)
        rows = {}
        for name in ("variations", "text-to-image (diffusion prior)"):
            images, prompts, groups = [], [], []
            start = time.perf_counter()
            for i, t in enumerate(tasks):
                if name == "variations":
                    x = variations(upipe, t.image, n=n, seed=seed).images
                else:
                    x = upipe.generate(t.caption, n_per_prompt=n, seed=seed, sampling=UnclipSampling(prior="diffusion")).images
                images.append(x)
                prompts += [t.caption] * n
                groups += [i] * n
            seconds = time.perf_counter() - start
            images = torch.cat(images)
            judged = [judge(p, im) for p, im in zip(prompts, images)]
            ok = np.array([j.correct for j in judged], dtype=float)
            boot = PromptBootstrap(groups, n_boot=n_boot, seed=seed)
            feats = judge_clip.encode_images(images)
            div = pairwise_diversity(feats, [str(g) for g in groups])
            sources = F.normalize(judge_clip.encode_images(torch.stack([t.image for t in tasks])).float(), dim=-1)
            cos = (F.normalize(feats.float(), dim=-1) * sources[groups]).sum(-1).numpy()
            rows[name] = {
                "accuracy": _iv(boot.mean(ok)),
                "attributes": {a: float(np.mean([j.attributes[a] for j in judged if j.attributes[a] is not None]))
                               for a in ATTRIBUTES if any(j.attributes[a] is not None for j in judged)},
                "diversity": _iv(PromptBootstrap(list(div), n_boot=n_boot, seed=seed).mean(list(div.values()))),
                "judge_clip_cos_to_source": _iv(boot.mean(cos)),
                "seconds_per_image": seconds / len(ok),
                "failures": [f"{p}: {j.reason}" for p, j in zip(prompts, judged) if not j.correct][:6]}
            if name == "variations":
                for i in range(min(4 if kind == "single" else 3, len(tasks))):
                    tiles += [tasks[i].image] + list(images[i * n:(i + 1) * n])
                    labels += [f"source: {tasks[i].caption}"] + [f"{'right' if ok[i * n + k] else 'wrong'}"
                                                                  for k in range(n)]
            print(json.dumps({"part": "variations", "kind": kind, "system": name, "accuracy": rows[name]["accuracy"],
                              "diversity": rows[name]["diversity"]}), flush=True)
        result["kinds"][kind] = rows
    save_png(contact_sheet(tiles, labels, columns=n + 1), out / "variations_grid.png")
    return result


def run_interpolate(upipe, out: Path, *, scenes: int, n: int, seed: int, n_boot: int, steps: int = 5) -> dict:
    """Interpolate between a single-object scene and the same scene with its colour (or shape) changed, `n` noise
    seeds per pair; the judged attribute along each path."""
    from argen.unclip.controls import interpolate

    tasks = edit_tasks("single", scenes, seed=seed)
    paths, starts, ends, counts, kinds, tiles, labels = [], [], [], [], [], [], []
    for i, t in enumerate(tasks):
        for s in range(n):
            r = interpolate(upipe, t.image, _scene_image(_swap(t)), steps=steps, seed=seed + s)
            values, found = zip(*[_judged_value(im, t.attribute) for im in r.images])
            paths.append(list(values))
            counts.append(list(found))
            starts.append(getattr(t.changed, t.attribute))
            ends.append(getattr(t.new, t.attribute))
            kinds.append(t.attribute)
            if s == 0 and i < 8:
                tiles += [t.image] + list(r.images) + [_scene_image(_swap(t))]
                labels += ["start"] + [f"t={v:.2f}: {j}" for v, j in zip(r.values, values)] + ["end"]
    save_png(contact_sheet(tiles, labels, columns=steps + 2), out / "interpolate_grid.png")
    return {"pairs": scenes, "paths_per_pair": n, "steps": steps, "decoder": "DecoderSampling() defaults",
            **_by_attribute(paths, starts, ends, counts, kinds)}


def run_text_diff(upipe, out: Path, *, scenes: int, n: int, seed: int, n_boot: int, steps: int = 6,
                  max_angle: float = 0.5) -> dict:
    """Move single-object scenes along the text diff from their caption to the caption with the colour (or shape)
    changed; the judged attribute along each path."""
    from argen.unclip.controls import text_diff

    tasks = edit_tasks("single", scenes, seed=seed)
    paths, starts, ends, counts, kinds, tiles, labels = [], [], [], [], [], [], []
    for i, t in enumerate(tasks):
        for s in range(n):
            r = text_diff(upipe, t.image, t.caption, t.new_caption, steps=steps, max_angle=max_angle, seed=seed + s)
            values, found = zip(*[_judged_value(im, t.attribute) for im in r.images])
            paths.append(list(values))
            counts.append(list(found))
            starts.append(getattr(t.changed, t.attribute))
            ends.append(getattr(t.new, t.attribute))
            kinds.append(t.attribute)
            if s == 0 and i < 8:
                tiles += [t.image] + list(r.images)
                labels += [f"{t.caption} -> {t.new_caption}"] + [f"theta={v:.2f}: {j}" for v, j in zip(r.values, values)]
    save_png(contact_sheet(tiles, labels, columns=steps + 1), out / "text_diff_grid.png")
    return {"images": scenes, "paths_per_image": n, "steps": steps, "max_angle": max_angle,
            **_by_attribute(paths, starts, ends, counts, kinds)}


SDEDIT_STRENGTHS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def run_sdedit(upipe, judge_clip, out: Path, *, scenes: int, n: int, seed: int, n_boot: int) -> dict:
    """SDEdit single-object scenes towards the caption with their colour (or shape) changed, at each noise level:
    accuracy against the new caption, and PSNR and judge-CLIP cosine to the source."""
    from argen.unclip.controls import sdedit
    from argen.unclip.pipeline import UnclipSampling
    from tokenizers_img.metrics import psnr

    tasks = edit_tasks("single", scenes, seed=seed)
    sampling = UnclipSampling(prior="diffusion")
    sources = torch.stack([t.image for t in tasks])
    source_feats = F.normalize(judge_clip.encode_images(sources).float(), dim=-1)
    curve, grid = {}, {}
    for strength in SDEDIT_STRENGTHS:
        start = time.perf_counter()
        images = torch.cat([sdedit(upipe, t.image, t.new_caption, strength=strength, n=n, seed=seed,
                                   sampling=sampling).images for t in tasks])
        seconds = time.perf_counter() - start
        idx = [i for i in range(len(tasks)) for _ in range(n)]
        judged = [judge(tasks[i].new_caption, im) for i, im in zip(idx, images)]
        ok = np.array([j.correct for j in judged], dtype=float)
        edited = np.array([bool(j.attributes[tasks[i].attribute]) for i, j in zip(idx, judged)], dtype=float)
        p = psnr(images, sources[idx]).clamp(max=60).numpy()  # strength 0 is the source itself (inf dB)
        cos = (F.normalize(judge_clip.encode_images(images).float(), dim=-1) * source_feats[idx]).sum(-1).numpy()
        boot = PromptBootstrap(idx, n_boot=n_boot, seed=seed)
        curve[f"{strength:g}"] = {"accuracy": _iv(boot.mean(ok)), "edited_attribute_right": _iv(boot.mean(edited)),
                                  "psnr_to_source_db": _iv(boot.mean(p)), "judge_clip_cos_to_source": _iv(boot.mean(cos)),
                                  "seconds_per_image": seconds / len(ok)}
        grid[strength] = (images, ok)
        print(json.dumps({"part": "sdedit", "strength": strength, **{k: v for k, v in curve[f"{strength:g}"].items()
                                                                      if k in ("accuracy", "psnr_to_source_db")}}), flush=True)
    tiles, labels = [], []
    for i in range(min(8, len(tasks))):
        tiles.append(tasks[i].image)
        labels.append(f"{tasks[i].caption} -> {tasks[i].new_caption}")
        for strength, (images, ok) in grid.items():
            tiles.append(images[i * n])
            labels.append(f"{strength:g}: {'right' if ok[i * n] else 'wrong'}")
    save_png(contact_sheet(tiles, labels, columns=len(SDEDIT_STRENGTHS) + 1), out / "sdedit_grid.png")
    _plot_sdedit(curve, out / "sdedit_curve.png", scenes=len(tasks), n=n)
    return {"scenes": scenes, "edits_per_scene": n, "prior": sampling.prior, "decoder": str(sampling.decoder),
            "curve": curve}


def _plot_sdedit(curve: dict, path: Path, *, scenes: int, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(s) for s in curve]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("accuracy", "new caption right (whole)", "o-"),
                              ("edited_attribute_right", "edited colour / shape right", "s--")):
        ax1.plot(xs, [curve[s][key]["estimate"] * 100 for s in curve], style, label=label)
        ax1.fill_between(xs, [curve[s][key]["low"] * 100 for s in curve], [curve[s][key]["high"] * 100 for s in curve],
                         alpha=0.2)
    ax1.set_xlabel("noise level (strength)")
    ax1.set_ylabel("judge accuracy against the new caption (%)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [curve[s]["psnr_to_source_db"]["estimate"] for s in curve], "o-", color="tab:green")
    ax2.set_xlabel("noise level (strength)")
    ax2.set_ylabel("PSNR to the source (dB, capped at 60)", color="tab:green")
    ax3 = ax2.twinx()
    ax3.plot(xs, [curve[s]["judge_clip_cos_to_source"]["estimate"] for s in curve], "s--", color="tab:purple")
    ax3.set_ylabel("judge-CLIP cosine to the source", color="tab:purple")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"SDEdit with the unCLIP decoder: {scenes} single-object val scenes x {n}, colour or shape changed "
                 "(bands: 95% intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_unclip_part(part: str, out: Path, *, unclip: str, judge_clip: str, scenes: int, n: int, variations: int,
                    seed: int, n_boot: int) -> dict:
    from argen.unclip.clip import ClipEncoder
    from argen.unclip.pipeline import UnclipPipeline

    upipe = UnclipPipeline.load(unclip)
    kw = dict(scenes=scenes, n=n, seed=seed, n_boot=n_boot)
    if part in ("variations", "sdedit"):
        judge_encoder = ClipEncoder.load(judge_clip)
        if part == "variations":
            kw["n"] = variations
        run = run_variations if part == "variations" else run_sdedit
        return {**run(upipe, judge_encoder, out, **kw), "unclip": unclip, "judge_clip": judge_clip}
    run = run_interpolate if part == "interpolate" else run_text_diff
    return {**run(upipe, out, **kw), "unclip": unclip}


# ----------------------------------------------------------------------------------------------- overview
def run_overview(pipe, upipe, out: Path, *, clip_dir: str, seed: int) -> dict:
    """One row per control, each made by its one call on the loaded pipeline (PIL images in, PIL images out)."""
    from argen.data.transforms import pil_to_tensor, tensor_to_pil
    from argen.edit import mask_overlay, mask_pixels

    rel = edit_tasks("relation", 1, seed=seed)[0]
    single = edit_tasks("single", 3, seed=seed)
    source, solo = tensor_to_pil(rel.image), tensor_to_pil(single[0].image)
    other = tensor_to_pil(_scene_image(_swap(single[0])))
    shaped = next(t for t in single if t.attribute == "shape")
    prompts = prompt_set("relation", max_prompts=4)
    grey = lambda box: mask_overlay(rel.image, mask_pixels(box=box, resolution=RESOLUTION))  # noqa: E731
    rows = [
        ("pipe.inpaint(image, new caption, box=...)", grey(rel.box()), rel.new_caption,
         pipe.inpaint(source, rel.new_caption, box=rel.box(), n=4, seed=seed)),
        ("pipe.complete(image, caption, keep_rows=16)", grey((0, 16, 32, 32)), rel.caption,
         pipe.complete(source, rel.caption, keep_rows=16, n=4, seed=seed)),
        ("pipe.outpaint(image, caption, keep_box=(0, 0, 16, 32))", grey((16, 0, 32, 32)), rel.caption,
         pipe.outpaint(source, rel.caption, keep_box=(0, 0, 16, 32), n=4, seed=seed)),
        ("pipe.rerank(prompts, clip=..., n=8): the best of 8 for each prompt", None, prompts,
         pipe.rerank(prompts, clip=clip_dir, n=8, seed=seed)),
        ("upipe.variations(image, n=4)", single[0].image, single[0].caption, upipe.variations(solo, n=4, seed=seed)),
        ("upipe.interpolate(a, b, steps=4)", single[0].image, f"to: {single[0].new_caption}",
         upipe.interpolate(solo, other, steps=4, seed=seed)),
        ("upipe.text_diff(image, caption, new caption, steps=4)", shaped.image, f"to: {shaped.new_caption}",
         upipe.text_diff(tensor_to_pil(shaped.image), shaped.caption, shaped.new_caption, steps=4, seed=seed)),
        ("upipe.sdedit(image, new caption, strength=0.7)", shaped.image, shaped.new_caption,
         upipe.sdedit(tensor_to_pil(shaped.image), shaped.new_caption, strength=0.7, n=4, seed=seed)),
    ]
    tiles, labels = [], []
    for call, first, caption, images in rows:
        tiles.append(first if first is not None else torch.ones(3, RESOLUTION, RESOLUTION))
        labels.append(call)
        tiles += [pil_to_tensor(im) for im in images]
        labels += caption if isinstance(caption, list) else [caption] * len(images)
    save_png(contact_sheet(tiles, labels, columns=5), out / "overview.png")
    return {"rows": [r[0] for r in rows], "clip": clip_dir}


# ----------------------------------------------------------------------------------------------- markdown
def markdown(results: dict) -> str:
    lines = ["# Editing and control: measurements", "",
             "Written by `benchmarks/editing.py` (commands in each section); the judge is `argen.eval.judge`, which "
             "is not told what was edited. Intervals: 95% bootstrap over source scenes or prompts; differences paired.", ""]
    for part in ("overview", *(p for p in PARTS if p != "overview")):
        if part not in results:
            continue
        r = results[part]
        lines += [f"## {part}", "", f"Command: `{r['command']}`", "", f"Host: {r['host']}.", ""]
        lines += SECTIONS[part](r) + [""]
    return "\n".join(lines)


def _md_inpaint(r: dict) -> list[str]:
    lines = [f"{r['scenes_per_kind']} val scenes per kind, {r['edits_per_scene']} edits each; sampling {r['sampling']}.", "",
             "| scenes | method | new caption right | vs ar | edited attribute right | object missing | suffix NLL | "
             "PSNR outside, decoded codes / tokenizer recon | s / image |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, k in r["kinds"].items():
        for method, m in k["methods"].items():
            diff = _pts(m["difference_vs_ar"]) if "difference_vs_ar" in m else ""
            if "suffix_nll" not in m:  # the CLIP-reranked row: one kept image per scene
                lines.append(f"| {kind} | {method} | {_pct(m['accuracy'])} | {diff} | | | | | {m['seconds_per_image']:.2f} |")
                continue
            nll = f"{m['suffix_nll']:.3f}" if m["suffix_nll"] is not None else ""
            lines.append(f"| {kind} | {method} | {_pct(m['accuracy'])} | {diff} | {m['edited_attribute_right'] * 100:.1f}% | "
                         f"{m['object_missing'] * 100:.1f}% | {nll} | {m['psnr_outside_decoded_db']:.1f} / "
                         f"{m['recon_psnr_outside_db']:.1f} dB | {m['seconds_per_image']:.2f} |")
    return lines + ["", "Pasted images equal the source outside the regenerated cells (PSNR infinite there).", "",
                    "![inpainting: source, region, ar, resample, gibbs](inpaint_grid.png)"]


def _md_complete(r: dict) -> list[str]:
    by = ", ".join(f"{k} object(s) in the kept half: {v['accuracy'] * 100:.1f}% of {v['images']}"
                   for k, v in r["accuracy_by_objects_in_kept_half"].items() if v["images"])
    return [f"{r['scenes']} relation val scenes, top {r['keep_rows']} px kept, {r['completions_per_scene']} completions each "
            f"({r['method']}); sampling {r['sampling']}.", "",
            f"Completed scene matches the caption: **{_pct(r['accuracy'])}** ({by}).", "",
            "![completion](complete_grid.png)"]


def _md_outpaint(r: dict) -> list[str]:
    lines = [f"{r['scenes']} relation val scenes, {r['kept']} kept, {r['edits_per_scene']} each; sampling {r['sampling']}.",
             "", "| method | caption right | vs ar | suffix NLL | s / image |", "| --- | --- | --- | --- | --- |"]
    for method, m in r["methods"].items():
        diff = _pts(m["difference_vs_ar"]) if "difference_vs_ar" in m else ""
        lines.append(f"| {method} | {_pct(m['accuracy'])} | {diff} | {m['suffix_nll']:.3f} | {m['seconds_per_image']:.2f} |")
    return lines + ["", "![outpainting](outpaint_grid.png)"]


def _md_rerank(r: dict) -> list[str]:
    lines = [f"{r['prompts']} relation val prompts x {r['draws_per_prompt']} draws per sampler; CLIP `{r['clip']}` "
             "(generator side). best of N: the mean over the draws // N disjoint groups of N draws.", "",
             "| sampler | N | relation whole prompt | vs best of 1 | vs demo best of 1 | any of N right (ceiling) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in r["settings"].items():
        for n, c in s["curve"].items():
            lines.append(f"| {name} | {n} | {_pct(c['accuracy'])} | {_pts(c['difference_vs_1'])} | "
                         f"{_pts(c['difference_vs_demo_1'])} | {s['oracle_any_right'][n] * 100:.1f}% |")
    for name, s in r["settings"].items():
        lines.append(f"\n{name}: {s['sampling']}; {s['distinct_images_per_prompt']:.1f} distinct images (codes) among "
                     f"{r['draws_per_prompt']} draws per prompt; mean CLIP score of right / wrong draws "
                     f"{s['clip_score_right_vs_wrong'][0]:.3f} / {s['clip_score_right_vs_wrong'][1]:.3f}.")
    return lines + ["", "![best of N](rerank_curve.png)", "", "![demo sampler: eight draws per prompt, kept first](rerank_grid.png)"]


def _md_variations(r: dict) -> list[str]:
    lines = [f"{r['scenes_per_kind']} val scenes per kind, {r['variations_per_scene']} images each; judged against the "
             "source caption. Diversity: mean 1 - cos between the judge CLIP's embeddings of one source's images "
             "(argen compare's figure).", "",
             "| scenes | images | caption right (whole) | colour | shape | size | position | diversity | judge-CLIP cos to source | s / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, rows in r["kinds"].items():
        for name, m in rows.items():
            a = m["attributes"]
            cells = " | ".join(f"{a[k] * 100:.1f}%" if k in a else "" for k in ("color", "shape", "size", "position"))
            lines.append(f"| {kind} | {name} | {_pct(m['accuracy'])} | {cells} | {m['diversity']['estimate']:.3f} "
                         f"[{m['diversity']['low']:.3f}, {m['diversity']['high']:.3f}] | "
                         f"{m['judge_clip_cos_to_source']['estimate']:.3f} | {m['seconds_per_image']:.2f} |")
    return lines + ["", "![variations: source, then four decodings of its embedding](variations_grid.png)"]


def _md_path(r: dict, what: str, grid: str) -> list[str]:
    lines = ["| attribute changed | paths | monotone | ends right | monotone and ends right | ... with no third value | "
             "last step shows the target | one object at every step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for attr in (a for a in ("color", "shape", "all") if a in r):
        m = r[attr]
        lines.append(f"| {attr} | {m['paths']} | {m['monotone'] * 100:.1f}% | {m['ends_right'] * 100:.1f}% | "
                     f"{m['monotone_and_ends_right'] * 100:.1f}% | {m['direct_and_ends_right'] * 100:.1f}% | "
                     f"{m['reaches_target'] * 100:.1f}% | {m['one_object'] * 100:.1f}% |")
    return [what, "", *lines, "", f"![{r.get('steps')} steps per path]({grid})"]


def _md_interpolate(r: dict) -> list[str]:
    return _md_path(r, f"{r['pairs']} single-object val scenes, each against itself with the colour or shape changed; "
                       f"{r['paths_per_pair']} noise seed(s) per pair, {r['steps']} steps. Monotone: no judged value comes back "
                       "once the path has left it (red, red, magenta, blue, blue is monotone); ends right: the first "
                       "step reads as the start, the last as the end.", "interpolate_grid.png")


def _md_text_diff(r: dict) -> list[str]:
    return _md_path(r, f"{r['images']} single-object val scenes moved along the diff from their caption to the caption "
                       f"with the colour or shape changed, theta from 0 to {r['max_angle']} in {r['steps']} steps, "
                       f"{r['paths_per_image']} noise seed(s) each.", "text_diff_grid.png")


def _md_sdedit(r: dict) -> list[str]:
    lines = [f"{r['scenes']} single-object val scenes x {r['edits_per_scene']}, caption with the colour or shape changed; "
             f"the caption's embedding from the {r['prior']} prior; decoder {r['decoder']}.", "",
             "| strength | new caption right | edited attribute right | PSNR to source | judge-CLIP cos to source | s / image |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s, c in r["curve"].items():
        lines.append(f"| {s} | {_pct(c['accuracy'])} | {_pct(c['edited_attribute_right'])} | "
                     f"{c['psnr_to_source_db']['estimate']:.1f} dB | {c['judge_clip_cos_to_source']['estimate']:.3f} | "
                     f"{c['seconds_per_image']:.2f} |")
    return lines + ["", "![SDEdit over the noise level](sdedit_curve.png)", "", "![source, then each strength](sdedit_grid.png)"]


def _md_overview(r: dict) -> list[str]:
    return ["One call per row on the loaded pipelines (`pipe = Pipeline.load(...)`, `upipe = UnclipPipeline.load(...)`), "
            "each returning PIL images; the first tile is the source (grey: the region regenerated).", "",
            "![one row per control](overview.png)"]


SECTIONS = {"overview": _md_overview, "inpaint": _md_inpaint, "complete": _md_complete, "outpaint": _md_outpaint, "rerank": _md_rerank,
            "variations": _md_variations, "interpolate": _md_interpolate, "text_diff": _md_text_diff, "sdedit": _md_sdedit}


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--gpt", default="runs/demo/gpt_run/final", help="AR token pipeline directory")
    parser.add_argument("--unclip", default="runs/unclip/pipeline", help="unCLIP pipeline directory")
    parser.add_argument("--clip", default=None, help="generator-side CLIP for reranking (default: the unCLIP pipeline's)")
    parser.add_argument("--judge-clip", default="runs/unclip/judge_clip/final/clip", help="judge CLIP (diversity, similarity)")
    parser.add_argument("--scenes", type=int, default=100, help="source scenes per kind")
    parser.add_argument("--n", type=int, default=2, help="edits per source scene")
    parser.add_argument("--variations", type=int, default=4, help="variations per source scene")
    parser.add_argument("--prompts", type=int, default=160, help="relation prompts for reranking")
    parser.add_argument("--draws", type=int, default=16, help="draws per prompt for reranking (a power of 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--out", default="benchmarks/results/editing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from argen.host import host_info

    out = claim_output_dir(args.out, kind="benchmark")
    host = host_info(measure_bf16=False).describe()
    command = "python benchmarks/editing.py " + " ".join(sys.argv[1:] if argv is None else argv)
    gpt_parts = [p for p in args.parts if p in ("inpaint", "complete", "outpaint", "rerank", "overview")]
    if gpt_parts:
        from argen.pipeline import Pipeline

        pipe = Pipeline.load(args.gpt)
    for part in args.parts:
        start = time.perf_counter()
        kw = dict(seed=args.seed, n_boot=args.n_boot)
        clip_dir = args.clip or str(Path(args.unclip) / "clip")
        if part == "inpaint":
            result = run_inpaint(pipe, out, scenes=args.scenes, n=args.n, clip_dir=clip_dir, **kw)
        elif part in ("complete", "outpaint"):
            result = {"complete": run_complete, "outpaint": run_outpaint}[part](pipe, out, scenes=args.scenes, n=args.n, **kw)
        elif part == "rerank":
            result = run_rerank(pipe, out, clip_dir=clip_dir, prompts=args.prompts, draws=args.draws, **kw)
        elif part == "overview":
            from argen.unclip.pipeline import UnclipPipeline

            result = run_overview(pipe, UnclipPipeline.load(args.unclip), out, clip_dir=clip_dir, seed=args.seed)
        else:
            result = run_unclip_part(part, out, unclip=args.unclip, judge_clip=args.judge_clip, scenes=args.scenes,
                                     n=args.n, variations=args.variations, **kw)
        result.update(command=command, host=host, torch=torch.__version__, minutes=(time.perf_counter() - start) / 60,
                      gpt=args.gpt if part in gpt_parts else None)
        atomic_write_bytes(out / f"{part}.json", json.dumps(result, indent=2).encode())
    results = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS if (out / f"{p}.json").is_file()}
    atomic_write_bytes(out / "editing.md", markdown(results).encode())
    print(markdown({p: results[p] for p in args.parts}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
