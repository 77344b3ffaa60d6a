"""GPT training on pre-extracted code shards (captions as a BPE prefix, CFG caption dropout) as a Task for the shared loop."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.data.codes import CODES_NAME, CaptionIds, CodeShardDataset, caption_ids, map_random, open_caption_ids
from argen.layout import LayoutMismatchError, SequenceLayout
from argen.model.gpt import GPT, GPTConfig
from argen.model.pca import fit_pca
from argen.pipeline import GPT_DIR, build_pipeline
from argen.saved import TRAINED_WITH_KEY
from argen.text import TextTokenizer
from argen.train.loop import (
    OptimizerConfig,
    OptimizerSpec,
    StepOutput,
    TrainConfig,
    TrainResult,
    seeded,
    train,
)
from tokenizers_img.config import to_dict
from tokenizers_img.serialization import pretrained_hash
from tokenizers_img.vq_model import VQModel

# set by the sequence layout and the VQ tokenizer (`vq_code_factors`), never typed in YAML
DERIVED_GPT_FIELDS = ("vocab_size", "prefix_len", "image_grid", "code_factors", "pad_id")


@dataclass
class GPTArchitecture:
    """The `model` section: GPTConfig without the sizes the sequence layout derives (DERIVED_GPT_FIELDS). Fields,
    defaults and meanings are GPTConfig's; a test keeps the two in step."""

    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None
    ffn_hidden: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_backend: Literal["auto", "sdpa", "xformers", "math"] = "auto"
    grad_checkpointing: bool = False
    init_std: float = 0.02
    abs_pos_emb: bool = False
    code_features: int = 0
    mask_padding: bool = False

    def __post_init__(self) -> None:
        """Validate with GPTConfig's own checks (placeholder derived sizes), so a bad YAML fails at load time."""
        GPTConfig(vocab_size=1, prefix_len=1, image_grid=(1, 1), pad_id=0, **architecture_kwargs(self))


def architecture_kwargs(arch: Any) -> dict[str, Any]:
    return {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)}


def gpt_config_for(arch: Any, layout: SequenceLayout, *, code_factors: tuple[int, int] | None = None) -> GPTConfig:
    """The full GPTConfig: the architecture plus the layout's vocab_size, prefix_len, image_grid and pad_id, and the
    VQ tokenizer's code_factors."""
    return GPTConfig(**layout.gpt_sizes(), **architecture_kwargs(arch), code_factors=code_factors, pad_id=layout.pad_id)


def vq_code_factors(vq_dir: str | None) -> tuple[int, int] | None:
    """(structure codes, colour codes) when the VQ tokenizer at `vq_dir` is a product one (`VQConfig.colour_codes`):
    its GPT then gets `GPTConfig.code_factors`. None for a plain tokenizer or none given."""
    if vq_dir is None:
        return None
    config = VQModel.config_from_pretrained(vq_dir)
    return (config.codebook_size, config.colour_codes) if config.colour_codes else None


@dataclass
class GPTDataConfig:
    """Where the training data lives.

    train / val: code-shard directories written by `argen tokenize` (e.g. OUT/train); several are concatenated.
    text_tokenizer: a tokenizer.json or a directory holding one. text_len: caption tokens in the prefix.
    vq_tokenizer: the VQ tokenizer directory that made the codes (optional): the shards' tokenizer hash is checked
        against it, and the run's final/ directory becomes a complete pipeline (`argen sample --pipeline`).
    pad_token: the text tokenizer's pad token (None: found by name, e.g. <pad> or [PAD]).
    """

    train: list[str]
    text_tokenizer: str
    val: list[str] = field(default_factory=list)
    text_len: int = 32
    vq_tokenizer: str | None = None
    pad_token: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.val, str):
            self.val = [self.val]
        if not self.train:
            raise ValueError("data.train must name at least one code-shard directory (written by `argen tokenize`).")
        if self.text_len < 1:
            raise ValueError(f"data.text_len must be >= 1, got {self.text_len}.")


@dataclass
class GPTEvalConfig:
    """Validation loss over the val shards: `max_items` None means the whole val set. `uncond` also measures the
    loss with every caption dropped; the gap to the conditional loss is what the text tells the model."""

    batch_size: int = 64
    max_items: int | None = None
    uncond: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}.")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"eval.max_items must be >= 1 or null, got {self.max_items}.")


