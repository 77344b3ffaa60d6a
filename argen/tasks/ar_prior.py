"""AR prior training: fit the embedding quantizer, write its tokens as code shards, train the GPT on them with the GPT task."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from argen.data.codes import CodeShardMeta, CodeShardWriter
from argen.eval.prior_metrics import PriorEvalConfig, PriorMetrics, prior_metrics, trivial_priors
from argen.pipeline import GPT_DIR
from argen.sample import SamplingConfig
from argen.tasks.gpt import GPTArchitecture, GPTDataConfig, GPTEvalConfig, GPTExperiment, train_gpt
from argen.text import TOKENIZER_FILE, TextTokenizer, resolve_tokenizer_file
from argen.train.checkpoint import latest_checkpoint
from argen.train.loop import OptimizerConfig, ResumeMismatchError, TrainConfig, TrainResult
from argen.train.processes import process_state
from argen.unclip.ar_prior import DEQUANTIZE, EmbeddingQuantizer
from argen.unclip.ar_prior_sampling import (
    AR_PRIOR_FILE,
    FORMAT,
    FORMAT_VERSION,
    PART_CLASSES,
    QUANTIZER_DIR,
    ARPrior,
    ARPriorSamplingConfig,
    sample_ar_prior,
)
from argen.unclip.clip import ClipEncoder
from argen.unclip.embeddings import EmbeddingSet
from tokenizers_img.config import to_dict
from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir, claim_output_dir, pretrained_hash

CODES_DIR = "codes"  # out_dir/codes/{train,val}: the quantizer's tokens as code shards for the GPT task


@dataclass
class ARPriorDataConfig:
    """clip: the CLIP directory the embedding shards were computed with (its tokenizer.json is the caption BPE).
    train / val: embedding-shard directories (argen.unclip.embeddings); several are concatenated.
    text_len: caption tokens in the GPT prefix (None: the CLIP's own text_len - 1, every token our CLIP reads)."""

    clip: str
    train: list[str]
    val: list[str] = field(default_factory=list)
    text_len: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.val, str):
            self.val = [self.val]
        if not self.train:
            raise ValueError("data.train must name at least one embedding-shard directory.")
        if self.text_len is not None and self.text_len < 1:
            raise ValueError(f"data.text_len must be >= 1 or null, got {self.text_len}.")


@dataclass
class QuantizerSettings:
    """How the training image embeddings become tokens: PCA keeping `variance` of the variance (or exactly
    `n_components`), `num_buckets` quantile buckets per coordinate, DALL-E 2's given tokens (the caption's text
    embedding, the text-image dot product), and the value a bucket decodes to. See QuantizerConfig."""

    num_buckets: int = 64
    variance: float = 0.99
    n_components: int | None = None
    text_tokens: bool = False
    interleave: bool = False
    dot_token: bool = True
    dequantize: Literal["mean", "midpoint"] = "mean"

    def __post_init__(self) -> None:
        if self.num_buckets < 2:
            raise ValueError(f"quantizer.num_buckets must be >= 2, got {self.num_buckets}.")
        if not 0.0 < self.variance <= 1.0:
            raise ValueError(f"quantizer.variance must be in (0, 1], got {self.variance}.")
        if self.n_components is not None and self.n_components < 1:
            raise ValueError(f"quantizer.n_components must be >= 1 or null, got {self.n_components}.")
        if self.dequantize not in DEQUANTIZE:
            raise ValueError(f"quantizer.dequantize must be one of {DEQUANTIZE}, got {self.dequantize!r}.")
        if self.interleave and not self.text_tokens:
            raise ValueError("quantizer.interleave places the text-embedding tokens between the image tokens: set "
                             "quantizer.text_tokens=true, or interleave=false.")


@dataclass
class ARPriorExperiment:
    """One AR prior run: the quantizer, then a GPT (the GPT task's model/train/optimizer/eval sections) over
    [caption | BOI | dot token, PCA tokens]. cond_drop_prob: share of captions dropped for CFG."""

    model: GPTArchitecture
    data: ARPriorDataConfig
    quantizer: QuantizerSettings = field(default_factory=QuantizerSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: GPTEvalConfig = field(default_factory=GPTEvalConfig)
    prior_eval: PriorEvalConfig = field(default_factory=PriorEvalConfig)
    cond_drop_prob: float = 0.1
    kind: str = "ar"  # which prior `argen train prior` trains; fixed for this experiment

    def __post_init__(self) -> None:
        if self.kind != "ar":
            raise ValueError(f"kind={self.kind!r}: this experiment trains the ar prior (kind: ar).")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}.")


