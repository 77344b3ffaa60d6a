"""VQGAN training losses: reconstruction + LPIPS + quantizer terms, and the PatchGAN generator/discriminator losses."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_img.lpips import HOW_TO_GET_WEIGHTS, LPIPS


@dataclass
class VQGANLossConfig:
    """Weights and the GAN schedule of the VQGAN objective (Esser et al. 2021, eq. 5-7).

    Generator: total = rec_weight * rec + perceptual_weight * LPIPS + quantizer_weight * quantizer
                       + d_weight * g_factor(step) * g_adv
    where d_weight = ||grad_last nll|| / (||grad_last g_adv|| + 1e-4), clamped to [0, adaptive_weight_max]
    (eq. 7), or 1 when adaptive_weight is False.

    GAN schedule (see gan_schedule): the discriminator trains from `disc_start`; the generator starts to listen
    `disc_d_only_steps` later, so the discriminator is not random when its gradient first reaches the decoder,
    and its weight ramps linearly from 0 to `disc_weight` over `disc_ramp_steps`. disc_weight = 0 turns the GAN off.

    perceptual_weight defaults to 0 so the defaults run offline without weights; the usual recipe is 1.0 with
    `lpips_path` pointing at a converted file (see tokenizers_img.lpips.HOW_TO_GET_WEIGHTS).
    """

    rec_loss: Literal["l1", "l2"] = "l1"
    rec_weight: float = 1.0
    perceptual_weight: float = 0.0
    lpips_path: str | None = None
    quantizer_weight: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_weight: float = 0.5
    disc_start: int = 20_000
    disc_d_only_steps: int = 2_000
    disc_ramp_steps: int = 2_000
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4

    def __post_init__(self) -> None:
        for name in ("rec_weight", "perceptual_weight", "quantizer_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"VQGANLossConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("disc_start", "disc_d_only_steps", "disc_ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"VQGANLossConfig.{name} must be a step count >= 0, got {getattr(self, name)}.")
        if not self.adaptive_weight_max > 0:
            raise ValueError(f"VQGANLossConfig.adaptive_weight_max must be > 0, got {self.adaptive_weight_max}.")


class GanFactors(NamedTuple):
    d_factor: float  # multiplies the discriminator loss: 0 (not training yet) or 1
    g_factor: float  # multiplies the generator's adversarial term: 0 .. disc_weight


def gan_schedule(step: int, cfg: VQGANLossConfig) -> GanFactors:
    """The GAN factors at generator step `step`.

    d_factor = 1 for step >= disc_start, else 0.
    g_factor = disc_weight * clamp((step - g_start) / disc_ramp_steps, 0, 1), g_start = disc_start + disc_d_only_steps;
    with disc_ramp_steps = 0 it jumps to disc_weight at g_start. Both are 0 when disc_weight is 0.
    A training loop may skip the discriminator step altogether while d_factor is 0.
    """
    if cfg.disc_weight == 0 or step < cfg.disc_start:
        return GanFactors(0.0, 0.0)
    g_start = cfg.disc_start + cfg.disc_d_only_steps
    if step < g_start:
        return GanFactors(1.0, 0.0)
    ramp = 1.0 if cfg.disc_ramp_steps == 0 else min(1.0, (step - g_start) / cfg.disc_ramp_steps)
    return GanFactors(1.0, cfg.disc_weight * ramp)


class GeneratorLoss(NamedTuple):
    total: torch.Tensor  # scalar to backpropagate
    rec: torch.Tensor  # mean L1 or L2 over pixels (unweighted)
    perceptual: torch.Tensor  # mean LPIPS over the batch (0 when perceptual_weight is 0)
    quantizer: torch.Tensor  # the quantizer's loss as given (unweighted)
    g_adv: torch.Tensor  # generator adversarial loss (unweighted; 0 while g_factor is 0)
    d_weight: torch.Tensor  # adaptive weight (detached); 0 while g_factor is 0 and when no gradient is available
    disc_factor: float  # g_factor from gan_schedule


class DiscriminatorLoss(NamedTuple):
    total: torch.Tensor  # d_factor * (hinge or vanilla loss); scalar to backpropagate
    logits_real: torch.Tensor  # mean logit on real images (detached, for logging)
    logits_fake: torch.Tensor  # mean logit on reconstructions (detached, for logging)
    disc_factor: float  # d_factor from gan_schedule


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(G(z))))]) (Goodfellow et al. 2014), written with softplus."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """hinge: -E[D(G(z))]; vanilla: the non-saturating E[-log sigmoid(D(G(z)))]."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_weight(nll: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor, *, max_weight: float) -> torch.Tensor:
    """||grad_last nll|| / (||grad_last g_adv|| + 1e-4), clamped to [0, max_weight], detached (Esser et al. 2021, eq. 7).

    Balances the two gradients where they meet, at the decoder's last layer. Returns 0 (a defined fallback) when
    gradients are unavailable: under torch.no_grad / inference_mode, or when either loss has no graph.
    """
    if not (torch.is_grad_enabled() and nll.requires_grad and g_adv.requires_grad and last_layer.requires_grad):
        return torch.zeros((), device=nll.device)
    nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)
    g_grad, = torch.autograd.grad(g_adv, last_layer, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        raise ValueError(
            "last_layer does not take part in computing the reconstructions: pass the decoder's final conv weight "
            "(the parameter that produces the output image)."
        )
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


class VQGANLoss(nn.Module):
    """The VQGAN objective, in two calls: `generator_loss` for the autoencoder step, `discriminator_loss` for the
    discriminator step. The discriminator is passed in, not owned, so the training loop can wrap, shard and
    checkpoint it like any other model. Everything is computed in float32 with autocast off, whatever the
    training precision. Holds no trainable state (LPIPS is frozen); there is nothing in it to checkpoint.
    """

    def __init__(self, config: VQGANLossConfig) -> None:
        super().__init__()
        self.config = config
        self.lpips: LPIPS | None = None
        if config.perceptual_weight > 0:
            if not config.lpips_path:
                raise ValueError(
                    f"perceptual_weight={config.perceptual_weight} needs lpips_path, the local LPIPS weights file; "
                    "set perceptual_weight=0 to train without it.\n" + HOW_TO_GET_WEIGHTS
                )
            self.lpips = LPIPS.from_file(config.lpips_path)

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        quantizer_loss: torch.Tensor,
        last_layer: nn.Parameter,
        step: int,
        discriminator: nn.Module | None,
    ) -> GeneratorLoss:
        """images, reconstructions: (B, C, H, W) in [-1, 1]; quantizer_loss: scalar; last_layer: the decoder's final
        weight (for the adaptive weight); step: generator step, for gan_schedule; discriminator: may be None
        while gan_schedule's g_factor is 0 (it is not called then).

        The adversarial term runs the discriminator through torch.func.functional_call with *detached* copies of
        its parameters: gradients reach the reconstructions but never the discriminator's .grad. Unlike toggling
        requires_grad, this never mutates the caller's module (an exception cannot leave it frozen). The call goes
        to the plain module inside any DDP wrapper, so DDP's per-forward bookkeeping (reducer, buffer broadcast)
        only runs for the discriminator step, whose gradients are the ones it must synchronise.
        """
        cfg = self.config
        with _fp32(images.device):
            x, x_rec = images.float(), reconstructions.float()
            if x.shape != x_rec.shape:
                raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(x_rec.shape)} must have the same shape.")
            diff = x - x_rec
            rec = diff.abs().mean() if cfg.rec_loss == "l1" else (diff * diff).mean()
            perceptual = self.lpips(x, x_rec).mean() if self.lpips is not None else x.new_zeros(())
            nll = cfg.rec_weight * rec + cfg.perceptual_weight * perceptual
            quantizer = quantizer_loss.float()

            g_factor = gan_schedule(step, cfg).g_factor
            if g_factor > 0:
                if discriminator is None:
                    raise ValueError(f"step {step}: the GAN term is on (g_factor={g_factor}) but discriminator is None.")
                disc = _unwrap(discriminator)
                detached = {name: p.detach() for name, p in disc.named_parameters()}
                logits_fake = torch.func.functional_call(disc, detached, (x_rec,))
                g_adv = generator_adv_loss(logits_fake.float(), cfg.disc_loss)
                if cfg.adaptive_weight:
                    d_weight = adaptive_weight(nll, g_adv, last_layer, max_weight=cfg.adaptive_weight_max)
                else:
                    d_weight = x.new_ones(())
            else:  # the same value as computing the term and multiplying by 0, without the discriminator forward
                g_adv = x.new_zeros(())
                d_weight = x.new_zeros(())

            total = nll + cfg.quantizer_weight * quantizer + d_weight * g_factor * g_adv
        return GeneratorLoss(total, rec.detach(), perceptual.detach(), quantizer.detach(), g_adv.detach(), d_weight, g_factor)

    def discriminator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        step: int,
        discriminator: nn.Module,
    ) -> DiscriminatorLoss:
        """images, reconstructions: (B, C, H, W) in [-1, 1]. Reconstructions are detached here, so no gradient
        reaches the autoencoder. Real and fake go through the discriminator as one batch [real; fake]; with a
        GroupNorm (or unnormalised) discriminator this equals two separate calls.
        """
        cfg = self.config
        d_factor = gan_schedule(step, cfg).d_factor
        with _fp32(images.device):
            x, x_rec = images.detach().float(), reconstructions.detach().float()
            if x.shape != x_rec.shape:
                raise ValueError(f"images {tuple(x.shape)} and reconstructions {tuple(x_rec.shape)} must have the same shape.")
            logits = discriminator(torch.cat([x, x_rec])).float()
            logits_real, logits_fake = logits.chunk(2)
            loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
            total = d_factor * loss_fn(logits_real, logits_fake)
        return DiscriminatorLoss(total, logits_real.detach().mean(), logits_fake.detach().mean(), d_factor)
