"""Text<->image retrieval over N candidates: strict (its own pair) and caption-consistent (the scene fits the caption)."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from argen.data.shapes import CaptionSpec, Scene, parse_caption, relation_holds


def hits_at_k(scores: Tensor, positives: Tensor, k: int) -> Tensor:
    """Per query (row): whether a positive candidate is among the top k, ties counted against the query.

    scores (Q, N) float, positives (Q, N) bool. Row q is a hit iff fewer than k negatives score at least as high as
    the best positive. Pessimistic ties make the result independent of the candidates' order and give a collapsed
    model (all scores equal) its chance level, not 100%. A row without a positive is a miss. Returns (Q,) bool.
    """
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be the same (Q, N) shape.")
    best = scores.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    beaten = ((scores >= best) & ~positives).sum(dim=1)  # negatives at or above the best positive
    return (beaten < k) & positives.any(dim=1)


@dataclass
class RetrievalMetrics:
    """Retrieval among `candidates` pairs (fractions in [0, 1]).

    strict:     the query's own pair is retrieved (t2i: its own image for a caption; i2t: its own caption).
    consistent: a candidate whose scene satisfies the caption is retrieved (None without ground-truth scenes).
    ceiling:    share of queries whose own pair is the only consistent candidate, i.e. the strict top-1 that a
                model which knows only what the caption says can be sure of; `ceiling_expected` is the strict
                top-1 of such a model choosing uniformly among the consistent candidates (mean of 1 / #consistent).
    """

    candidates: int
    t2i_top1: float
    t2i_top5: float
    i2t_top1: float
    i2t_top5: float
    t2i_top1_consistent: float | None = None
    t2i_top5_consistent: float | None = None
    i2t_top1_consistent: float | None = None
    i2t_top5_consistent: float | None = None
    t2i_ceiling: float | None = None
    t2i_ceiling_expected: float | None = None
    i2t_ceiling: float | None = None
    i2t_ceiling_expected: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


def retrieval_metrics(text_embeds: Tensor, image_embeds: Tensor, *, consistent: Tensor | None = None) -> RetrievalMetrics:
    """Top-1/top-5 retrieval between N captions and their N images (pair i = row i of both).

    text_embeds, image_embeds: (N, D) float, any scale (cosine similarity is used). consistent: optional (N, N)
    bool, [c, i] = image i's scene satisfies caption c; its diagonal must be all True.
    """
    if text_embeds.ndim != 2 or text_embeds.shape != image_embeds.shape:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and image_embeds {tuple(image_embeds.shape)} must both be (N, D).")
    n = len(text_embeds)
    if n < 1:
        raise ValueError("retrieval needs at least one pair.")
    sim = F.normalize(text_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).T  # (N captions, N images)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)

    def rate(scores: Tensor, positives: Tensor, k: int) -> float:
        return float(hits_at_k(scores, positives, min(k, n)).float().mean())

    out = RetrievalMetrics(candidates=n, t2i_top1=rate(sim, eye, 1), t2i_top5=rate(sim, eye, 5),
                           i2t_top1=rate(sim.T, eye, 1), i2t_top5=rate(sim.T, eye, 5))
    if consistent is None:
        return out
    consistent = consistent.to(device=sim.device, dtype=torch.bool)
    if consistent.shape != (n, n):
        raise ValueError(f"consistent must be ({n}, {n}), got {tuple(consistent.shape)}.")
    if not consistent.diagonal().all():
        bad = torch.nonzero(~consistent.diagonal()).flatten()[:5].tolist()
        raise ValueError(f"every caption must fit its own image; pairs {bad} do not (wrong scenes for these captions?).")
    fits_t2i, fits_i2t = consistent.sum(dim=1).float(), consistent.sum(dim=0).float()  # per caption / per image
    out.t2i_top1_consistent, out.t2i_top5_consistent = rate(sim, consistent, 1), rate(sim, consistent, 5)
    out.i2t_top1_consistent, out.i2t_top5_consistent = rate(sim.T, consistent.T, 1), rate(sim.T, consistent.T, 5)
    out.t2i_ceiling, out.t2i_ceiling_expected = float((fits_t2i == 1).float().mean()), float((1 / fits_t2i).mean())
    out.i2t_ceiling, out.i2t_ceiling_expected = float((fits_i2t == 1).float().mean()), float((1 / fits_i2t).mean())
    return out


# ----------------------------------------------------------------------------------------------- shapes ground truth

def scene_fits(spec: CaptionSpec, scene: Scene) -> bool:
    """Whether a ground-truth scene satisfies what a caption claims: exactly as many objects, each stated attribute
    and the relation holding under one assignment of objects to the caption's objects. This is what
    `argen.eval.judge.judge` calls correct when it reads the scene back perfectly (same `match` semantics)."""
    if len(scene.objects) != len(spec.objects):
        return False
    for objs in itertools.permutations(scene.objects):
        if all(want.matches(got) for want, got in zip(spec.objects, objs)) and (
                spec.relation is None
                or relation_holds(spec.relation.kind, objs[spec.relation.subject].position, objs[spec.relation.object].position)):
            return True
    return False


@lru_cache(maxsize=65536)
def _spec(caption: str) -> CaptionSpec:
    return parse_caption(caption)


def shapes_consistency(captions: list[str], scenes: list[Scene]) -> Tensor:
    """(len(captions), len(scenes)) bool: [c, s] = scene s satisfies caption c (see `scene_fits`)."""
    specs = [_spec(c) for c in captions]
    keyed: dict[tuple, list[int]] = {}  # identical scenes (up to object order) share one check
    for j, scene in enumerate(scenes):
        keyed.setdefault(tuple(sorted((o.shape, o.color, o.size, o.position) for o in scene.objects)), []).append(j)
    out = torch.zeros(len(captions), len(scenes), dtype=torch.bool)
    groups = list(keyed.values())
    for i, spec in enumerate(specs):
        for js in groups:
            if scene_fits(spec, scenes[js[0]]):
                out[i, js] = True
    return out


class RetrievalEvaluator:
    """Retrieval of a CLIP on fixed pairs: the first `candidates` items of a dataset split (fewer if it is smaller)
    are both the queries and the candidates. For shapes, caption consistency comes from the ground-truth scenes."""

    def __init__(self, spec: str, *, split: str = "val", resolution: int, seed: int = 0, candidates: int = 1000,
                 val_fraction: float = 0.05, batch_size: int = 250) -> None:
        from argen.data.registry import build_dataset, indexable

        # a stream (WebDataset shards) is read once, its first `candidates` items kept in memory
        dataset = indexable(build_dataset(spec, split=split, resolution=resolution, seed=seed, val_fraction=val_fraction),
                            max_images=candidates)
        n = min(candidates, len(dataset))
        if n < 2:
            raise ValueError(f"the {split} split of {spec} has {len(dataset)} item(s); retrieval needs at least 2.")
        items = [dataset[i] for i in range(n)]
        self.captions = [item["caption"] for item in items]
        self.images = torch.stack([item["image"] for item in items])  # (N, 3, R, R) in [-1, 1]
        self.batch_size = batch_size
        self.consistent = None
        if spec == "shapes":
            from argen.data.shapes import scene_and_caption

            self.consistent = shapes_consistency(self.captions, [scene_and_caption(i, split, seed=seed)[0] for i in range(n)])

    def __call__(self, clip) -> RetrievalMetrics:
        """Metrics of `clip` (an `argen.unclip.clip.ClipEncoder`) on these pairs."""
        text = clip.encode_text(self.captions, batch_size=self.batch_size).embeds
        image = clip.encode_images(self.images, batch_size=self.batch_size)
        return retrieval_metrics(text, image, consistent=self.consistent)
