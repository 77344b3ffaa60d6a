"""unCLIP decoder training (images encoded by a frozen CLIP on the fly, CFG dropout of the image embedding and the
caption, EMA) as a Task for the shared loop, with evaluation of images decoded from their own CLIP embeddings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.data.registry import DatasetConfig
from argen.data.skips import SkipReport, collate
from argen.saved import TRAINED_WITH_KEY
from argen.train.loop import OptimizerConfig, OptimizerSpec, StepOutput, TrainConfig, TrainResult, seeded, train
from argen.unclip.clip import ClipEncoder, TextEncoding
from argen.unclip.decoder import DecoderArchitecture, DecoderConfig, UnCLIPDecoder
from argen.unclip.decoder_sampling import sample_decoder
from argen.unclip.schedulers import SAMPLERS, noised_and_target, training_scheduler
from tokenizers_img.config import to_dict
from tokenizers_img.metrics import psnr

DECODER_DIR = "decoder"  # final/decoder: the UnCLIPDecoder (save_pretrained); its config.json records its CLIP


@dataclass
class DecoderEvalConfig:
    """Validation: decode the first `max_images` images of `split` from their own CLIP image embeddings (and
    captions, when the decoder reads them) with the given sampler, and score them against the originals.
    `seed` fixes each image's noise, so evaluations at different steps are comparable."""

    split: str = "val"
    max_images: int = 256
    batch_size: int = 64
    sampler: str = "dpm++"
    steps: int = 10
    cfg_scale: float = 2.0
    thresholding: bool = True
    seed: int = 0
    judge: bool = True

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"eval.max_images, eval.batch_size and eval.steps must be >= 1, got {self.max_images}, "
                             f"{self.batch_size}, {self.steps}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"eval.sampler={self.sampler!r} is not one of {SAMPLERS}.")
        if self.cfg_scale < 0:
            raise ValueError(f"eval.cfg_scale must be >= 0, got {self.cfg_scale}.")


@dataclass
class DecoderExperiment:
    """One decoder run. The image resolution is typed once, in `data.resolution`; the embedding and text sizes come
    from the CLIP.

    clip: the frozen CLIP directory that encodes every training image (and caption).
    text_conditioning: also condition on the caption's CLIP token states (DALL-E 2's decoder reads the caption).
    image_drop_prob / text_drop_prob: CFG dropout, drawn independently per row (DALL-E 2: 10% and 50%; Karlo uses
        10% and 30%).
    min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023, eq. 8 with gamma = 5); null: plain MSE.
    """

    clip: str
    model: DecoderArchitecture = field(default_factory=DecoderArchitecture)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: DecoderEvalConfig = field(default_factory=DecoderEvalConfig)
    text_conditioning: bool = True
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5
    min_snr_gamma: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_drop_prob", "text_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null (plain MSE), got {self.min_snr_gamma}.")


def decoder_config_for(experiment: DecoderExperiment, clip: ClipEncoder) -> DecoderConfig:
    """The full config: the architecture plus the sizes the CLIP (embed_dim, text_width) and the data fix."""
    return DecoderConfig(embed_dim=clip.embed_dim, resolution=experiment.data.resolution,
                         text_width=clip.text_width if experiment.text_conditioning else None,
                         architecture=experiment.model)


def loss_weights(scheduler, t: Tensor, *, min_snr_gamma: float | None) -> Tensor | None:
    """Min-SNR-gamma weights (B,) for timesteps t (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x_0; SNR(t) = alpha_bar / (1 - alpha_bar). None: all 1."""
    if min_snr_gamma is None:
        return None
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=min_snr_gamma)
    kind = scheduler.config.prediction_type
    weights = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
    return weights.float()


@dataclass
class DenoisingLoss:
    """The trained loss (weighted when Min-SNR is on) and the plain MSE of the same predictions."""

    loss: Tensor
    mse: Tensor


