"""CLIP training (a small `transformers.CLIPModel` with the contrastive loss) on a captioned dataset as a Task for the shared loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.data.registry import DatasetConfig
from argen.data.skips import SkipReport, collate
from argen.eval.retrieval import RetrievalEvaluator
from argen.text import TextTokenizer, dataset_captions, train_text_tokenizer, warn_truncated
from argen.train.checkpoint import latest_checkpoint
from argen.train.loop import OptimizerConfig, OptimizerSpec, StepOutput, TrainConfig, TrainResult, seeded, train
from argen.train.processes import process_state
from argen.unclip.clip import ClipEncoder
from tokenizers_img.config import to_dict
from tokenizers_img.serialization import claim_output_dir

CLIP_DIR = "clip"  # save_artifacts writes the ClipEncoder directory here, under the run's final/
TEXT_TOKENIZER_FILE = "text_tokenizer.json"  # the run's BPE, kept beside the checkpoints so a resume reads the same one
BPE_CAPTIONS = 100_000  # captions a BPE is trained on when none is given (the `argen train text-tokenizer` default)
LOGIT_SCALE_MAX = 100.0  # CLIP's clamp on the learned temperature (exp(logit_scale) <= 100)


@dataclass
class TowerConfig:
    """One transformer tower: width (hidden size), layers, heads; the MLP is `mlp_ratio * width` wide."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for key in ("width", "layers", "heads", "mlp_ratio"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}.")


@dataclass
class CLIPArchitecture:
    """The `model` section. The derived sizes are never typed: the vision tower's image size is data.resolution,
    the text tower's positions are text_len and its vocabulary is the BPE's."""

    text: TowerConfig = field(default_factory=lambda: TowerConfig(width=128, layers=3))
    vision: TowerConfig = field(default_factory=TowerConfig)
    patch_size: int = 8
    projection_dim: int = 64
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.projection_dim < 1:
            raise ValueError(f"patch_size ({self.patch_size}) and projection_dim ({self.projection_dim}) must be >= 1.")

    def clip_config(self, *, resolution: int, text_len: int):
        """The `transformers.CLIPConfig`; vocabulary and pad/eos ids are filled in by `ClipEncoder.build`."""
        from transformers import CLIPConfig

        if resolution % self.patch_size:
            raise ValueError(f"data.resolution={resolution} is not a multiple of model.patch_size={self.patch_size}.")
        text = dict(hidden_size=self.text.width, intermediate_size=self.text.mlp_ratio * self.text.width,
                    num_hidden_layers=self.text.layers, num_attention_heads=self.text.heads,
                    max_position_embeddings=text_len)
        vision = dict(hidden_size=self.vision.width, intermediate_size=self.vision.mlp_ratio * self.vision.width,
                      num_hidden_layers=self.vision.layers, num_attention_heads=self.vision.heads,
                      image_size=resolution, patch_size=self.patch_size)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim,
                          logit_scale_init_value=self.logit_scale_init)


@dataclass
class CLIPEvalConfig:
    """Validation retrieval: the first `candidates` items of `split` (fewer if the split is smaller) are both the
    queries and the candidates. `seed` is the shapes scene stream of the eval split (kept at 0 so that CLIPs trained
    on other train streams are measured on the same val scenes; shapes val scenes are never train scenes)."""

    split: str = "val"
    candidates: int = 1000
    seed: int = 0
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.candidates < 2 or self.batch_size < 1:
            raise ValueError(f"eval.candidates ({self.candidates}) must be >= 2 and eval.batch_size ({self.batch_size}) >= 1.")


@dataclass
class CLIPExperiment:
    """One CLIP run.

    text_tokenizer: a tokenizer.json (or a directory holding one); None trains a byte-level BPE on the first
        100,000 train captions of the dataset, exactly as `argen train text-tokenizer` does with its defaults.
    text_len: caption tokens the text tower reads, the pooled end position included (captions keep text_len - 1).
    The loss is CLIP's (`contrastive_loss`).
    """

    model: CLIPArchitecture = field(default_factory=CLIPArchitecture)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    text_tokenizer: str | None = None
    text_len: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: CLIPEvalConfig = field(default_factory=CLIPEvalConfig)

    def __post_init__(self) -> None:
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2 (at least one caption token and the pooled position), got {self.text_len}.")
        self.model.clip_config(resolution=self.data.resolution, text_len=self.text_len)  # fails now, not after data prep