@dataclass
class GPTExperiment:
    """One GPT run. cond_drop_prob: share of training captions replaced by the empty caption (for CFG).
    text_loss_weight: weight of text-token targets relative to image tokens (DALL-E style; 0 = image tokens only).
    input_noise: share of the input image codes replaced by random codes in training (the targets stay clean), so
    the GPT cannot lean on the codes before it alone and must read the caption."""

    model: GPTArchitecture
    data: GPTDataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: GPTEvalConfig = field(default_factory=GPTEvalConfig)
    cond_drop_prob: float = 0.1
    text_loss_weight: float = 0.0
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}.")
        if self.text_loss_weight < 0:
            raise ValueError(f"text_loss_weight must be >= 0, got {self.text_loss_weight}.")
        if not 0.0 <= self.input_noise < 1.0:
            raise ValueError(f"input_noise must be in [0, 1), got {self.input_noise}.")


class CaptionedCodes(torch.utils.data.Dataset):
    """Code shards with their captions as token ids, both memory-mapped and shared by the processes of a run, so
    start-up time and memory do not grow with the number of items. The ids are written into each shard once per
    text tokenizer and text_len (`argen.data.codes.caption_ids`), by the first run that needs them or by
    `argen tokenize --text-tokenizer`.

    Item i: {"codes": int64 (h*w,) in [0, num_codes), "text_ids": int64 (text_len,)}. `__getitems__` reads a whole
    batch with one fancy index per shard, and checks that its codes lie in [0, num_codes).
    """

    def __init__(self, paths: list[str] | tuple[str, ...], *, text_tokenizer: TextTokenizer, text_len: int,
                 expect_tokenizer_hash: str | None = None) -> None:
        if not paths:
            raise ValueError("no code-shard directories given.")
        shards = [CodeShardDataset(p, expect_tokenizer_hash=expect_tokenizer_hash) for p in paths]
        first = shards[0].meta
        for sh in shards[1:]:
            for key in ("grid", "num_codes", "tokenizer_hash"):
                if getattr(sh.meta, key) != getattr(first, key):
                    raise LayoutMismatchError(f"code shards disagree on {key}: {shards[0].path} has {getattr(first, key)!r}, "
                                              f"{sh.path} has {getattr(sh.meta, key)!r}; train on shards of one VQ tokenizer.")
        self.paths = [str(sh.path) for sh in shards]
        self.meta = first
        self.text_len = text_len
        self._text_tokenizer = text_tokenizer
        infos = [caption_ids(p, text_tokenizer, text_len=text_len).info for p in self.paths]
        self._arrays: tuple[list[np.ndarray], list[CaptionIds]] | None = None
        self.starts = np.cumsum([0] + [len(sh) for sh in shards])
        self.num_empty = sum(i["num_empty"] for i in infos)
        truncated, longest = sum(i["num_truncated"] for i in infos), max(i["longest"] for i in infos)
        if truncated:
            warnings.warn(f"{truncated} of {len(self)} captions are longer than text_len={text_len} tokens (longest "
                          f"{longest}) and were truncated to their first {text_len} tokens. A longer text_len needs a "
                          "GPT trained with it.", UserWarning, stacklevel=2)
        self._seen = sorted({i for info in infos for a, b in info["ids_seen"] for i in range(a, b + 1)})

    def _memmaps(self) -> tuple[list[np.ndarray], list[CaptionIds]]:
        """(codes, caption ids) of every shard, mapped on first use in each process (a DataLoader worker maps its own)."""
        if self._arrays is None:
            codes = [map_random(Path(p) / CODES_NAME) for p in self.paths]
            ids = [open_caption_ids(p, self._text_tokenizer, text_len=self.text_len) for p in self.paths]
            self._arrays = codes, ids
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # workers map the files themselves instead of copying them

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items: {indices}")
        codes, ids = self._memmaps()
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out_codes = np.empty((len(index), codes[0].shape[1]), dtype=np.int64)
        out_ids = np.empty((len(index), self.text_len), dtype=np.int64)
        for k in np.unique(shard):
            sel = shard == k
            rows = index[sel] - self.starts[k]
            out_codes[sel], out_ids[sel] = codes[k][rows], ids[k].rows(rows)
            _check_code_range(out_codes[sel], num_codes=self.meta.num_codes, path=self.paths[k], rows=rows)
        return {"codes": torch.from_numpy(out_codes), "text_ids": torch.from_numpy(out_ids)}

    def seen_text_ids(self) -> list[int]:
        """Sorted distinct text ids that occur in the (truncated, padded) training captions."""
        return self._seen


