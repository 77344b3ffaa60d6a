"""Score generated shapes images with the judge: prompt sets by kind, per-attribute and whole-prompt accuracy."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from argen.data.shapes import CaptionSpec, heldout_pair, parse_caption, scene_and_caption
from argen.eval.judge import ATTRIBUTES, JudgeResult, binding_error, judge

PROMPT_KINDS = ("single", "relation", "heldout")
HELDOUT_PARTS = ("unseen colour-shape pairs", "unseen coloured relations")


def prompt_kind(spec: CaptionSpec) -> str | None:
    """"single": one object with shape, colour, size and position all stated; "relation": two objects and a
    relation; None for the other caption templates (lists, counts, partial descriptions)."""
    if spec.relation is not None:
        return "relation"
    if len(spec.objects) == 1 and all(getattr(spec.objects[0], a) is not None
                                      for a in ("shape", "color", "size", "position")):
        return "single"
    return None


def prompt_set(kind: str, *, max_prompts: int, seed: int = 0) -> list[str]:
    """Distinct captions of one kind, in split order: "single" and "relation" from the val split (scenes that
    train never shows), "heldout" from the held-out split (colour-shape pairs and relations train never shows).
    Returns at most `max_prompts`; the val split holds only 16 distinct single-object captions (seed 0)."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {PROMPT_KINDS}")
    return list(_prompt_set(kind, max_prompts, seed))


@functools.cache  # the demo's sweep asks for the same sets once per sampler setting; each renders up to 2000 scenes
def _prompt_set(kind: str, max_prompts: int, seed: int) -> tuple[str, ...]:
    split, size = ("heldout", 1000) if kind == "heldout" else ("val", 2000)
    out: dict[str, None] = {}
    for i in range(size):
        _, caption = scene_and_caption(i, split, seed=seed)
        if kind == "heldout" or prompt_kind(parse_caption(caption)) == kind:
            out.setdefault(caption)
            if len(out) == max_prompts:
                break
    return tuple(out)


def heldout_part(caption: str) -> str:
    """Which kind of held-out combination a held-out caption states (HELDOUT_PARTS): a colour-shape pair that no
    training scene shows, or two seen objects in a coloured relation that no training scene shows."""
    return HELDOUT_PARTS[0] if heldout_pair(parse_caption(caption).objects) is not None else HELDOUT_PARTS[1]


@dataclass
class PromptSetScore:
    """Judge scores of the images generated for one prompt set.

    accuracy: share of images whose whole prompt is correct. attributes[a]: share correct among the images
    whose prompt states `a` (count: always); None when no prompt states it. binding_errors: share of the images of
    multi-object prompts whose attributes are all there but bound to the wrong objects (judge.binding_error); None
    without such prompts. failures: a few judge reasons."""

    num_prompts: int
    num_images: int
    accuracy: float
    attributes: dict[str, float | None]
    binding_errors: float | None = None
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "num_images": self.num_images, "accuracy": self.accuracy,
                "attributes": self.attributes, "binding_errors": self.binding_errors, "failures": self.failures}


def judge_images(prompts: Sequence[str], images) -> list[JudgeResult]:
    """Judge image i (a (3, H, W) tensor in [-1, 1], uint8 array or PIL image) against prompts[i]."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one prompt per image.")
    return [judge(p, im) for p, im in zip(prompts, images)]


def score(prompts: Sequence[str], results: Sequence[JudgeResult], *, max_failures: int = 8) -> PromptSetScore:
    """Aggregate judge results (one per image, prompts[i] its prompt) into a PromptSetScore."""
    if not results:
        raise ValueError("no judge results to score.")
    attributes: dict[str, float | None] = {}
    for a in ATTRIBUTES:
        stated = [r.attributes[a] for r in results if r.attributes[a] is not None]
        attributes[a] = sum(stated) / len(stated) if stated else None
    failures = [f"'{p}': {r.reason}" for p, r in zip(prompts, results) if not r.correct][:max_failures]
    binding = [b for b in (binding_error(r) for r in results) if b is not None]
    return PromptSetScore(num_prompts=len(set(prompts)), num_images=len(results),
                          accuracy=sum(r.correct for r in results) / len(results), attributes=attributes,
                          binding_errors=sum(binding) / len(binding) if binding else None, failures=failures)


def code_diversity(codes, prompts: Sequence[str]) -> float | None:
    """How different the images of one prompt are: the share of image tokens that differ between two samples of the
    same prompt, averaged over all pairs of each prompt and then over prompts (0: copies). codes (N, h*w); None
    when no prompt has two images."""
    import torch

    codes = torch.as_tensor(codes)
    per_prompt = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        if len(idx) >= 2:
            c = codes[idx]  # (n, L)
            differ = (c[:, None, :] != c[None, :, :]).float().mean(-1)  # (n, n)
            n = len(idx)
            per_prompt.append(float(differ.sum() / (n * (n - 1))))
    return sum(per_prompt) / len(per_prompt) if per_prompt else None
