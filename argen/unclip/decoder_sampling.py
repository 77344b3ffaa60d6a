"""Sampling images from the unCLIP decoder: a `diffusers` scheduler loop (DDPM, DDIM or DPM-Solver++ with dynamic
thresholding) with [cond; uncond] classifier-free guidance in one UNet forward per step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from argen.sample import classifier_free_guidance
from argen.unclip.clip import TextEncoding
from argen.unclip.decoder import UnCLIPDecoder
from argen.unclip.schedulers import Generators, initial_noise, sampling_scheduler


def _doubled(text: TextEncoding | None) -> TextEncoding | None:
    """[cond; uncond] rows: the captions twice (the second half is dropped inside the decoder)."""
    if text is None:
        return None
    return TextEncoding(embeds=torch.cat([text.embeds, text.embeds]), states=torch.cat([text.states, text.states]),
                        mask=torch.cat([text.mask, text.mask]))


@torch.inference_mode()
def denoise(decoder: UnCLIPDecoder, noise: Tensor, image_embeds: Tensor, *, text: TextEncoding | None = None,
            sampler: str, steps: int, cfg_scale: float, thresholding: bool, generator: Generators = None) -> Tensor:
    """Run the reverse process from `noise` (B, 3, R, R) (standard normal) to images (B, 3, R, R), NOT clamped.

    Every step runs the decoder once: on the B rows alone when cfg_scale == 1, otherwise on the 2B rows
    [cond; uncond] (uncond = both the image embedding and the caption dropped) combined by
    `argen.sample.classifier_free_guidance`. With `thresholding`, each step's predicted x_0 is thresholded (see
    `argen.unclip.schedulers.sampling_scheduler`; with its sample_max_value 1 the percentile s is capped at 1, so
    this is a clip to [-1, 1]); DPM-Solver++'s last step returns that x_0, so its output lies in [-1, 1].
    `generator` draws DDPM's per-step noise (one, or one per row).
    """
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale}.")
    B = image_embeds.shape[0]
    if noise.shape[0] != B:
        raise ValueError(f"noise has {noise.shape[0]} rows but image_embeds has {B}; give one of each per image.")
    if text is not None and text.states.shape[0] != B:
        raise ValueError(f"text has {text.states.shape[0]} captions but image_embeds has {B} rows.")
    device = noise.device
    scheduler = sampling_scheduler(decoder.config.architecture.schedule, sampler=sampler, steps=steps,
                                   thresholding=thresholding)
    # DDIM's update mixes x_0 with the epsilon implied by the model output; with thresholding that epsilon must be
    # re-derived from the clipped x_0 (as Imagen does), or the two disagree and the samples fall apart (docs/unclip.md).
    step_kwargs = {"use_clipped_model_output": True} if sampler == "ddim" and thresholding else {}
    guided = cfg_scale != 1.0
    embeds = torch.cat([image_embeds, image_embeds]) if guided else image_embeds  # (2B or B, D)
    model_text = _doubled(text) if guided else text
    drop = torch.arange(2 * B, device=device) >= B if guided else None  # [cond; uncond]
    was_training = decoder.training
    decoder.eval()
    try:
        x = noise * scheduler.init_noise_sigma  # (B, 3, R, R)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            x_in = torch.cat([x_in, x_in]) if guided else x_in
            out = decoder(x_in, t.to(device).expand(len(x_in)), embeds, text=model_text, drop_image=drop,
                          drop_text=drop if model_text is not None else None).float()
            if guided:
                out = classifier_free_guidance(out, cfg_scale)  # (B, 3, R, R)
            x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    finally:
        decoder.train(was_training)
    return x


def sample_decoder(decoder: UnCLIPDecoder, image_embeds: Tensor, *, text: TextEncoding | None = None,
                   sampler: str = "dpm++", steps: int = 10, cfg_scale: float = 2.0, thresholding: bool = True,
                   generator: Generators = None) -> Tensor:
    """Decode CLIP image embeddings into images -> (B, 3, R, R) float32 in [-1, 1].

    image_embeds: (B, D), any norm (the decoder L2-normalises them): true CLIP image embeddings, a prior's
        samples, or, for the "no prior" baseline, CLIP text embeddings. On the decoder's device.
    text: CLIP's encoding of the B captions when the decoder reads them (`decoder.config.text_width` set).
    sampler: "ddpm", "ddim" (eta 0, deterministic) or "dpm++" (DPM-Solver++ 2M, deterministic), `steps` steps.
    cfg_scale: classifier-free guidance scale; 1 runs the conditional rows alone.
    The defaults (DPM-Solver++, 10 steps, CFG 2) were chosen on the shapes decoder for judge agreement at a low cost
    per image (argen compare's sweeps measure them).
    thresholding: threshold each step's predicted x_0 (Imagen sec. 2.3; here a clip to [-1, 1], see `denoise`).
    generator: the randomness (initial noise, and DDPM's per-step noise): one generator, or one per image so that
        an image does not depend on the others in its batch. Same generator state, same images.
    The output is clamped to [-1, 1] (a no-op for dpm++ with thresholding; DDIM's last step keeps a trace of noise).
    """
    R = decoder.config.resolution
    device = next(decoder.parameters()).device
    noise = initial_noise((image_embeds.shape[0], 3, R, R), generator=generator, device=device)
    x = denoise(decoder, noise, image_embeds.to(device), text=text, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                thresholding=thresholding, generator=generator)
    return x.clamp(-1.0, 1.0)
