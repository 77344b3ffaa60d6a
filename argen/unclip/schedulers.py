"""Noise schedules for the unCLIP diffusion models: one typed config, the `diffusers` DDPM scheduler used in training,
and the DDPM / DDIM / DPM-Solver++ schedulers used in sampling (with optional dynamic thresholding)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SAMPLERS = ("ddpm", "ddim", "dpm++")
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class NoiseSchedule:
    """The forward process a diffusion model is trained with; saved with the model, since sampling must match it.

    beta_schedule "squaredcos_cap_v2" is the cosine schedule (Nichol & Dhariwal 2021, eq. 17). prediction_type is what
    the network outputs: "sample" (the clean x_0, as DALL-E 2's prior), "epsilon" (the noise) or "v_prediction".
    """

    num_train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["sample", "epsilon", "v_prediction"] = "epsilon"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}.")
        for name, value, allowed in (("beta_schedule", self.beta_schedule, ("squaredcos_cap_v2", "linear", "scaled_linear")),
                                     ("prediction_type", self.prediction_type, ("sample", "epsilon", "v_prediction"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}.")


def training_scheduler(schedule: NoiseSchedule):
    """The `diffusers.DDPMScheduler` that noises x_0 to x_t in training (`add_noise`) and defines the targets."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
                         prediction_type=schedule.prediction_type, clip_sample=False)


def sampling_scheduler(schedule: NoiseSchedule, *, sampler: str, steps: int, thresholding: bool = False,
                       threshold_ratio: float = 0.995, sample_max_value: float = 1.0):
    """A `diffusers` scheduler for `sampler` ("ddpm", "ddim" or "dpm++" = DPMSolverMultistep, 2nd order,
    algorithm dpmsolver++) with `steps` timesteps already set.

    `thresholding` turns on dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3): each step's predicted x_0 is
    clipped to its `threshold_ratio` quantile of |x_0| (at least 1, at most `sample_max_value`) and rescaled. It
    suits images in [-1, 1], not embeddings.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}.")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps={steps} must be in [1, num_train_timesteps={schedule.num_train_timesteps}].")
    common = dict(num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
                  prediction_type=schedule.prediction_type, thresholding=thresholding,
                  dynamic_thresholding_ratio=threshold_ratio, sample_max_value=sample_max_value)
    if sampler == "ddpm":
        scheduler = DDPMScheduler(clip_sample=False, **common)
    elif sampler == "ddim":
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
    scheduler.set_timesteps(steps)
    return scheduler


def initial_noise(shape: tuple[int, ...], *, generator: Generators = None,
                  device: str | torch.device = "cpu") -> Tensor:
    """Standard normal (B, ...) noise; with one generator per row, row i depends on generator i only."""
    from diffusers.utils.torch_utils import randn_tensor

    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images; pass one per image or a single one.")
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


def noised_and_target(scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, the regression target at x_t): x_0, epsilon or v, per the schedule's prediction_type."""
    kind = scheduler.config.prediction_type
    target = x0 if kind == "sample" else noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return scheduler.add_noise(x0, noise, t), target