def contrastive_loss(text_embeds: Tensor, image_embeds: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE between L2-normalised text and image embeddings (B, D); `logit_scale` is the log
    inverse temperature, its exp clamped to LOGIT_SCALE_MAX as in CLIP.

    Repeated captions in a batch (frequent on shapes) need no multi-positive targets: the text tower is
    deterministic, so two copies of a caption get equal rows of logits, and the one-positive loss over those rows
    (and over their equal columns) is exactly the loss with uniform soft targets over all copies (tested).
    """
    logits = logit_scale.exp().clamp(max=LOGIT_SCALE_MAX) * text_embeds @ image_embeds.T  # (B texts, B images)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIPTask:
    """Module {"clip"} (the CLIPModel), optimizer "clip". Batches are `collate`d dataset items {"image", "caption"}."""

    def __init__(self, experiment: CLIPExperiment, *, tokenizer: TextTokenizer,
                 evaluator: RetrievalEvaluator | None = None) -> None:
        self.experiment = experiment
        config = experiment.model.clip_config(resolution=experiment.data.resolution, text_len=experiment.text_len)
        self.clip = ClipEncoder.build(config, tokenizer, text_len=experiment.text_len, seed=experiment.train.seed)
        self.evaluator = evaluator

    def modules(self) -> dict[str, nn.Module]:
        return {"clip": self.clip.model}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec(name="clip", modules=["clip"], config=self.experiment.optimizer)]

    def ema_modules(self) -> list[str]:
        return ["clip"]

    def training_step(self, batch: dict[str, Any], *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        ids, mask = self.clip.tokenize(batch["caption"])  # (B, text_len)
        # The text tower is causal and pools at the first PAD, so the columns after the batch's longest caption
        # change nothing: dropping them is exact and saves most of the text tower (shapes captions average 8 of
        # 27 tokens).
        ids = ids[:, :int(mask.sum(dim=1).max())]
        model = modules["clip"]
        out = model(input_ids=ids, pixel_values=self.clip.pixel_values(batch["image"]))
        logit_scale = getattr(model, "module", model).logit_scale
        loss = contrastive_loss(out.text_embeds, out.image_embeds, logit_scale)
        with torch.no_grad():  # share of captions whose own image scores highest in the batch (repeats tie: a miss)
            logits = out.text_embeds @ out.image_embeds.T
            batch_acc = (logits.argmax(dim=1) == torch.arange(len(ids), device=ids.device)).float().mean()
        logs = {"temperature": 1 / logit_scale.detach().exp().clamp(max=LOGIT_SCALE_MAX), "batch_t2i_acc": batch_acc}
        return StepOutput(losses={"clip": loss}, logs=logs)

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        metrics = self.evaluator(ClipEncoder(modules["clip"], self.clip.tokenizer, text_len=self.clip.text_len))
        return {f"val/{k}": v for k, v in metrics.as_dict().items()}

    def describe(self) -> str:
        tok = self.clip.tokenizer
        candidates = len(self.evaluator.captions) if self.evaluator is not None else 0
        return (f"CLIP: {self.num_params() / 1e6:.2f}M parameters, embed dim {self.clip.embed_dim}, text BPE vocab "
                f"{tok.vocab_size} (sha256 {tok.sha256[:12]}); retrieval over {candidates} "
                f"{self.experiment.eval.split} candidates")

    def report(self, result: TrainResult) -> dict[str, Any]:
        return {"clip": str(result.artifacts_dir / CLIP_DIR), "num_params": self.num_params(),
                "candidates": len(self.evaluator.captions) if self.evaluator is not None else 0,
                "eval_split": self.experiment.eval.split}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.clip.model.parameters())

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        ClipEncoder(modules["clip"], self.clip.tokenizer, text_len=self.clip.text_len).save(Path(out_dir) / CLIP_DIR)


def clip_text_tokenizer(experiment: CLIPExperiment, *, resume: bool = False, overwrite: bool = False) -> TextTokenizer:
    """The experiment's BPE: the named file, or one trained on the dataset's captions. A trained one is written to
    out_dir/text_tokenizer.json, and a resumed run reads that file back rather than training again."""
    if experiment.text_tokenizer is not None:
        return TextTokenizer.load(experiment.text_tokenizer)
    saved = Path(experiment.train.out_dir) / TEXT_TOKENIZER_FILE
    if resume and saved.is_file():
        return TextTokenizer.load(saved)
    data = experiment.data
    print(f"training a byte-level BPE on up to {BPE_CAPTIONS} {data.spec} train captions (set text_tokenizer to reuse one)")
    tokenizer = train_text_tokenizer(dataset_captions(data.spec, split="train", limit=BPE_CAPTIONS, seed=data.seed,
                                                          val_fraction=data.val_fraction,
                                                          follow_symlinks=data.follow_symlinks, strict=data.strict))
    if process_state().is_main_process and (overwrite or latest_checkpoint(saved.parent) is None):  # never under a run's checkpoints
        claim_output_dir(saved.parent, kind="run")  # the run's folder: `train` refuses one argen did not write
        tokenizer.save(saved)
    return tokenizer


def train_clip(experiment: CLIPExperiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the experiment's CLIP through the shared loop; val retrieval is logged every `train.eval_every` steps
    and at the end. Writes `out_dir/final/clip` (a ClipEncoder directory) and `out_dir/metrics.json`."""
    tokenizer = clip_text_tokenizer(experiment, resume=resume, overwrite=overwrite)
    dataset = experiment.data.build("train")
    ev, data = experiment.eval, experiment.data
    evaluator = RetrievalEvaluator(data.spec, split=ev.split, resolution=data.resolution, seed=ev.seed,
                                   candidates=ev.candidates, val_fraction=data.val_fraction, batch_size=ev.batch_size)
    _, lengths = tokenizer.encode_ids(evaluator.captions, text_len=experiment.text_len - 1)
    warn_truncated(lengths, text_len=experiment.text_len - 1, what="val caption")
    task = seeded(experiment.train.seed, lambda: CLIPTask(experiment, tokenizer=tokenizer, evaluator=evaluator))
    task_config = {**to_dict(experiment), "text_tokenizer_sha256": tokenizer.sha256}
    return train(task, dataset, experiment.train, resume=resume, overwrite=overwrite, task_config=task_config,
                 collate_fn=collate, skips=SkipReport.for_dataset(dataset))