def write_token_shard(quantizer: EmbeddingQuantizer, embeddings: EmbeddingSet, out: Path, *, quantizer_hash: str,
                      split: str) -> Path:
    """The quantizer's tokens (N, num_tokens) of an embedding set, with its captions, as a code shard of grid
    (1, num_tokens) and K codes; `tokenizer_hash` is the quantizer's, so the GPT records which quantizer it read."""
    tokens = quantizer.encode(embeddings.image_embeds, embeddings.text_embeds)
    if out.exists():
        shutil.rmtree(out)  # written from scratch each run: deterministic, and seconds to make
    meta = CodeShardMeta(num_items=len(tokens), done=0, grid=(1, quantizer.num_tokens), num_codes=quantizer.num_buckets,
                         tokenizer_hash=quantizer_hash, dataset="embeddings:" + ",".join(embeddings.paths), split=split,
                         resolution=0)  # 0: the rows are embedding tokens, not codes of images of some resolution
    CodeShardWriter(out, meta, resume=False).append(tokens.numpy(), embeddings.captions,
                                                    [f"{split}/{i}" for i in range(len(tokens))])
    return out


def score_ar_prior(prior: ARPrior, embeddings: EmbeddingSet, *, config: ARPriorSamplingConfig = ARPriorSamplingConfig(),
                   seed: int = 0, batch_size: int = 250, max_items: int | None = None) -> PriorMetrics:
    """Sample the prior for the first `max_items` captions of `embeddings` (batch k seeded with seed + k) and score
    the samples against their true image embeddings, ranked among those same true images."""
    n = len(embeddings.captions) if max_items is None else min(max_items, len(embeddings.captions))
    predicted = torch.cat([
        sample_ar_prior(prior, embeddings.captions[i:i + batch_size], text_embeds=embeddings.text_embeds[i:i + batch_size],
                        config=config, generator=torch.Generator().manual_seed(seed + k))
        for k, i in enumerate(range(0, n, batch_size))
    ])
    return prior_metrics(predicted, embeddings.image_embeds[:n])