def _draws(generator: torch.Generator | Sequence[torch.Generator] | None, shape: tuple[int, ...],
           num_timesteps: int) -> tuple[Tensor, Tensor, Tensor]:
    """CPU draws for a batch: noise (B, ...), timesteps (B,) int64 and uniforms (B, 2) for the two CFG drops.
    One generator (or None: the global RNG) for the batch, or one per row so a row's draws depend on it alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return (torch.randn(shape, generator=generator), torch.randint(0, num_timesteps, shape[:1], generator=generator),
                torch.rand(shape[0], 2, generator=generator))
    rows = [_draws(g, (1, *shape[1:]), num_timesteps) for g in generator]
    return tuple(torch.cat(parts) for parts in zip(*rows))  # type: ignore[return-value]


def denoising_loss(decoder: nn.Module, images: Tensor, image_embeds: Tensor, *, text: TextEncoding | None,
                   scheduler, image_drop_prob: float = 0.0, text_drop_prob: float = 0.0,
                   min_snr_gamma: float | None = None,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None) -> DenoisingLoss:
    """Squared error of the decoder's prediction at a uniformly drawn timestep (DDPM's L_simple; the target is
    epsilon, x_0 or v per the schedule's prediction_type), Min-SNR weighted when `min_snr_gamma` is set.

    images: (B, 3, R, R) in [-1, 1]; image_embeds (B, D). Noise, timesteps and CFG drops are drawn on the CPU from
    `generator` (None: the global RNG, which the training loop checkpoints, so a resumed run draws the same ones;
    or one generator per row).
    """
    device = images.device
    noise, t, u = _draws(generator, tuple(images.shape), scheduler.config.num_train_timesteps)
    noise, t, u = noise.to(device), t.to(device), u.to(device)
    drop_image = u[:, 0] < image_drop_prob
    drop_text = u[:, 1] < text_drop_prob if text is not None else None
    x_t, target = noised_and_target(scheduler, images, noise, t)
    out = decoder(x_t, t, image_embeds, text=text, drop_image=drop_image, drop_text=drop_text)
    per_image = (out.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
    weights = loss_weights(scheduler, t, min_snr_gamma=min_snr_gamma)
    loss = per_image.mean() if weights is None else (weights * per_image).mean()
    return DenoisingLoss(loss=loss, mse=per_image.mean().detach())


@dataclass(frozen=True)
class DecoderMetrics:
    """Images decoded from the true CLIP image embeddings of val images, scored against those images.

    psnr: dB, decoded vs original, mean over images. clip_cosine: cosine between CLIP's embedding of the decoded
    image and the embedding it was decoded from. judge_agreement: share of images whose judge reading (parse)
    equals the original's. judge_correct: share whose caption the judge accepts whole; attributes[a]: share
    correct among the images whose caption states `a` (None when none does). seconds_per_image: sampling time.
    """

    num_images: int
    psnr: float
    clip_cosine: float
    judge_agreement: float | None
    judge_correct: float | None
    attributes: dict[str, float | None]
    seconds_per_image: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers (attributes as `attr/<name>`), without the Nones."""
        flat = {k: v for k, v in asdict(self).items() if k != "attributes"}
        flat.update({f"attr/{k}": v for k, v in self.attributes.items()})
        return {f"{prefix}{k}": float(v) for k, v in flat.items() if v is not None}


