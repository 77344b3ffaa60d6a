"""Sampling CLIP image embeddings from the diffusion prior: a `diffusers` scheduler loop with CFG and best-of-N."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from argen.sample import classifier_free_guidance
from argen.unclip.clip import TextEncoding
from argen.unclip.diffusion_prior import DiffusionPrior, denormalize, normalize
from argen.unclip.schedulers import Generators, initial_noise, sampling_scheduler


def _repeat_rows(text: TextEncoding, n: int) -> TextEncoding:
    """Each caption n times in a row: (B, ...) -> (B * n, ...)."""
    return TextEncoding(embeds=text.embeds.repeat_interleave(n, 0), states=text.states.repeat_interleave(n, 0),
                        mask=text.mask.repeat_interleave(n, 0))


def _doubled(text: TextEncoding) -> TextEncoding:
    """[cond; uncond] rows: the captions twice (the second half is dropped inside the prior)."""
    return TextEncoding(embeds=torch.cat([text.embeds, text.embeds]), states=torch.cat([text.states, text.states]),
                        mask=torch.cat([text.mask, text.mask]))


def pick_best_of(candidates: Tensor, text_embeds: Tensor) -> Tensor:
    """DALL-E 2's best-of-N (sec. 2.2): per caption, the candidate with the highest cosine to its text embedding.

    candidates: (B, N, D); text_embeds: (B, D). Returns (B, D), rows of `candidates`.
    """
    sims = torch.einsum("bnd,bd->bn", F.normalize(candidates, dim=-1), F.normalize(text_embeds.float(), dim=-1))
    best = sims.argmax(dim=1)  # (B,)
    return candidates[torch.arange(len(candidates), device=candidates.device), best]


@torch.no_grad()
def sample_diffusion_prior(prior: DiffusionPrior, text: TextEncoding, *, sampler: str = "ddim", steps: int = 25,
                           cfg_scale: float = 1.0, generator: Generators = None, best_of: int = 1,
                           project_x0: bool = False) -> Tensor:
    """Sample one CLIP image embedding per caption -> (B, D) float32, unit norm.

    text: CLIP's encoding of the B captions (`ClipEncoder.encode_text`), on the prior's device.
    sampler: "ddpm", "ddim" (eta 0, deterministic) or "dpm++" (DPM-Solver++ 2M), run for `steps` steps.
    cfg_scale: classifier-free guidance; 1 runs the conditional model alone, otherwise every step runs the rows
        [cond; uncond] in one forward and combines them with `argen.sample.classifier_free_guidance`.
    generator: the randomness (initial noise, and DDPM's per-step noise): one generator, or one per caption so that a
        caption's sample does not depend on its batch. Same generator state, same result.
    best_of: draw this many candidates per caption and keep the one nearest the text embedding (DALL-E 2 used 2).
    project_x0: put each step's predicted x_0 back on the sphere of radius `prior.embed_scale`, where every
        training x_0 lies (DALLE2-pytorch's `sampling_clamp_l2norm`); needs prediction_type "sample".
    """
    schedule = prior.config.architecture.schedule
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}.")
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale}.")
    if project_x0 and schedule.prediction_type != "sample":
        raise ValueError(f"project_x0 needs a prior that predicts x_0 (prediction_type 'sample'); this one predicts "
                         f"{schedule.prediction_type!r}.")
    B, D = text.embeds.shape
    device = next(prior.parameters()).device
    scheduler = sampling_scheduler(schedule, sampler=sampler, steps=steps)
    rows = _repeat_rows(text, best_of) if best_of > 1 else text  # (B * best_of, ...)
    n = B * best_of
    guided = cfg_scale != 1.0
    model_text = _doubled(rows) if guided else rows
    drop_text = torch.arange(2 * n, device=device) >= n if guided else None  # [cond; uncond]
    if generator is not None and not isinstance(generator, torch.Generator):  # one per caption: rows batch-independent
        generator = [g for g in generator for _ in range(best_of)]  # a caption's candidates draw from its generator
        if len(generator) != n:
            raise ValueError(f"got {len(generator) // best_of} generators for {B} captions; pass one per caption or one.")
    x = initial_noise((n, D), generator=generator, device=device) * scheduler.init_noise_sigma  # (n, D)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        out = prior(x_in, t.to(device).expand(len(x_in)), model_text, drop_text=drop_text).float()
        if guided:
            out = classifier_free_guidance(out, cfg_scale)  # (n, D)
        if project_x0:
            out = normalize(out, prior.embed_scale)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    embeds = denormalize(x.float())  # (n, D)
    if best_of > 1:
        embeds = pick_best_of(embeds.view(B, best_of, D), text.embeds)
    return embeds
