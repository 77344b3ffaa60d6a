"""Diffusion-prior training on CLIP embedding shards (captions re-encoded by the frozen CLIP for their token states,
CFG text dropout, EMA) as a Task for the shared loop, with prior-metric evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.eval.prior_metrics import PriorEvalConfig, prior_metrics, trivial_priors
from argen.saved import TRAINED_WITH_KEY
from argen.train.loop import OptimizerConfig, OptimizerSpec, StepOutput, TrainConfig, TrainResult, seeded, train
from argen.unclip.clip import ClipEncoder, TextEncoding
from argen.unclip.diffusion_prior import (
    DiffusionPrior,
    DiffusionPriorArchitecture,
    DiffusionPriorConfig,
    normalize,
)
from argen.unclip.embeddings import EmbeddingSet
from argen.unclip.prior_sampling import sample_diffusion_prior
from argen.unclip.schedulers import SAMPLERS, noised_and_target, training_scheduler
from tokenizers_img.config import to_dict

PRIOR_DIR = "prior"  # final/prior: the DiffusionPrior (save_pretrained), its config.json records the CLIP it needs


@dataclass
class PriorDataConfig:
    """clip: the frozen CLIP directory (its text tower gives the token states; its sha256 must match the shards').
    train / val: embedding-shard directories (argen.unclip.embeddings); several are concatenated."""

    clip: str
    train: list[str]
    val: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.val, str):
            self.val = [self.val]
        if not self.train:
            raise ValueError("data.train must name at least one embedding-shard directory.")


@dataclass
class DiffusionPriorEvalConfig(PriorEvalConfig):
    """Validation during training: the denoising loss at fixed noise, and PriorEvalConfig's scoring of sampled
    embeddings (retrieval among the same val items), sampled as `sample_diffusion_prior` with these settings; `seed`
    fixes the noise, so evaluations at different steps are comparable."""

    batch_size: int = 500
    sampler: str = "ddim"
    steps: int = 25
    best_of: int = 1
    project_x0: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_items == 0:
            raise ValueError("eval.max_items must be >= 1 or null: the diffusion prior's validation scores its samples.")
        if self.steps < 1 or self.best_of < 1:
            raise ValueError(f"eval.steps and eval.best_of must be >= 1, got {self.steps} and {self.best_of}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler={self.sampler!r} is not one of {SAMPLERS}.")


@dataclass
class DiffusionPriorExperiment:
    """One diffusion-prior run. cond_drop_prob: share of training captions dropped (text states and embedding
    replaced by the prior's learned null condition) for classifier-free guidance; DALL-E 2 used 10%."""

    model: DiffusionPriorArchitecture
    data: PriorDataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: DiffusionPriorEvalConfig = field(default_factory=DiffusionPriorEvalConfig)
    cond_drop_prob: float = 0.1
    kind: str = "diffusion"  # which prior `argen train prior` trains; fixed for this experiment

    def __post_init__(self) -> None:
        if self.kind != "diffusion":
            raise ValueError(f"kind={self.kind!r}: this experiment trains the diffusion prior (kind: diffusion).")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}.")


def prior_config_for(arch: DiffusionPriorArchitecture, clip: ClipEncoder) -> DiffusionPriorConfig:
    """The full config: the architecture plus the sizes the CLIP fixes (embed_dim, text_width, text_len)."""
    return DiffusionPriorConfig(embed_dim=clip.embed_dim, text_width=clip.text_width, text_len=clip.text_len,
                                architecture=arch)


def denoising_loss(prior: nn.Module, x0: Tensor, text: TextEncoding, *, scheduler, cond_drop_prob: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Mean squared error of the prior's prediction at a uniformly drawn timestep (DALL-E 2 eq. for the prior:
    || f(z_t, t, y) - target ||^2 with target x_0 for prediction_type "sample", else epsilon or v).

    x0: (B, D) in the diffusion space (`normalize`). Noise, timesteps and dropped rows are drawn on the CPU from
    `generator` (None: the global RNG, which the training loop checkpoints), so a resumed run draws the same ones.
    """
    B, device = x0.shape[0], x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator).to(device)
    drop = (torch.rand(B, generator=generator) < cond_drop_prob).to(device) if cond_drop_prob > 0 else None
    x_t, target = noised_and_target(scheduler, x0, noise, t)
    return F.mse_loss(prior(x_t, t, text, drop_text=drop).float(), target.float())


@torch.no_grad()
def sample_for_captions(prior: DiffusionPrior, clip: ClipEncoder, captions: list[str], *, batch_size: int = 500,
                        seed: int = 0, **sampling: Any) -> Tensor:
    """Unit-norm sampled image embeddings (N, D) for `captions`, in batches; `sampling` goes to
    `sample_diffusion_prior`. One generator seeded `seed` runs through all batches, so the result is reproducible."""
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(captions), batch_size):
        text = clip.encode_text(captions[start:start + batch_size])
        out.append(sample_diffusion_prior(prior, text, generator=generator, **sampling).cpu())
    return torch.cat(out)


class DiffusionPriorTask:
    """Module {"prior"}, optimizer "prior". Batches are {"caption": list[str], "text_embed", "image_embed"} from
    EmbeddingSet; the token states come from the frozen CLIP per batch (they are not stored in the shards)."""

    def __init__(self, experiment: DiffusionPriorExperiment, *, clip: ClipEncoder, trained_with: dict[str, Any],
                 val_dataset: EmbeddingSet | None = None, train_dataset: EmbeddingSet | None = None) -> None:
        self.experiment = experiment
        self.clip = clip
        self.trained_with = trained_with
        self.val_dataset = val_dataset
        self.train_dataset = train_dataset  # for the trivial priors report() scores beside the trained one
        self.prior = DiffusionPrior(prior_config_for(experiment.model, clip))
        self.noise = training_scheduler(experiment.model.schedule)
        self.clip.model.requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"prior": self.prior}  # the CLIP stays outside: frozen, and not worth a copy in every checkpoint

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec(name="prior", modules=["prior"], config=self.experiment.optimizer)]

    def ema_modules(self) -> list[str]:
        return ["prior"]

    def _encode(self, captions: list[str], device: torch.device) -> TextEncoding:
        if self.clip.device != device:
            self.clip.model.to(device)
        with torch.no_grad():
            return self.clip.text_forward(*self.clip.tokenize(captions))

    def training_step(self, batch: dict[str, Any], *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        image_embeds = batch["image_embed"]
        text = self._encode(batch["caption"], image_embeds.device)
        x0 = normalize(image_embeds, self.prior.embed_scale)
        loss = denoising_loss(modules["prior"], x0, text, scheduler=self.noise,
                              cond_drop_prob=self.experiment.cond_drop_prob)
        return StepOutput(losses={"prior": loss})

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        """Every process computes the same numbers (the val set is small); the main one's are logged."""
        if self.val_dataset is None:
            return {}
        ev = self.experiment.eval
        prior = modules["prior"]
        n = len(self.val_dataset) if ev.max_items is None else min(ev.max_items, len(self.val_dataset))
        captions, true = self.val_dataset.captions[:n], self.val_dataset.image_embeds[:n]
        device = accelerator.device
        loss_gen = torch.Generator().manual_seed(ev.seed)
        losses = []
        for start in range(0, n, ev.batch_size):
            text = self._encode(captions[start:start + ev.batch_size], device)
            x0 = normalize(true[start:start + ev.batch_size].to(device), prior.embed_scale)
            with accelerator.autocast():
                losses.append(denoising_loss(prior, x0, text, scheduler=self.noise, generator=loss_gen) * len(x0))
        predicted = sample_for_captions(prior, self.clip, captions, batch_size=ev.batch_size, seed=ev.seed,
                                        sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale,
                                        best_of=ev.best_of, project_x0=ev.project_x0)
        metrics = prior_metrics(predicted, true).summary("val/")
        metrics["val/loss"] = float(torch.stack(losses).sum()) / n
        return metrics

    def describe(self) -> str:
        return (f"diffusion prior: {self.prior.num_params() / 1e6:.2f}M parameters, sequence {self.prior.config.seq_len}, "
                f"embed_dim {self.clip.embed_dim}; {self.trained_with['num_train_items']} training items, "
                f"{len(self.val_dataset) if self.val_dataset else 0} val items")

    def report(self, result: TrainResult) -> dict[str, Any]:
        baselines = {}
        if self.val_dataset is not None and self.train_dataset is not None:
            baselines = {name: m.summary() for name, m in trivial_priors(
                self.train_dataset, self.val_dataset, max_items=self.experiment.eval.max_items).items()}
        return {"baselines": baselines, "prior": str(result.artifacts_dir / PRIOR_DIR),
                "num_params": self.prior.num_params()}

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        modules["prior"].save_pretrained(Path(out_dir) / PRIOR_DIR, extra={TRAINED_WITH_KEY: self.trained_with})


def train_diffusion_prior(experiment: DiffusionPriorExperiment, *, resume: bool = False,
                          overwrite: bool = False) -> TrainResult:
    """Train the experiment's diffusion prior on its embedding shards through the shared loop.

    Writes `out_dir/final/prior` (the prior; its config.json records the CLIP's sha256 and path) and
    `out_dir/metrics.json` (final eval, the two trivial priors on the same val items, parameter count, time).
    """
    data = experiment.data
    clip = ClipEncoder.load(data.clip)
    clip_sha = clip.sha256
    train_set = EmbeddingSet(data.train, clip_sha256=clip_sha)
    val_set = EmbeddingSet(data.val, clip_sha256=clip_sha) if data.val else None
    if train_set.shards[0].dim != clip.embed_dim:
        raise ValueError(f"{data.train[0]} holds {train_set.shards[0].dim}-dim embeddings but the CLIP's embed_dim is "
                         f"{clip.embed_dim}.")
    trained_with = {"clip_sha256": clip_sha, "clip_path": str(data.clip), "train_shards": list(data.train),
                    "num_train_items": len(train_set)}
    task = seeded(experiment.train.seed, lambda: DiffusionPriorTask(
        experiment, clip=clip, trained_with=trained_with, val_dataset=val_set, train_dataset=train_set))
    return train(task, train_set, experiment.train, resume=resume, overwrite=overwrite, task_config=to_dict(experiment))
