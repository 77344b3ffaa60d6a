"""unCLIP controls through the CLIP image embedding the decoder reads (DALL-E 2 sec. 3): variations of an image,
interpolations between two, text diffs, and SDEdit (noise an image part way, then denoise it under a new caption)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from argen.sample import NonFiniteSamplingError, classifier_free_guidance
from argen.unclip.clip import TextEncoding
from argen.unclip.schedulers import initial_noise, sampling_scheduler

if TYPE_CHECKING:
    from argen.unclip.pipeline import DecoderSampling, UnclipPipeline, UnclipSampling

MAX_IMAGES = 1024


@dataclass
class ControlResult:
    """Images of one control call, in order, with the embedding each was decoded from and what it shows.

    images: (N, 3, R, R) float32 in [-1, 1]. embeds: (N, D) unit-norm CLIP image embeddings fed to the decoder.
    values: (N,) the path parameter of each image (slerp t, text-diff angle fraction, SDEdit strength; the sample
    index for variations). labels: a caption per image for grids.
    """

    images: Tensor
    embeds: Tensor
    values: list[float]
    labels: list[str]
    seeds: list[int] = field(default_factory=list)

    def pil(self) -> list[Image.Image]:
        from argen.data.transforms import tensor_to_pil

        return [tensor_to_pil(x) for x in self.images]


def slerp(a: Tensor, b: Tensor, t: Tensor | Sequence[float]) -> Tensor:
    """Spherical interpolation (Shoemake 1985) between unit vectors a, b (D,) at fractions t (T,) -> (T, D):
    sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, theta = arccos(a . b); linear (then
    renormalised) when a and b are nearly parallel. t outside [0, 1] extrapolates along the same great circle."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)  # (T, 1)
    theta = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if theta < 1e-4:
        return F.normalize((1 - t) * a + t * b, dim=-1).float()
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return F.normalize(out, dim=-1).float()


def _image_key(image: Tensor) -> str:
    return hashlib.blake2b(image.float().cpu().numpy().tobytes(), digest_size=8).hexdigest()


def _seeds(seed: int, key: str, n: int) -> list[int]:
    from argen.pipeline import row_seed

    return [row_seed(seed, key, k) for k in range(n)]


def _images(upipe: UnclipPipeline, image: Any) -> Tensor:
    from argen.edit import image_batch

    return image_batch(image, resolution=upipe.decoder.config.resolution)


def image_embedding(upipe: UnclipPipeline, images: Any) -> Tensor:
    """CLIP image embeddings of images (see `argen.edit.image_batch`) -> (B, D) float32, unit norm."""
    x = _images(upipe, images).to(upipe.device)
    return F.normalize(upipe.clip.encode_images(x).float(), dim=-1)


def _decoder_sampling(decoder: DecoderSampling | None) -> DecoderSampling:
    from argen.unclip.pipeline import DecoderSampling

    return decoder if decoder is not None else DecoderSampling()