def _check_code_range(codes: np.ndarray, *, num_codes: int, path: str, rows: np.ndarray) -> None:
    """The codes of a batch lie in [0, num_codes) (a bad id would crash the embedding with a less helpful error)."""
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        bad = rows[((codes < 0) | (codes >= num_codes)).any(1)]
        raise LayoutMismatchError(f"code shard {path} has codes in [{codes.min()}, {codes.max()}] (rows "
                                  f"{bad[:8].tolist()}), outside [0, {num_codes}) of its meta.json: the shard is damaged; "
                                  "rewrite it.")


def collate_batch(batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """DataLoader collate for CaptionedCodes: its `__getitems__` already returns the stacked batch."""
    if isinstance(batch, dict):
        return batch
    return {k: torch.stack([item[k] for item in batch]) for k in batch[0]}


def id_ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ints as inclusive [first, last] runs: compact in JSON whether few or almost all ids occur."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


@dataclass
class SequenceLoss:
    """Weighted next-token loss of a batch and its parts (image-token loss and accuracy, text-token loss)."""

    loss: Tensor          # sum(w * ce) / sum(w): what is trained
    image_loss: Tensor    # mean cross-entropy (nats) over image targets
    image_acc: Tensor | None  # argmax accuracy over image targets (asked for: it needs every code's logit)
    text_loss: Tensor     # mean cross-entropy over non-PAD text targets (0 when there are none)


def sequence_loss(model: nn.Module, text_ids: Tensor, codes: Tensor, *, layout: SequenceLayout,
                  input_codes: Tensor | None = None, text_loss_weight: float = 0.0, accuracy: bool = False,
                  drop_padding: bool = False) -> SequenceLoss:
    """Cross-entropy of the GPT on [text | BOI | codes]: image targets weigh 1, text targets `text_loss_weight`,
    PAD targets 0. text_ids (B, text_len), codes (B, h*w) int64. The model gives the targets' log-probabilities
    (`GPT.forward(targets=...)`), none for the text positions without a text loss (text_loss is then 0).
    `accuracy` adds the argmax accuracy over image targets; the model then computes every logit (evaluation).
    `drop_padding` (a model with `GPTConfig.mask_padding`, no text loss): the text columns that hold only pads in this
    batch are left out of the forward, which gives the same loss with less compute. `input_codes` (B, h*w): the codes
    the inputs read, where they differ from the targets' `codes` (input noise in training)."""
    seq = layout.build(text_ids, codes, check=False)  # (B, seq_len); ids are checked once, at load time
    inputs, targets = layout.split(seq)
    if input_codes is not None:
        inputs = layout.split(layout.build(text_ids, input_codes, check=False)).inputs
    weights = layout.loss_weights(targets, text_loss_weight=text_loss_weight)
    first = layout.prefix_len - 1  # the first input position whose target is an image token
    positions = None
    if drop_padding and text_loss_weight == 0:
        used = (text_ids != layout.pad_id).any(dim=0).nonzero()  # text columns with a caption token in some row
        positions = torch.cat([torch.arange(int(used[-1]) + 1 if len(used) else 0, device=seq.device),
                               torch.arange(first, inputs.shape[1], device=seq.device)])
        first -= inputs.shape[1] - len(positions)
        inputs, targets, weights = inputs[:, positions], targets[:, positions], weights[:, positions]
    start = 0 if text_loss_weight > 0 else first
    weights = weights[:, start:]
    targets = targets[:, start:]
    acc = None
    if accuracy:
        logits = model(inputs, logits_from=start, positions=positions).float()  # (B, T - start, V)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        with torch.no_grad():
            acc = (logits[:, first - start:].argmax(-1) == targets[:, first - start:]).float().mean()
    else:
        ce = -model(inputs, logits_from=start, targets=targets, positions=positions)  # (B, T - start)
    image_ce = ce[:, first - start:]
    with torch.no_grad():
        text_mask = targets[:, :first - start] != layout.pad_id
        text_loss = (ce[:, :first - start] * text_mask).sum() / text_mask.sum().clamp(min=1)
    return SequenceLoss(loss=(ce * weights).sum() / weights.sum(), image_loss=image_ce.mean(), image_acc=acc,
                        text_loss=text_loss)


def code_features(vq: VQModel, dims: int) -> Tensor:
    """(num_codes, dims): what each code of `vq` looks like (`VQModel.code_appearance`, its f x f pixels), centred
    over the codebook, reduced to its `dims` leading principal components and scaled to unit mean square, so the
    features of `GPTConfig.code_features` start at the scale of the other inputs whatever the VQ."""
    patches = vq.code_appearance().double()  # (num_codes, C f f)
    if not 0 < dims <= min(patches.shape):
        raise ValueError(f"model.code_features={dims} must lie in [1, {min(patches.shape)}]: the VQ tokenizer's codes "
                         f"are {patches.shape[1]} pixel values each and there are {patches.shape[0]} of them.")
    pca = fit_pca(patches, n_components=dims)
    feats = (patches - pca.mean) @ pca.components.T
    return (feats / feats.pow(2).sum(1).mean().sqrt().clamp(min=1e-12)).float()


class GPTTask:
    """Module {"gpt"}, optimizer "gpt". Batches are {"codes", "text_ids"} from CaptionedCodes."""

    def __init__(self, experiment: GPTExperiment, *, layout: SequenceLayout, text_tokenizer: TextTokenizer,
                 trained_with: dict[str, Any], val_dataset: CaptionedCodes | None = None,
                 vq_dir: str | None = None, num_empty: int = 0) -> None:
        self.experiment = experiment
        self.num_empty = num_empty
        self.layout = layout
        self.text_tokenizer = text_tokenizer
        self.trained_with = trained_with
        self.val_dataset = val_dataset
        self.vq_dir = vq_dir
        self.gpt = GPT(gpt_config_for(experiment.model, layout, code_factors=vq_code_factors(vq_dir)))
        layout.check(self.gpt.config)
        if self.gpt.config.code_features:
            if vq_dir is None:
                raise ValueError("model.code_features needs data.vq_tokenizer: the features are what its codes look like.")
            with torch.no_grad():
                self.gpt.code_feat[layout.image_offset:] = code_features(VQModel.from_pretrained(vq_dir),
                                                                         self.gpt.config.code_features)

    def modules(self) -> dict[str, nn.Module]:
        return {"gpt": self.gpt}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec(name="gpt", modules=["gpt"], config=self.experiment.optimizer)]

    def ema_modules(self) -> list[str]:
        return ["gpt"]

    def training_step(self, batch: dict[str, Tensor], *, modules: dict[str, nn.Module], step: int) -> StepOutput:
        text_ids, codes = batch["text_ids"], batch["codes"]
        p = self.experiment.cond_drop_prob
        logs: dict[str, Any] = {}
        if p > 0:
            # CFG: the empty caption (all PAD) stands for "no condition". Drawn from the global CPU RNG, which the
            # loop checkpoints, so a resumed run drops the same captions.
            drop = (torch.rand(text_ids.shape[0]) < p).to(text_ids.device)
            text_ids = torch.where(drop[:, None], torch.full_like(text_ids, self.layout.pad_id), text_ids)
            logs["cond_dropped"] = drop.float().mean()
        input_codes = None
        if self.experiment.input_noise > 0:  # from the global CPU RNG too, so a resumed run draws the same noise
            noisy = (torch.rand(codes.shape) < self.experiment.input_noise).to(codes.device)
            random_codes = torch.randint(self.layout.num_codes, codes.shape).to(codes.device)
            input_codes = torch.where(noisy, random_codes, codes)
        out = sequence_loss(modules["gpt"], text_ids, codes, layout=self.layout, input_codes=input_codes,
                            text_loss_weight=self.experiment.text_loss_weight, drop_padding=self.gpt.config.mask_padding)
        logs["image_loss"] = out.image_loss.detach()
        if self.experiment.text_loss_weight > 0:
            logs["text_loss"] = out.text_loss
        return StepOutput(losses={"gpt": out.loss}, logs=logs)

    def evaluate(self, *, modules: dict[str, nn.Module], accelerator: Any, step: int) -> dict[str, float]:
        if self.val_dataset is None:
            return {}
        ev = self.experiment.eval
        n = len(self.val_dataset) if ev.max_items is None else min(ev.max_items, len(self.val_dataset))
        device = accelerator.device
        mine = list(range(accelerator.process_index, n, accelerator.num_processes))  # every item once, over processes
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # cond loss, cond correct, uncond loss, tokens, items
        gpt = modules["gpt"]
        drop = self.gpt.config.mask_padding
        for start in range(0, len(mine), ev.batch_size):
            batch = self.val_dataset.__getitems__(mine[start:start + ev.batch_size])
            text_ids, codes = batch["text_ids"].to(device), batch["codes"].to(device)
            tokens = codes.numel()
            with accelerator.autocast():
                cond = sequence_loss(gpt, text_ids, codes, layout=self.layout, accuracy=True, drop_padding=drop)
                sums[0] += cond.image_loss.double() * tokens
                sums[1] += cond.image_acc.double() * tokens
                if ev.uncond:
                    empty = torch.full_like(text_ids, self.layout.pad_id)
                    sums[2] += sequence_loss(gpt, empty, codes, layout=self.layout,
                                             drop_padding=drop).image_loss.double() * tokens
            sums[3] += tokens
            sums[4] += len(codes)
        sums = accelerator.reduce(sums, reduction="sum")
        tokens = float(sums[3].clamp(min=1))
        metrics = {"val/loss": float(sums[0]) / tokens, "val/acc": float(sums[1]) / tokens, "val/num_items": float(sums[4])}
        if ev.uncond:
            metrics["val/loss_uncond"] = float(sums[2]) / tokens
        return metrics

    def describe(self) -> str:
        empty = f", {self.num_empty} of them with an empty caption (unconditional)" if self.num_empty else ""
        return (f"GPT: {self.gpt.num_params() / 1e6:.2f}M parameters; layout {json.dumps(self.layout.summary())}; "
                f"{self.trained_with.get('num_train_items', '?')} training items{empty}, "
                f"{len(self.val_dataset) if self.val_dataset is not None else 0} val items")

    def report(self, result: TrainResult) -> dict[str, Any]:
        return {"gpt": str(result.artifacts_dir / GPT_DIR),
                "pipeline": str(result.artifacts_dir) if self.vq_dir is not None else None,
                "num_params": self.gpt.num_params(), "layout": self.layout.summary()}

    def save_artifacts(self, *, modules: dict[str, nn.Module], out_dir: Path) -> None:
        out_dir = Path(out_dir)
        modules["gpt"].save_pretrained(out_dir / GPT_DIR, extra={TRAINED_WITH_KEY: self.trained_with})
        tok_file = self.text_tokenizer.save(out_dir)
        if self.vq_dir is not None:  # final/ becomes a complete pipeline directory
            build_pipeline(out_dir, vq_dir=self.vq_dir, tokenizer=tok_file, gpt_dir=out_dir / GPT_DIR, overwrite=True)


