"""Best-of-N for the AR GPT (DALL-E 1's reranking): draw N images per prompt and keep the one a CLIP scores highest.

Rerank with the generator-side CLIP (the unCLIP stack's, trained on the train split), never with the judge CLIP:
the judge CLIP only scores, and an image chosen by it would be graded by the same model that chose it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from argen.sample import SamplingConfig

if TYPE_CHECKING:
    from argen.pipeline import GenerationResult, Pipeline
    from argen.unclip.clip import ClipEncoder

MAX_DRAWS = 1024


def load_clip(clip: ClipEncoder | str | Path, *, device: str | torch.device = "cpu") -> ClipEncoder:
    """A ClipEncoder as given, or loaded from a CLIP directory or from a unCLIP pipeline directory (its clip/)."""
    from argen.unclip.clip import ClipEncoder
    from argen.unclip.pipeline import PART_DIRS, UNCLIP_FILE

    if isinstance(clip, ClipEncoder):
        return clip
    path = Path(clip)
    if (path / UNCLIP_FILE).is_file():
        path = path / PART_DIRS["clip"]
    return ClipEncoder.load(path, device=device)


@torch.no_grad()
def clip_similarity(clip: ClipEncoder, prompts: Sequence[str], images: Tensor, *, batch_size: int = 256) -> Tensor:
    """Cosine similarity of image i (N, 3, H, W) in [-1, 1] with prompts[i] under `clip` -> (N,) float32 in [-1, 1]."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image.")
    text = clip.encode_text(list(prompts), batch_size=batch_size).embeds
    image = clip.encode_images(images, batch_size=batch_size)
    return (F.normalize(text.float(), dim=-1) * F.normalize(image.float(), dim=-1)).sum(dim=-1).cpu()


@dataclass
class RerankResult:
    """The kept draw of each prompt. `draws` holds every draw (prompt p's are rows p*n .. p*n + n - 1), `scores`
    (P, n) their CLIP similarity to the prompt and `best` (P,) the index of the kept one among them."""

    images: Tensor  # (P, 3, H, W) float32 in [-1, 1]
    prompts: list[str]
    best: Tensor  # (P,) int64 in [0, n)
    scores: Tensor  # (P, n) float32
    draws: GenerationResult

    def pil(self) -> list[Image.Image]:
        from argen.data.transforms import tensor_to_pil

        return [tensor_to_pil(x) for x in self.images]


def best_of(scores: Tensor, n: int) -> Tensor:
    """Index of the best-scoring draw among the first `n` of each row of scores (P, N) -> (P,). Draw k of a prompt
    does not depend on how many are drawn (Pipeline.generate seeds each by its k), so best-of-n for every n <= N
    comes from one set of N draws."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n must be in [1, {scores.shape[1]}] (the draws made), got {n}.")
    return scores[:, :n].argmax(dim=1)


@torch.no_grad()
def rerank(pipe: Pipeline, prompts: str | Sequence[str], *, clip: ClipEncoder | str | Path, n: int = 8,
           sampling: SamplingConfig | None = None, seed: int = 0, batch_size: int | None = None) -> RerankResult:
    """Draw `n` images per prompt with `pipe.generate` (same row seeds; `sampling` defaults to the pipeline's
    recommended sampler, `pipe.sampling`) and keep the one whose CLIP image embedding is closest (cosine) to the
    prompt's text embedding. `clip`: the generator-side CLIP, a ClipEncoder or its directory (or a unCLIP pipeline
    directory)."""
    if not 1 <= n <= MAX_DRAWS:
        raise ValueError(f"n (draws per prompt) must be in [1, {MAX_DRAWS}], got {n}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    empty = [p for p in prompts if not p.strip()]
    if empty:
        raise ValueError("reranking scores images against their prompt: every prompt must be non-empty.")
    encoder = load_clip(clip, device=pipe.device)
    sampling = sampling if sampling is not None else pipe.sampling
    draws = pipe.generate(prompts, n_per_prompt=n, sampling=sampling, seed=seed, batch_size=batch_size)
    scores = clip_similarity(encoder, draws.prompts, draws.images).view(len(prompts), n)
    best = best_of(scores, n)
    rows = torch.arange(len(prompts)) * n + best
    return RerankResult(images=draws.images[rows], prompts=prompts, best=best, scores=scores, draws=draws)