@torch.inference_mode()
def decode_embeddings(upipe: UnclipPipeline, embeds: Tensor, *, seeds: Sequence[int], captions: Sequence[str] | None = None,
                      decoder: DecoderSampling | None = None, start: Tensor | None = None,
                      strength: float = 1.0) -> Tensor:
    """Decode CLIP image embeddings (B, D) into images (B, 3, R, R) float32 in [-1, 1], row i seeded by seeds[i].

    captions: what a text-reading decoder reads (B,); None conditions it on the image embedding alone (the
        learned null caption, which the decoder saw for the captions it dropped in training).
    start, strength: SDEdit (Meng et al. 2022): `start` (B, 3, R, R) in [-1, 1] is noised to the sampler's timestep
        at `strength` of the way to pure noise (the last round(strength * steps) of the steps are run, as
        diffusers' img2img does) and denoised from there; strength 0 returns `start`, 1 starts from (nearly) pure
        noise. Without `start` the reverse process runs from pure noise (as `sample_decoder`).
    Each step runs the decoder on [cond; uncond] rows (uncond: image embedding and caption dropped) combined by
    `classifier_free_guidance`, with the sampler's thresholding, as `argen.unclip.decoder_sampling.denoise`.
    """
    sampling = _decoder_sampling(decoder)
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"the noise level (strength) must be in [0, 1], got {strength}.")
    dec, device = upipe.decoder, upipe.device
    B, R = embeds.shape[0], dec.config.resolution
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} embeddings: give one per image.")
    if captions is not None and len(captions) != B:
        raise ValueError(f"{len(captions)} captions for {B} embeddings: give one per image, or None.")
    scheduler = sampling_scheduler(dec.config.architecture.schedule, sampler=sampling.sampler, steps=sampling.steps,
                                   thresholding=sampling.thresholding)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    noise = initial_noise((B, 3, R, R), generator=gens, device=device)
    timesteps = scheduler.timesteps
    if start is None:
        x = noise * scheduler.init_noise_sigma
    else:
        if start.shape != (B, 3, R, R):
            raise ValueError(f"start must be ({B}, 3, {R}, {R}), got {tuple(start.shape)}.")
        run = round(strength * len(timesteps))
        if run == 0:
            return start.float().clamp(-1, 1).cpu()
        begin = len(timesteps) - run
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        x = scheduler.add_noise(start.to(device).float(), noise, timesteps[:1].repeat(B))
    text, drop_text = None, None
    if dec.config.text_width is not None:
        text = upipe.clip.encode_text(list(captions) if captions is not None else [""] * B)
        text = TextEncoding(embeds=torch.cat([text.embeds] * 2), states=torch.cat([text.states] * 2),
                          mask=torch.cat([text.mask] * 2))
        drop_text = torch.ones(2 * B, dtype=torch.bool, device=device)
        if captions is not None:
            drop_text[:B] = False
    drop_image = torch.arange(2 * B, device=device) >= B  # [cond; uncond]
    z = torch.cat([embeds, embeds]).to(device)
    # DDIM with thresholding must re-derive epsilon from the clipped x_0 (see decoder_sampling.denoise)
    step_kwargs = {"use_clipped_model_output": True} if sampling.sampler == "ddim" and sampling.thresholding else {}
    was_training = dec.training
    dec.eval()
    try:
        for t in timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = dec(torch.cat([x_in, x_in]), t.to(device).expand(2 * B), z, text=text, drop_image=drop_image,
                      drop_text=drop_text).float()
            out = classifier_free_guidance(out, sampling.cfg_scale)  # (B, 3, R, R)
            x = scheduler.step(out, t, x, generator=gens, **step_kwargs).prev_sample
    finally:
        dec.train(was_training)
    if not torch.isfinite(x).all():
        raise NonFiniteSamplingError("the unCLIP decoder produced non-finite values: no image was made. Check the "
                                     "weights or lower the decoder's guidance scale.")
    return x.clamp(-1.0, 1.0).float().cpu()


def variations(upipe: UnclipPipeline, image: Any, *, n: int = 4, seed: int = 0,
               decoder: DecoderSampling | None = None) -> ControlResult:
    """`n` decodings of one image's CLIP image embedding, each from its own noise (DALL-E 2 fig. 3): what the
    embedding keeps (the objects, their colours and shapes) stays, what it does not pin down varies."""
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must be in [1, {MAX_IMAGES}], got {n}.")
    x = _images(upipe, image)
    if len(x) != 1:
        raise ValueError(f"variations take one image, got {len(x)}.")
    e = image_embedding(upipe, x).expand(n, -1)
    seeds = _seeds(seed, "variation:" + _image_key(x), n)
    images = decode_embeddings(upipe, e, seeds=seeds, decoder=decoder)
    return ControlResult(images=images, embeds=e.cpu(), values=list(range(n)), labels=[f"variation {k}" for k in range(n)],
                         seeds=seeds)


def _fractions(steps: int) -> list[float]:
    if not 2 <= steps <= MAX_IMAGES:
        raise ValueError(f"steps (images along the path, both ends included) must be in [2, {MAX_IMAGES}], got {steps}.")
    return [k / (steps - 1) for k in range(steps)]


