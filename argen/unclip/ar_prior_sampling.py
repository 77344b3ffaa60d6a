"""A trained AR prior directory (GPT + quantizer + caption BPE) loaded and sampled: captions -> unit CLIP image embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from argen.layout import SequenceLayout
from argen.model.gpt import GPT
from argen.pipeline import GPT_DIR, gpt_training_record
from argen.sample import Generators, SamplingConfig, sample_image_tokens
from argen.saved import SavedDirError, parts_from_v1, read_manifest
from argen.text import TOKENIZER_FILE, TextTokenizer
from argen.unclip.ar_prior import EmbeddingQuantizer
from tokenizers_img.serialization import pretrained_hash

AR_PRIOR_FILE = "ar_prior.json"  # written last into a run's final/ directory: what makes it an AR prior
QUANTIZER_DIR = "quantizer"
FORMAT = "argen-ar-prior"
FORMAT_VERSION = 2  # v2: the saved-directory manifest (argen.saved); v1 had no version, no classes, "sha256" for the BPE
PART_CLASSES = {"gpt": "argen.model.gpt.GPT", "quantizer": "argen.unclip.ar_prior.EmbeddingQuantizer",
                "text_tokenizer": "argen.text.TextTokenizer"}


class ARPriorError(SavedDirError):
    """An AR prior directory is incomplete, or its GPT was trained with another quantizer or caption tokenizer."""


@dataclass(frozen=True)
class ARPriorSamplingConfig:
    """How to sample an AR prior.

    tokens: temperature, top-k/top-p and CFG (batch [cond; uncond], the empty caption as uncond) for every token.
    dot_quantile: for a prior trained with the dot-product token, that token is drawn from the GPT's own
        distribution restricted to the buckets wholly at or above this quantile of the training dot products:
        0.5 is DALL-E 2's "top half" (its footnote swept 0.5/0.7/0.85/0.95); None lets the GPT draw it freely.
    dot_value: fix the dot-product token to the bucket of this cosine instead (dot_quantile is then unused).
    Both are ignored by a prior trained without the dot-product token.
    """

    tokens: SamplingConfig = field(default_factory=SamplingConfig)
    dot_quantile: float | None = 0.5
    dot_value: float | None = None

    def __post_init__(self) -> None:
        if self.dot_quantile is not None and not 0.0 <= self.dot_quantile < 1.0:
            raise ValueError(f"dot_quantile must be in [0, 1) or None, got {self.dot_quantile}.")
        if self.dot_value is not None and not (math.isfinite(self.dot_value) and -1.0 <= self.dot_value <= 1.0):
            raise ValueError(f"dot_value is a cosine and must be in [-1, 1], got {self.dot_value}.")


@dataclass
class ARPrior:
    """What sampling needs, checked to belong together: the GPT, the quantizer its tokens come from, the caption BPE
    and the sequence layout [caption | BOI | tokens + offset]; clip_sha256 names the CLIP whose embeddings it predicts."""

    gpt: GPT
    quantizer: EmbeddingQuantizer
    text_tokenizer: TextTokenizer
    layout: SequenceLayout
    clip_sha256: str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> ARPrior:
        """Load a directory written by `train_ar_prior` (its `final/`): ar_prior.json, gpt/, quantizer/, tokenizer.json."""
        path = Path(path)
        manifest_file = path / AR_PRIOR_FILE
        if not manifest_file.is_file():
            raise ARPriorError(f"{path} is not an AR prior directory ({AR_PRIOR_FILE} missing); train one with "
                               "`argen train prior` (argen.tasks.ar_prior.train_ar_prior) and use its final/ directory.")
        manifest, _ = read_manifest(
            manifest_file, format=FORMAT, version=FORMAT_VERSION, classes=PART_CLASSES, required=tuple(PART_CLASSES),
            what="AR prior", error=ARPriorError,
            upgrade=lambda m: parts_from_v1(m, classes=PART_CLASSES, version=FORMAT_VERSION))
        quantizer = EmbeddingQuantizer.from_pretrained(path / QUANTIZER_DIR, device=device)
        record = gpt_training_record(path / GPT_DIR)
        text = TextTokenizer.load(path / TOKENIZER_FILE, pad_token=record.get("pad_token"))
        quantizer_hash = pretrained_hash(path / QUANTIZER_DIR)
        problems = []
        if record["vq_hash"] != quantizer_hash:
            problems.append(f"the GPT was trained on tokens of quantizer {record['vq_hash'][:12]}, but {QUANTIZER_DIR}/ "
                            f"is {quantizer_hash[:12]}")
        if record["text_tokenizer_sha256"] != text.sha256:
            problems.append(f"the GPT was trained with caption tokenizer {record['text_tokenizer_sha256'][:12]}, but "
                            f"{TOKENIZER_FILE} is {text.sha256[:12]}")
        if problems:
            raise ARPriorError(f"{path}: " + "; ".join(problems) + ". Use the final/ directory of one training run.")
        gpt = GPT.from_pretrained(path / GPT_DIR, device=device)
        layout = SequenceLayout.from_parts(text, text_len=record["text_len"], num_codes=quantizer.num_buckets,
                                           image_grid=(1, quantizer.num_tokens))
        layout.check(gpt.config, names=(f"GPT {str(path / GPT_DIR)!r}", f"quantizer + tokenizer in {str(path)!r}"))
        return cls(gpt=gpt, quantizer=quantizer, text_tokenizer=text, layout=layout,
                   clip_sha256=manifest["clip_sha256"], manifest=manifest)


def allowed_tokens(quantizer: EmbeddingQuantizer, config: ARPriorSamplingConfig, *,
                   text_embeds: Tensor | None = None) -> Tensor | None:
    """The sampler's bool mask over (position, bucket): the text-embedding tokens forced to the captions' own (then
    (B, num_tokens, K) for the B rows of `text_embeds`), the dot-product token limited to its top buckets (or one
    fixed bucket), the image tokens free. None when nothing is restricted."""
    restrict_dot = quantizer.config.dot_token and (config.dot_quantile is not None or config.dot_value is not None)
    if not restrict_dot and not quantizer.config.text_tokens:
        return None
    allowed = torch.ones(quantizer.num_tokens, quantizer.num_buckets, dtype=torch.bool)
    if restrict_dot:
        dot = quantizer.dot_index
        allowed[dot] = False
        if config.dot_value is not None:
            bucket = torch.searchsorted(quantizer.dot_bounds[1:-1].cpu(), torch.tensor([float(config.dot_value)]), right=True)
            allowed[dot, int(bucket)] = True
        else:
            allowed[dot, quantizer.upper_dot_buckets(config.dot_quantile):] = True
    if not quantizer.config.text_tokens:
        return allowed
    if text_embeds is None:
        raise ARPriorError("this AR prior reads the captions' CLIP text embeddings (text_tokens): pass text_embeds, "
                           "e.g. ClipEncoder.encode_text(captions).embeds of the CLIP it was trained with.")
    codes = quantizer.text_codes(text_embeds.to(quantizer.mean.device)).cpu()  # (B, C)
    allowed = allowed.repeat(len(codes), 1, 1)  # (B, num_tokens, K)
    allowed[:, quantizer.text_positions] = F.one_hot(codes, quantizer.num_buckets).bool()
    return allowed


def sample_ar_prior(prior: ARPrior, captions: Sequence[str], *, text_embeds: Tensor | None = None,
                    config: ARPriorSamplingConfig = ARPriorSamplingConfig(), generator: Generators = None) -> Tensor:
    """Captions (B strings) -> predicted CLIP image embeddings (B, D) float32, unit norm.

    The GPT samples the caption's token row with `sample_image_tokens`: the text-embedding tokens given (a prior
    trained with them needs `text_embeds` (B, D), the captions' CLIP text embeddings), the dot-product bucket per
    `config`, then the image PCA buckets by decreasing variance; the quantizer dequantises them and inverts the PCA.
    "" is the unconditional caption. generator: one torch.Generator, one per caption (a caption's sample then does
    not depend on the batch), or None for the global RNG.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not captions:
        raise ValueError("sample_ar_prior needs at least one caption.")
    if text_embeds is not None and len(text_embeds) != len(captions):
        raise ValueError(f"got {len(captions)} captions but {len(text_embeds)} text embeddings; they pair row by row.")
    layout, device = prior.layout, next(prior.gpt.parameters()).device
    prefix = layout.prefix(prior.text_tokenizer.encode(list(captions), text_len=layout.text_len)).to(device)
    codes = sample_image_tokens(prior.gpt, prefix, image_offset=layout.image_offset, num_codes=layout.num_codes,
                                uncond_prefix=layout.uncond_prefix(device=device), config=config.tokens,
                                generator=generator,
                                allowed_codes=allowed_tokens(prior.quantizer, config, text_embeds=text_embeds))
    return prior.quantizer.decode(codes)  # (B, D)