def load_gpt_data(experiment: GPTExperiment) -> tuple[TextTokenizer, CaptionedCodes, CaptionedCodes | None, str | None]:
    """The text tokenizer, train and val code sets of an experiment, with the VQ hash checked when a VQ is named."""
    data = experiment.data
    text = TextTokenizer.load(data.text_tokenizer, pad_token=data.pad_token)
    vq_hash = pretrained_hash(data.vq_tokenizer) if data.vq_tokenizer is not None else None
    train_set = CaptionedCodes(data.train, text_tokenizer=text, text_len=data.text_len, expect_tokenizer_hash=vq_hash)
    val_set = None
    if data.val:
        val_set = CaptionedCodes(data.val, text_tokenizer=text, text_len=data.text_len,
                                 expect_tokenizer_hash=train_set.meta.tokenizer_hash)
    return text, train_set, val_set, vq_hash


def train_gpt(experiment: GPTExperiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the experiment's GPT on its code shards through the shared loop.

    Writes `out_dir/final/gpt` (the GPT; its config.json records the text tokenizer's sha256, the VQ tokenizer's
    hash and the text ids seen in training), `out_dir/final/tokenizer.json`, and, when `data.vq_tokenizer` is set,
    makes `out_dir/final` a pipeline directory. Metrics land in `out_dir/metrics.json`.
    """
    text, train_set, val_set, _ = load_gpt_data(experiment)
    meta = train_set.meta
    layout = SequenceLayout.from_parts(text, text_len=experiment.data.text_len, num_codes=meta.num_codes,
                                       image_grid=meta.grid)
    trained_with = {
        "text_tokenizer_sha256": text.sha256, "pad_token": text.pad_token, "vq_hash": meta.tokenizer_hash,
        "text_len": experiment.data.text_len, "code_shards": train_set.paths, "num_train_items": len(train_set),
        "text_ids_seen": id_ranges(train_set.seen_text_ids()),
    }
    task = seeded(experiment.train.seed, lambda: GPTTask(
        experiment, layout=layout, text_tokenizer=text, trained_with=trained_with, val_dataset=val_set,
        vq_dir=experiment.data.vq_tokenizer, num_empty=train_set.num_empty))
    return train(task, train_set, experiment.train, resume=resume, overwrite=overwrite, task_config=to_dict(experiment),
                 collate_fn=collate_batch)
