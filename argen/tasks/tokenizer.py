"""Image-tokenizer training (VQ-VAE, or VQGAN with a discriminator) as a Task for the shared training loop."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from argen.data.registry import DatasetConfig, indexable
from argen.data.skips import SkipReport, collate
from argen.eval.tokenizer import evaluate_tokenizer
from argen.train.loop import OptimizerConfig, OptimizerSpec, StepOutput, TrainConfig, TrainResult, seeded, train
from argen.train.sharding import full_state_dict, is_dtensor, is_sharded
from tokenizers_img.config import to_dict
from tokenizers_img.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from tokenizers_img.losses import VQGANLoss, VQGANLossConfig, gan_schedule
from tokenizers_img.vq_model import VQConfig, VQModel

TOKENIZER_DIR = "tokenizer"  # save_artifacts writes the VQ model here, under the run directory


@dataclass
class TokenizerEvalConfig:
    """Validation: `max_images` None means the whole val split; `judge` scores agreement on shapes data."""

    split: str = "val"
    max_images: int | None = None
    batch_size: int = 128
    judge: bool = True


@dataclass
class TokenizerExperiment:
    """One tokenizer run. The image resolution is typed once, in `data.resolution`; `model.resolution` follows it."""

    model: VQConfig = field(default_factory=VQConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    discriminator: PatchDiscriminatorConfig = field(default_factory=PatchDiscriminatorConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)
    disc_lr_scale: float = 1.0  # discriminator lr = train lr * this

    def __post_init__(self) -> None:
        if self.model.resolution != self.data.resolution:
            # resolution is derived from the data section; a model section that also sets it must agree
            default = VQConfig.__dataclass_fields__["resolution"].default
            if self.model.resolution != default:
                raise ValueError(
                    f"model.resolution={self.model.resolution} disagrees with data.resolution={self.data.resolution}: "
                    "set the resolution once, in data.resolution."
                )
            self.model = dataclasses.replace(self.model, resolution=self.data.resolution)

    @property
    def gan(self) -> bool:
        return self.loss.disc_weight > 0


class TokenizerTask:
    """Modules {"vq"} or {"vq", "disc"}; optimisers "generator" over vq and "discriminator" over disc."""

    def __init__(self, experiment: TokenizerExperiment) -> None:
        self.experiment = experiment
        self.optimizer = experiment.optimizer
        self.vq = VQModel(experiment.model)
        self.loss = VQGANLoss(experiment.loss)
        self.disc = PatchDiscriminator(experiment.discriminator) if experiment.gan else None
        # Under FSDP2 the generator loss runs a whole copy of the discriminator (its parameters detached either way)
        self._disc_copy = copy.deepcopy(self.disc) if self.disc is not None else None
        self.val_dataset = None
        self._loss_device = None  # where self.loss (LPIPS) was last moved: the loop moves only modules()

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"vq": self.vq}
        if self.disc is not None:
            mods["disc"] = self.disc
        return mods

    def optimizers(self) -> list[OptimizerSpec]:
        specs = [OptimizerSpec(name="generator", modules=["vq"], config=self.optimizer)]
        if self.disc is not None:
            disc_cfg = dataclasses.replace(self.optimizer, lr=self.optimizer.lr * self.experiment.disc_lr_scale)
            specs.append(OptimizerSpec(name="discriminator", modules=["disc"], config=disc_cfg))
        return specs

    def ema_modules(self) -> list[str]:
        return ["vq"]

    def training_step(self, batch: dict, *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        images = batch["image"]
        if self._loss_device != images.device:
            # LPIPS is frozen and not checkpointed, so it is not one of modules(): the training device is first seen here
            self.loss.to(images.device)
            self._loss_device = images.device
        vq = modules["vq"]
        out = vq(images)
        q = out.quantizer_output
        inner = vq.module if hasattr(vq, "module") else vq
        g = self.loss.generator_loss(
            images, out.reconstruction, quantizer_loss=q.loss, last_layer=inner.last_decoder_layer,
            step=step, discriminator=self._adversary(modules.get("disc"), step=step, last_layer=inner.last_decoder_layer),
        )
        losses = {"generator": g.total}
        logs = {
            "rec": g.rec, "quant": g.quantizer, "commit": q.commit_loss.detach(), "perplexity": q.perplexity.detach(),
            "dead_codes": float(inner.quantizer.num_dead_codes(unused_for=self.experiment.model.dead_code_threshold or 100)),
        }
        if self.disc is not None:
            factors = gan_schedule(step, self.experiment.loss)
            logs.update(g_adv=g.g_adv, d_weight=g.d_weight, g_factor=factors.g_factor)
            if factors.d_factor > 0:
                d = self.loss.discriminator_loss(images, out.reconstruction, step=step, discriminator=modules["disc"])
                losses["discriminator"] = d.total
                logs.update(d_loss=d.total.detach(), logits_real=d.logits_real, logits_fake=d.logits_fake)
        return StepOutput(losses=losses, logs=logs)

    def _adversary(self, disc: nn.Module | None, *, step: int, last_layer: Any) -> nn.Module | None:
        """The discriminator the generator loss calls (None while the GAN is off: it is not called then): the
        prepared module, or under FSDP2 a whole copy loaded from its shards (a collective, at the same steps on every
        process). The loss runs it with detached parameters, so no gradient reaches the discriminator."""
        if disc is None or gan_schedule(step, self.experiment.loss).g_factor == 0 or not is_sharded(disc):
            return disc
        if self.experiment.loss.adaptive_weight and is_dtensor(last_layer):
            raise ValueError("the adaptive GAN weight differentiates by the decoder's last layer, which FSDP2 has "
                             "sharded again after the forward (an FSDP unit of its own, from the accelerate config's "
                             "auto-wrap policy): shard the VQ model as one unit (no auto-wrap policy), train it under "
                             "DDP (a VQGAN fits on one GPU), or set loss.adaptive_weight=false.")
        whole = full_state_dict(disc)
        device = next(iter(whole.values())).device
        self._disc_copy.to(device).load_state_dict(whole)
        return self._disc_copy

    def compile_problem(self, device: torch.device, mixed_precision: str) -> str | None:
        """Compiled under bf16 autocast on the CPU, the VQ model got wrong gradients, none for post_quant_conv
        (torch 2.13's Inductor; `benchmarks/compiled_tokenizer_grads.py` checks a torch), so it trains eagerly there."""
        if device.type == "cpu" and mixed_precision == "bf16":
            return ("compiled under bf16 autocast on the CPU, the tokenizer gets wrong gradients, zero for some layers "
                    "(an Inductor fault; python benchmarks/compiled_tokenizer_grads.py checks this torch); set "
                    "train.mixed_precision=no to compile it, or train.compile=false")
        return None

    def describe(self) -> str:
        parts = f"VQ {sum(p.numel() for p in self.vq.parameters()) / 1e6:.2f}M parameters"
        if self.disc is not None:
            parts += f", discriminator {sum(p.numel() for p in self.disc.parameters()) / 1e6:.2f}M"
        return f"tokenizer: {parts}; {self.experiment.data.spec} at {self.experiment.data.resolution} px"

    def report(self, result: TrainResult) -> dict[str, Any]:
        return {"tokenizer": str(result.artifacts_dir / TOKENIZER_DIR)}

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator, step: int) -> dict[str, float]:
        ev = self.experiment.eval
        if self.val_dataset is None:
            self.val_dataset = indexable(self.experiment.data.build(ev.split), max_images=ev.max_images)
        metrics = evaluate_tokenizer(
            modules["vq"], self.val_dataset, batch_size=ev.batch_size,
            judge=ev.judge and self.experiment.data.spec == "shapes", max_images=ev.max_images,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            reduce=lambda t: accelerator.reduce(t, reduction="sum"),
        )
        return {f"val/{k}": float(v) for k, v in metrics.as_dict().items() if v is not None}

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        modules["vq"].save_pretrained(Path(out_dir) / TOKENIZER_DIR)


def train_tokenizer(experiment: TokenizerExperiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the experiment's tokenizer; the VQ model lands in `out_dir/final/tokenizer`, metrics in `out_dir/metrics.json`.

    Skipped training files (corrupt, caption-less) are counted and named at the end; they never stop the run.
    """
    dataset = experiment.data.build("train")
    return train(seeded(experiment.train.seed, lambda: TokenizerTask(experiment)), dataset, experiment.train,
                 resume=resume, overwrite=overwrite, task_config=to_dict(experiment), collate_fn=collate,
                 skips=SkipReport.for_dataset(dataset))