def _same_quantizer(a: EmbeddingQuantizer, b: EmbeddingQuantizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return to_dict(a.config) == to_dict(b.config) and all(torch.equal(sa[k], sb[k]) for k in sa)


def train_ar_prior(experiment: ARPriorExperiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fit the quantizer on the training image embeddings, write train/val tokens as code shards under
    out_dir/codes, train the GPT on them with `train_gpt`, and make out_dir/final an AR prior directory:

        final/gpt/             the GPT (its config.json records the quantizer hash and the caption BPE's sha256)
        final/tokenizer.json   the CLIP's caption BPE
        final/quantizer/       the EmbeddingQuantizer (config.json + model.safetensors)
        final/ar_prior.json    written last: format, CLIP sha256 and path, part hashes, quantizer summary

    out_dir/metrics.json gains the quantizer summary, its val round-trip error, the wall time (fit + tokens +
    GPT training) and, with `prior_eval.max_items`, the sampled prior's val metrics beside the two trivial priors.
    """
    start = time.perf_counter()
    data, settings = experiment.data, experiment.quantizer
    out_dir = Path(experiment.train.out_dir)
    if not resume and not overwrite and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoint {latest_checkpoint(out_dir).name}; pass resume=True "
                              "to continue it, overwrite=True to start over, or choose another out_dir.")
    clip = ClipEncoder.load(data.clip)
    clip_sha256 = clip.sha256
    tok_file = resolve_tokenizer_file(data.clip)
    text = TextTokenizer.load(tok_file)
    text_len = data.text_len if data.text_len is not None else clip.text_len - 1
    train_set = EmbeddingSet(data.train, clip_sha256=clip_sha256)
    val_set = EmbeddingSet(data.val, clip_sha256=clip_sha256) if data.val else None

    quantizer = EmbeddingQuantizer.fit(train_set.image_embeds, text_embeds=train_set.text_embeds,
                                       num_buckets=settings.num_buckets, variance=settings.variance,
                                       n_components=settings.n_components, dot_token=settings.dot_token,
                                       text_tokens=settings.text_tokens, interleave=settings.interleave,
                                       dequantize=settings.dequantize)
    quantizer_dir, codes_dir = out_dir / QUANTIZER_DIR, out_dir / CODES_DIR
    if resume and (quantizer_dir / "config.json").is_file() and \
            not _same_quantizer(quantizer, EmbeddingQuantizer.from_pretrained(quantizer_dir)):
        raise ResumeMismatchError(f"cannot resume {out_dir}: its {QUANTIZER_DIR}/ differs from the quantizer these "
                                  "embeddings and quantizer settings fit now. Resume with the original data and "
                                  "settings, or start a new out_dir.")
    state = process_state()  # the same process group the training loop's Accelerator joins
    if state.is_main_process:  # the fit is deterministic: every process holds the same quantizer, one writes it
        claim_output_dir(out_dir, kind="run")  # the run's folder: `train` refuses one argen did not write
        quantizer.save_pretrained(quantizer_dir, extra={"_summary": quantizer.summary()})
        quantizer_hash = pretrained_hash(quantizer_dir)
        write_token_shard(quantizer, train_set, codes_dir / "train", quantizer_hash=quantizer_hash, split="train")
        if val_set is not None:
            write_token_shard(quantizer, val_set, codes_dir / "val", quantizer_hash=quantizer_hash, split="val")
    state.wait_for_everyone()
    quantizer_hash = pretrained_hash(quantizer_dir)
    round_trip = quantizer.round_trip(val_set.image_embeds if val_set is not None else train_set.image_embeds)
    fitted = {**quantizer.summary(), "variance_threshold": settings.variance,
              "round_trip_split": "val" if val_set is not None else "train",
              "round_trip_pca_cosine": round(round_trip.pca_cosine, 6), "round_trip_cosine": round(round_trip.cosine, 6),
              "round_trip_pca_relative_mse": round(round_trip.pca_relative_mse, 6),
              "round_trip_relative_mse": round(round_trip.relative_mse, 6)}
    state.print(f"AR prior quantizer: D={fitted['dim']}, {fitted['n_components']} PCA components hold "
                f"{fitted['explained_variance']:.4f} of the variance (threshold {settings.variance}), "
                f"{fitted['num_buckets']} buckets, text tokens {'on' if settings.text_tokens else 'off'}"
                f"{' (interleaved)' if settings.interleave else ''}, dot token "
                f"{'on' if settings.dot_token else 'off'}; round-trip "
                f"cosine on {fitted['round_trip_split']}: {round_trip.cosine:.4f} (PCA alone {round_trip.pca_cosine:.4f}), "
                f"error/variance {round_trip.relative_mse:.4f} (PCA alone {round_trip.pca_relative_mse:.4f})")

    gpt_experiment = GPTExperiment(
        model=experiment.model,
        data=GPTDataConfig(train=[str(codes_dir / "train")], val=[str(codes_dir / "val")] if val_set is not None else [],
                           text_tokenizer=str(tok_file), text_len=text_len, pad_token=text.pad_token),
        train=experiment.train, optimizer=experiment.optimizer, eval=experiment.eval,
        cond_drop_prob=experiment.cond_drop_prob,
    )
    result = train_gpt(gpt_experiment, resume=resume, overwrite=overwrite)

    if not state.is_main_process:
        return result
    final = result.artifacts_dir
    atomic_write_dir(final / QUANTIZER_DIR, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in quantizer_dir.iterdir()])
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "clip_sha256": clip_sha256, "clip_path": str(Path(data.clip).resolve()),
        "text_len": text_len, "train_shards": train_set.paths, "num_train_items": len(train_set.captions),
        "parts": {"gpt": {"path": GPT_DIR, "class": PART_CLASSES["gpt"], "hash": pretrained_hash(final / GPT_DIR)},
                  "quantizer": {"path": QUANTIZER_DIR, "class": PART_CLASSES["quantizer"], "hash": quantizer_hash,
                                **quantizer.summary()},
                  "text_tokenizer": {"path": TOKENIZER_FILE, "class": PART_CLASSES["text_tokenizer"], "hash": text.sha256}},
    }
    atomic_write_bytes(final / AR_PRIOR_FILE, json.dumps(manifest, indent=2).encode())
    train_seconds = round(time.perf_counter() - start, 1)
    metrics_file = out_dir / "metrics.json"
    report = json.loads(metrics_file.read_text())
    report.update(ar_prior=str(final), quantizer=fitted, wall_seconds=train_seconds)
    ev = experiment.prior_eval
    if val_set is not None and ev.max_items != 0:
        config = ARPriorSamplingConfig(tokens=SamplingConfig(cfg_scale=ev.cfg_scale))
        scores = score_ar_prior(ARPrior.load(final), val_set, config=config, seed=ev.seed, batch_size=ev.batch_size,
                                max_items=ev.max_items)
        report["prior_eval"] = {"sampling": to_dict(config), **scores.summary("ar_prior/"),
                                **{k: v for name, m in trivial_priors(train_set, val_set, max_items=ev.max_items).items()
                                   for k, v in m.summary(f"{name}/").items()}}
        print("AR prior on val: " + ", ".join(f"{k} {v:.4g}" for k, v in report["prior_eval"].items()
                                              if k.endswith(("cosine", "top1", "top5"))))
    atomic_write_bytes(metrics_file, json.dumps(report, indent=2).encode())
    return result