def interpolate(upipe: UnclipPipeline, image_a: Any, image_b: Any, *, steps: int = 5, seed: int = 0,
                decoder: DecoderSampling | None = None) -> ControlResult:
    """Decode slerp(z_a, z_b, t) for `steps` values of t from 0 to 1 (DALL-E 2 fig. 4), every step from the same
    noise, so only the embedding changes along the path."""
    ts = _fractions(steps)
    xa, xb = _images(upipe, image_a), _images(upipe, image_b)
    if len(xa) != 1 or len(xb) != 1:
        raise ValueError(f"interpolate takes one image at each end, got {len(xa)} and {len(xb)}.")
    za, zb = image_embedding(upipe, torch.cat([xa, xb]))
    e = slerp(za.cpu(), zb.cpu(), ts)
    seeds = _seeds(seed, "interpolate:" + _image_key(xa) + _image_key(xb), 1) * steps
    images = decode_embeddings(upipe, e, seeds=seeds, decoder=decoder)
    return ControlResult(images=images, embeds=e, values=ts, labels=[f"t = {t:.2f}" for t in ts], seeds=seeds)


def text_diff(upipe: UnclipPipeline, image: Any, source_caption: str, target_caption: str, *, steps: int = 5,
              max_angle: float = 0.5, seed: int = 0, decoder: DecoderSampling | None = None) -> ControlResult:
    """Move an image's embedding towards a text diff (DALL-E 2 sec. 3.3): z_d = normalize(z_t(target) -
    z_t(source)), then decode slerp(z_i, z_d, theta) for `steps` values of theta from 0 to `max_angle` (DALL-E 2
    uses 0.25 to 0.5), every step from the same noise."""
    if not (math.isfinite(max_angle) and 0.0 < max_angle <= 1.0):
        raise ValueError(f"max_angle must be in (0, 1] (a fraction of the way from the image to the diff), got {max_angle}.")
    for name, caption in (("source_caption", source_caption), ("target_caption", target_caption)):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{name} must be a non-empty caption, got {caption!r}.")
    thetas = [max_angle * f for f in _fractions(steps)]
    x = _images(upipe, image)
    if len(x) != 1:
        raise ValueError(f"text_diff takes one image, got {len(x)}.")
    z_i = image_embedding(upipe, x)[0].cpu()
    t = F.normalize(upipe.clip.encode_text([source_caption, target_caption]).embeds.float().cpu(), dim=-1)
    z_d = t[1] - t[0]
    if z_d.norm() < 1e-6:
        raise ValueError(f"the two captions have the same CLIP text embedding ({source_caption!r}, {target_caption!r}): "
                         "there is no direction to move along.")
    e = torch.cat([slerp(z_i, F.normalize(z_d, dim=-1), [th]) for th in thetas])
    seeds = _seeds(seed, "text_diff:" + _image_key(x), 1) * len(thetas)
    images = decode_embeddings(upipe, e, seeds=seeds, decoder=decoder)
    return ControlResult(images=images, embeds=e, values=thetas, labels=[f"theta = {th:.2f}" for th in thetas], seeds=seeds)


def sdedit(upipe: UnclipPipeline, image: Any, caption: str, *, strength: float = 0.5, n: int = 4, seed: int = 0,
           sampling: UnclipSampling | None = None) -> ControlResult:
    """SDEdit with the decoder: noise `image` to `strength` (0: unchanged, 1: pure noise) and denoise it under
    `caption`, conditioned on the caption's CLIP image embedding from the pipeline's prior (`sampling.prior`) and,
    for a text-reading decoder, on the caption itself; `n` draws, each with its own noise and prior sample."""
    from argen.unclip.pipeline import UnclipSampling

    sampling = sampling if sampling is not None else UnclipSampling()
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"the noise level (strength) must be in [0, 1] (0: the image unchanged, 1: pure noise), got {strength}.")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"SDEdit denoises under a caption: give a non-empty one, got {caption!r}.")
    if not 1 <= n <= MAX_IMAGES:
        raise ValueError(f"n must be in [1, {MAX_IMAGES}], got {n}.")
    x = _images(upipe, image)
    if len(x) != 1:
        raise ValueError(f"sdedit takes one image, got {len(x)}.")
    seeds = _seeds(seed, f"sdedit:{caption}:" + _image_key(x), n)
    captions = [caption] * n
    e = upipe.image_embeddings(captions, upipe.clip.encode_text(captions), sampling=sampling, seeds=seeds)
    images = decode_embeddings(upipe, e, seeds=[s + 1 for s in seeds], captions=captions, decoder=sampling.decoder,
                               start=x.expand(n, -1, -1, -1), strength=strength)
    return ControlResult(images=images, embeds=e.float().cpu(), values=[float(strength)] * n,
                         labels=[f"strength {strength:.2f}"] * n, seeds=seeds)