def _row_generators(indices: Sequence[int], *, seed: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per item, seeded by (seed, item index): an item's noise does not depend on batching."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(i)) for i in indices]


@torch.no_grad()
def evaluate_decoder(decoder: UnCLIPDecoder, clip: ClipEncoder, dataset, *, max_images: int, batch_size: int,
                     sampler: str, steps: int, cfg_scale: float, thresholding: bool, seed: int, judge: bool = True,
                     rank: int = 0, world_size: int = 1, reduce=None) -> DecoderMetrics:
    """Decode the first `max_images` items of `dataset` (items {"image", "caption"}) from CLIP's embeddings of
    their own images (and captions, for a text-conditioned decoder) and score the results (see DecoderMetrics).

    With several processes each takes every `world_size`-th item from `rank`; `reduce(tensor)` must sum over
    processes. `judge` needs shapes captions (argen.eval.judge). The sampler settings come from `DecoderEvalConfig`.
    """
    from argen.eval.judge import ATTRIBUTES, parse
    from argen.eval.judge import judge as judge_fn

    device = next(decoder.parameters()).device
    n = min(max_images, len(dataset))
    mine = list(range(rank, n, world_size))
    # sums: psnr, cosine, agreement, correct, seconds, images, then (correct, stated) per attribute
    sums = torch.zeros(6 + 2 * len(ATTRIBUTES), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        items = [dataset[i] for i in idx]
        images = torch.stack([item["image"] for item in items]).to(device)  # (b, 3, R, R)
        captions = [item["caption"] for item in items]
        embeds = clip.encode_images(images)  # (b, D)
        text = clip.encode_text(captions) if decoder.config.text_width is not None else None
        clock = time.perf_counter()
        decoded = sample_decoder(decoder, embeds, text=text, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                                 thresholding=thresholding, generator=_row_generators(idx, seed=seed, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sums[4] += time.perf_counter() - clock
        sums[0] += psnr(images, decoded).sum().cpu()
        sums[1] += F.cosine_similarity(clip.encode_images(decoded), embeds, dim=-1).double().sum().cpu()
        sums[5] += len(idx)
        if judge:
            for original, image, caption in zip(images.cpu(), decoded.cpu(), captions):
                sums[2] += float(parse(image) == parse(original))
                result = judge_fn(caption, image)
                sums[3] += float(result.correct)
                for k, a in enumerate(ATTRIBUTES):
                    if result.attributes[a] is not None:
                        sums[6 + 2 * k] += float(result.attributes[a])
                        sums[7 + 2 * k] += 1.0
    if world_size > 1:
        sums = reduce(sums.to(device)).cpu()
    count = max(float(sums[5]), 1.0)
    attributes = {a: (float(sums[6 + 2 * k]) / float(sums[7 + 2 * k]) if judge and sums[7 + 2 * k] > 0 else None)
                  for k, a in enumerate(ATTRIBUTES)}
    return DecoderMetrics(num_images=int(sums[5]), psnr=float(sums[0]) / count, clip_cosine=float(sums[1]) / count,
                          judge_agreement=float(sums[2]) / count if judge else None,
                          judge_correct=float(sums[3]) / count if judge else None, attributes=attributes,
                          seconds_per_image=float(sums[4]) / count)


class DecoderTask:
    """Module {"decoder"}, optimizer "decoder". Batches are {"image", "caption"} from the image dataset; the frozen
    CLIP turns each batch's images (and captions) into the conditions on the fly."""

    def __init__(self, experiment: DecoderExperiment, *, clip: ClipEncoder, trained_with: dict[str, Any]) -> None:
        self.experiment = experiment
        self.clip = clip
        self.trained_with = trained_with
        self.decoder = UnCLIPDecoder(decoder_config_for(experiment, clip))
        self.noise = training_scheduler(experiment.model.schedule)
        self.clip.model.requires_grad_(False)
        self.val_dataset = None

    def modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder}  # the CLIP stays outside: frozen, and not worth a copy in every checkpoint

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec(name="decoder", modules=["decoder"], config=self.experiment.optimizer)]

    def ema_modules(self) -> list[str]:
        return ["decoder"]

    def _conditions(self, images: Tensor, captions: list[str]) -> tuple[Tensor, TextEncoding | None]:
        """CLIP image embeddings (B, D) and, for a text-conditioned decoder, the captions' encoding; no grad."""
        if self.clip.device != images.device:
            self.clip.model.to(images.device)
        with torch.no_grad():
            embeds = self.clip.image_forward(images)
            text = self.clip.text_forward(*self.clip.tokenize(captions)) if self.experiment.text_conditioning else None
        return embeds, text

    def training_step(self, batch: dict[str, Any], *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        images = batch["image"]
        embeds, text = self._conditions(images, batch["caption"])
        exp = self.experiment
        out = denoising_loss(modules["decoder"], images, embeds, text=text, scheduler=self.noise,
                             image_drop_prob=exp.image_drop_prob, text_drop_prob=exp.text_drop_prob,
                             min_snr_gamma=exp.min_snr_gamma)
        return StepOutput(losses={"decoder": out.loss}, logs={"mse": out.mse})

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        ev = self.experiment.eval
        if self.val_dataset is None:
            self.val_dataset = self.experiment.data.build(ev.split)
        if self.clip.device != accelerator.device:
            self.clip.model.to(accelerator.device)
        rank, world = accelerator.process_index, accelerator.num_processes
        reduce = lambda t: accelerator.reduce(t, reduction="sum")  # noqa: E731
        metrics = evaluate_decoder(
            modules["decoder"], self.clip, self.val_dataset, max_images=ev.max_images, batch_size=ev.batch_size,
            sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale, thresholding=ev.thresholding, seed=ev.seed,
            judge=ev.judge and self.experiment.data.spec == "shapes", rank=rank, world_size=world, reduce=reduce)
        return {**metrics.as_dict("val/"), **self._val_loss(modules["decoder"], accelerator)}

    def _val_loss(self, decoder: nn.Module, accelerator: Any) -> dict[str, float]:
        """The training loss (and plain MSE) on the eval images at noise, timesteps and drops fixed by eval.seed: a
        smoother signal than the sampled-image scores. Each item's draws depend on its index only."""
        ev, exp = self.experiment.eval, self.experiment
        n = min(ev.max_images, len(self.val_dataset))
        mine = list(range(accelerator.process_index, n, accelerator.num_processes))
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, mse, items
        for start in range(0, len(mine), ev.batch_size):
            idx = mine[start:start + ev.batch_size]
            items = [self.val_dataset[i] for i in idx]
            images = torch.stack([item["image"] for item in items]).to(accelerator.device)
            embeds, text = self._conditions(images, [item["caption"] for item in items])
            with accelerator.autocast():
                out = denoising_loss(decoder, images, embeds, text=text, scheduler=self.noise,
                                     image_drop_prob=exp.image_drop_prob, text_drop_prob=exp.text_drop_prob,
                                     min_snr_gamma=exp.min_snr_gamma, generator=_row_generators(idx, seed=ev.seed))
            sums += torch.tensor([float(out.loss) * len(idx), float(out.mse) * len(idx), len(idx)], dtype=torch.float64,
                                 device=sums.device)
        sums = accelerator.reduce(sums, reduction="sum")
        count = float(sums[2].clamp(min=1))
        return {"val/loss": float(sums[0]) / count, "val/mse": float(sums[1]) / count}

    def describe(self) -> str:
        clip, exp = self.clip, self.experiment
        text = f", caption tokens {clip.text_len} x {clip.text_width}" if exp.text_conditioning else ""
        return (f"decoder: {self.decoder.num_params() / 1e6:.2f}M parameters; {exp.data.resolution} px; image embedding "
                f"{clip.embed_dim}{text}; CLIP {clip.sha256[:12]} ({exp.clip})")

    def report(self, result: TrainResult) -> dict[str, Any]:
        return {"decoder": str(result.artifacts_dir / DECODER_DIR), "num_params": self.decoder.num_params()}

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        modules["decoder"].save_pretrained(Path(out_dir) / DECODER_DIR, extra={TRAINED_WITH_KEY: self.trained_with})


def train_decoder(experiment: DecoderExperiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the experiment's decoder through the shared loop on its image dataset, CLIP-encoded per batch.

    Writes `out_dir/final/decoder` (the decoder; its config.json records the CLIP's sha256 and path) and
    `out_dir/metrics.json` (final eval, parameter count, training seconds, skipped files).
    """
    clip = ClipEncoder.load(experiment.clip)
    dataset = experiment.data.build("train")
    trained_with = {"clip_sha256": clip.sha256, "clip_path": str(experiment.clip), "dataset": experiment.data.spec,
                    "resolution": experiment.data.resolution, "text_conditioning": experiment.text_conditioning}
    task = seeded(experiment.train.seed, lambda: DecoderTask(experiment, clip=clip, trained_with=trained_with))
    return train(task, dataset, experiment.train, resume=resume, overwrite=overwrite, task_config=to_dict(experiment),
                 collate_fn=collate, skips=SkipReport.for_dataset(dataset))
