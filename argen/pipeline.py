"""A pipeline directory (VQ tokenizer + text tokenizer + GPT + pipeline.json with their hashes): built, verified, loaded, sampled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import argen
from argen.data.transforms import tensor_to_pil
from argen.host import native_bf16
from argen.layout import SequenceLayout
from argen.model import GPT, CompiledDecoding, bf16_blocks, onednn_available, pack_for_cpu
from argen.sample import PRECISIONS, Precision, SamplingConfig, decode_image_tokens
from argen.saved import SavedDirError, parts_from_v1, read_manifest, trained_with
from argen.text import TOKENIZER_FILE, TextTokenizer, tokenizer_file_hash
from tokenizers_img.config import to_dict
from tokenizers_img.serialization import (
    atomic_write_bytes,
    atomic_write_dir,
    claim_output_dir,
    path_inside,
    pretrained_hash,
    read_json_object,
)
from tokenizers_img.vq_model import VQModel

PIPELINE_FILE = "pipeline.json"
VQ_DIR = "vq"
GPT_DIR = "gpt"  # the GPT's place in a pipeline directory and in a GPT run's final/ directory
FORMAT = "argen-pipeline"
FORMAT_VERSION = 2  # v2: every part records its class and its content_hash under "hash" (v1 is read through saved.parts_from_v1)
PART_CLASSES = {"vq": "tokenizers_img.vq_model.VQModel", "text_tokenizer": "argen.text.TextTokenizer",
                "gpt": "argen.model.gpt.GPT"}
SAMPLING_KEY = "sampling"  # pipeline.json's recommended sampler settings (argen demo writes what its sweep chose)
# What a pipeline samples with when its pipeline.json recommends nothing: guidance 2, plain temperature.
FALLBACK_SAMPLING = SamplingConfig(cfg_scale=2.0)


class PipelineError(SavedDirError):
    """A pipeline directory is missing a part, a part was swapped, or the GPT was not trained with these tokenizers."""


def _short(h: str | None) -> str:
    return h[:12] if h else "<none>"


def gpt_training_record(gpt_dir: str | Path) -> dict[str, Any]:
    """What the GPT in `gpt_dir` was trained with (text tokenizer sha256, VQ hash, text_len, ...), from its config.json."""
    return trained_with(gpt_dir, needs=("vq_hash", "text_tokenizer_sha256"), made_by="`argen train gpt`",
                        error=PipelineError)


def check_pairing(*, gpt_dir: Path, record: dict[str, Any], vq_dir: Path, vq_hash: str, tokenizer: Path,
                  tokenizer_sha256: str) -> None:
    """Raise PipelineError naming both sides (paths and hashes) if the GPT was trained with another VQ or text tokenizer."""
    problems = []
    if record["vq_hash"] != vq_hash:
        problems.append(f"the GPT was trained on codes of VQ tokenizer {_short(record['vq_hash'])} (code shards "
                        f"{record.get('code_shards', '?')}), but VQ tokenizer {str(vq_dir)!r} is {_short(vq_hash)}")
    if record["text_tokenizer_sha256"] != tokenizer_sha256:
        problems.append(f"the GPT was trained with text tokenizer {_short(record['text_tokenizer_sha256'])}, but text "
                        f"tokenizer {str(tokenizer)!r} is {_short(tokenizer_sha256)}")
    if problems:
        raise PipelineError(f"GPT {str(gpt_dir)!r} does not belong with these tokenizers: " + "; ".join(problems) +
                            ". Pair the GPT with the tokenizers it was trained with, or retrain it on codes and "
                            "captions made by these.")


def part_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """The hash pipeline.json records for each part, by part name ("vq", "gpt", "text_tokenizer")."""
    return {name: part["hash"] for name, part in manifest["parts"].items()}


def _layout(text: TextTokenizer, vq_config: Any, gpt_config: Any) -> SequenceLayout:
    return SequenceLayout.from_vq(text, vq_config, text_len=gpt_config.prefix_len - 1)


def build_pipeline(out: str | Path, *, vq_dir: str | Path, tokenizer: str | Path, gpt_dir: str | Path,
                   overwrite: bool = False, sampling: SamplingConfig | None = None) -> Path:
    """Put a VQ tokenizer, a text tokenizer (tokenizer.json or its directory) and a GPT into one directory with a
    pipeline.json holding each part's hash and, when given, the recommended `sampling`; returns `out`.

    Refuses (PipelineError, naming both sides) a GPT trained with another VQ or text tokenizer, and a GPT whose
    sizes do not fit them. Parts already in place (`out/gpt` given as `gpt_dir`) are kept, others copied byte for
    byte; pipeline.json is written last, so a crash never leaves a directory that loads as a pipeline.
    """
    out, vq_dir, gpt_dir = Path(out), Path(vq_dir), Path(gpt_dir)
    tok_file = Path(tokenizer) if Path(tokenizer).is_file() else Path(tokenizer) / TOKENIZER_FILE
    if (out / PIPELINE_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out / PIPELINE_FILE} already exists; pass overwrite=True or choose another directory.")
    record = gpt_training_record(gpt_dir)
    vq_hash, gpt_hash = pretrained_hash(vq_dir), pretrained_hash(gpt_dir)
    text = TextTokenizer.load(tok_file, pad_token=record.get("pad_token"))
    check_pairing(gpt_dir=gpt_dir, record=record, vq_dir=vq_dir, vq_hash=vq_hash, tokenizer=tok_file,
                  tokenizer_sha256=text.sha256)
    vq_config = VQModel.config_from_pretrained(vq_dir)
    gpt_config = GPT.config_from_pretrained(gpt_dir)
    layout = _layout(text, vq_config, gpt_config)
    layout.check(gpt_config, names=(f"GPT {str(gpt_dir)!r}", f"text tokenizer {str(tok_file)!r} + VQ tokenizer {str(vq_dir)!r}"))

    out = claim_output_dir(out, kind="pipeline")
    for src, name in ((vq_dir, VQ_DIR), (gpt_dir, GPT_DIR)):
        if src.resolve() != (out / name).resolve():
            atomic_write_dir(out / name, lambda tmp, src=src: [shutil.copy2(f, tmp / f.name) for f in src.iterdir() if f.is_file()])
    if tok_file.resolve() != (out / TOKENIZER_FILE).resolve():
        text.save(out / TOKENIZER_FILE)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "argen_version": argen.__version__,
        "text_len": layout.text_len,
        "layout": layout.summary(),
        "parts": {
            "vq": {"path": VQ_DIR, "class": PART_CLASSES["vq"], "hash": vq_hash, "num_codes": layout.num_codes,
                   "resolution": vq_config.resolution},
            "text_tokenizer": {"path": TOKENIZER_FILE, "class": PART_CLASSES["text_tokenizer"], "hash": text.sha256,
                               "pad_token": text.pad_token, "vocab_size": text.vocab_size},
            "gpt": {"path": GPT_DIR, "class": PART_CLASSES["gpt"], "hash": gpt_hash, "config": to_dict(gpt_config)},
        },
        "gpt_trained_with": {k: v for k, v in record.items() if k != "text_ids_seen"},
    }
    if sampling is not None:
        manifest[SAMPLING_KEY] = dataclasses.asdict(sampling)
    atomic_write_bytes(out / PIPELINE_FILE, json.dumps(manifest, indent=2).encode())
    return out


def set_recommended_sampling(path: str | Path, sampling: SamplingConfig) -> None:
    """Record `sampling` in the pipeline directory's pipeline.json as the setting to sample with by default."""
    file = Path(path) / PIPELINE_FILE
    manifest = read_json_object(file)
    manifest[SAMPLING_KEY] = dataclasses.asdict(sampling)
    atomic_write_bytes(file, json.dumps(manifest, indent=2).encode())


def recommended_sampling(manifest: dict[str, Any], *, file: str | Path = PIPELINE_FILE) -> SamplingConfig:
    """The sampler settings a pipeline.json recommends, or FALLBACK_SAMPLING when it recommends none."""
    saved = manifest.get(SAMPLING_KEY)
    if saved is None:
        return FALLBACK_SAMPLING
    try:
        return SamplingConfig(**saved)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{file}: its '{SAMPLING_KEY}' settings {saved!r} are not valid: {err}. Fix or delete "
                            "them (the pipeline then samples with the defaults).") from None


@dataclass
class PipelineOutput:
    """What calling a Pipeline returns: PIL images, prompts in order with num_images each, and the tensors behind them."""

    images: list[Image.Image]  # (N,) RGB images
    prompts: list[str]         # (N,) the prompt of each image
    result: GenerationResult   # the tensors (images in [-1, 1], codes), row seeds and the settings used


@dataclass
class GenerationResult:
    """Images and codes of one `Pipeline.generate` call. Row r is sample `sample_index[r]` of prompt `prompts[r]`."""

    images: Tensor        # (N, 3, H, W) float32 in [-1, 1], on the CPU
    codes: Tensor         # (N, h*w) int64 in [0, num_codes), on the CPU
    prompts: list[str]    # (N,) the prompt of each row (prompts repeated n_per_prompt times, in order)
    sample_index: list[int]  # (N,) k for the k-th sample of its prompt
    row_seeds: list[int]  # (N,) the seed of each row's generator (see Pipeline.generate)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    forward_passes: int = 0  # GPT forward passes over all batches (one per image token without parallel decoding)


def row_seed(seed: int, prompt: str, k: int) -> int:
    """Generator seed of the k-th sample of `prompt` under `seed`. The prompt is part of it, so different prompts
    never share their sampling noise (which would correlate their images and shrink an evaluation's sample)."""
    digest = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return int(np.random.SeedSequence([seed, digest, k]).generate_state(1, dtype=np.uint64)[0] % 2**63)


class Pipeline:
    """A loaded pipeline directory: text tokenizer -> GPT -> VQ decoder. Use `Pipeline.load(dir)`."""

    def __init__(self, *, vq: VQModel, text: TextTokenizer, gpt: GPT, layout: SequenceLayout, manifest: dict[str, Any],
                 path: Path | None = None, text_ids_seen: set[int] | None = None, pack: bool = True,
                 compile: bool = False, precision: Precision = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}.")
        self.vq, self.text, self.gpt, self.layout = vq, text, gpt, layout
        self.manifest, self.path = manifest, path
        self.text_ids_seen = text_ids_seen
        self.pack, self.compile, self.precision = pack, compile, precision
        self._sampler_gpt: GPT | CompiledDecoding | None = None

    @property
    def sampling_precision(self) -> str:
        """What the sampling copy computes in: "bf16" (the blocks' weights and the KV cache in bfloat16, `bf16_blocks`)
        for precision "bf16", or "auto" where this device computes bf16 natively (`argen.host.native_bf16`); else
        "fp32", the GPT's own weights."""
        fp32 = next(self.gpt.parameters()).dtype == torch.float32
        bf16 = self.precision == "bf16" or self.precision == "auto" and native_bf16(self.device)
        return "bf16" if fp32 and bf16 else "fp32"

    def sampler_gpt(self) -> GPT | CompiledDecoding:
        """The GPT that sampling runs, made once: in `sampling_precision`, and with `pack` on a CPU with oneDNN a
        prepacked inference copy (1.3-1.8x faster decode in benchmarks/sampling.py), with `compile` as well one whose
        decode step Inductor compiles (`pack_for_cpu`); otherwise the GPT itself (FLOP counters see only plain ops)."""
        if self._sampler_gpt is None:
            bf16 = self.sampling_precision == "bf16"
            cpu = self.device.type == "cpu" and next(self.gpt.parameters()).dtype == torch.float32
            if self.pack and cpu and onednn_available():
                self._sampler_gpt = pack_for_cpu(self.gpt, compile=self.compile, bf16=bf16)
            else:
                self._sampler_gpt = bf16_blocks(self.gpt) if bf16 else self.gpt
        return self._sampler_gpt

    @property
    def device(self) -> torch.device:
        return next(self.gpt.parameters()).device

    @property
    def sampling(self) -> SamplingConfig:
        """The sampler settings this pipeline recommends (pipeline.json), used when a call gives none."""
        return recommended_sampling(self.manifest, file=(self.path or Path(".")) / PIPELINE_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None, **kwargs: Any) -> Pipeline:
        """Load a pipeline directory onto `device` (default: CUDA when available); see `load` for the keywords."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls.load(path, device=device, **kwargs)

    def __call__(self, prompt: str | Sequence[str], *, num_images: int = 1, seed: int = 0,
                 sampling: SamplingConfig | None = None, batch_size: int | None = None, **settings: Any) -> PipelineOutput:
        """Images for `prompt` (one or several): `pipe("a red circle", num_images=4).images` is a list of PIL images.

        Samples with the pipeline's recommended settings (`self.sampling`), or `sampling`, changed by any
        SamplingConfig field given as a keyword (`pipe("a red circle", cfg_scale=3, decoding="spatial")`).
        """
        base = sampling if sampling is not None else self.sampling
        try:
            config = dataclasses.replace(base, **settings)
        except TypeError:
            known = ", ".join(f.name for f in dataclasses.fields(SamplingConfig))
            raise ValueError(f"unknown sampler setting(s) {sorted(settings)}; SamplingConfig has {known}.") from None
        result = self.generate(prompt, n_per_prompt=num_images, sampling=config, seed=seed, batch_size=batch_size)
        return PipelineOutput(images=[tensor_to_pil(x) for x in result.images], prompts=result.prompts, result=result)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True, pack: bool = True,
             compile: bool = False, precision: Precision = "auto") -> Pipeline:
        """Load and check a pipeline directory.

        With `verify` (the default) every part's hash is recomputed and compared with pipeline.json (a swapped
        part is refused, naming it). The GPT's own training record must name the VQ and text tokenizers (refused
        naming both sides otherwise; without `verify` it is compared with the hashes pipeline.json records, which
        skips reading the weights twice). The GPT's sizes are checked against the layout in any case.
        `pack`, `compile` and `precision` choose the sampling copy (see `sampler_gpt`).
        """
        path = Path(path)
        file = path / PIPELINE_FILE
        if not file.is_file():
            raise PipelineError(f"{str(path)!r} is not a pipeline directory: {PIPELINE_FILE} is missing. A pipeline is "
                                f"made by `argen train gpt` (with data.vq_tokenizer set) or argen.pipeline.build_pipeline.")
        manifest, parts = read_manifest(
            file, format=FORMAT, version=FORMAT_VERSION, classes=PART_CLASSES, required=tuple(PART_CLASSES),
            what="pipeline", error=PipelineError,
            upgrade=lambda m: parts_from_v1(m, classes=PART_CLASSES, version=FORMAT_VERSION))
        vq_dir, gpt_dir, tok_file = (path_inside(path, parts[name]["path"], named_in=file) for name in ("vq", "gpt", "text_tokenizer"))
        for what, where in (("VQ tokenizer", vq_dir), ("GPT", gpt_dir), ("text tokenizer", tok_file)):
            if not where.exists():
                raise PipelineError(f"pipeline {str(path)!r} is missing its {what} at {str(where)!r}.")
        record = gpt_training_record(gpt_dir)
        recorded = part_hashes(manifest)
        actual = recorded
        if verify:
            actual = {"vq": pretrained_hash(vq_dir), "gpt": pretrained_hash(gpt_dir), "text_tokenizer": tokenizer_file_hash(tok_file)}
            for name, have in actual.items():
                if have != recorded[name]:
                    where = {"vq": vq_dir, "gpt": gpt_dir, "text_tokenizer": tok_file}[name]
                    raise PipelineError(f"{name} {str(where)!r} has hash {_short(have)}, but {file} records "
                                        f"{_short(recorded[name])}: the part was replaced after the pipeline was built. "
                                        "Restore it, or rebuild the pipeline with build_pipeline (which checks that the "
                                        "parts belong together).")
        check_pairing(gpt_dir=gpt_dir, record=record, vq_dir=vq_dir, vq_hash=actual["vq"], tokenizer=tok_file,
                      tokenizer_sha256=actual["text_tokenizer"])
        text = TextTokenizer.load(tok_file, pad_token=parts["text_tokenizer"].get("pad_token"))
        vq = VQModel.from_pretrained(vq_dir, device=device)
        gpt = GPT.from_pretrained(gpt_dir, device=device)
        layout = _layout(text, vq.config, gpt.config)
        layout.check(gpt.config, names=(f"GPT {str(gpt_dir)!r}", f"text tokenizer {str(tok_file)!r} + VQ tokenizer {str(vq_dir)!r}"))
        seen = record.get("text_ids_seen")
        seen_ids = {i for a, b in seen for i in range(a, b + 1)} if seen is not None else None
        return cls(vq=vq, text=text, gpt=gpt, layout=layout, manifest=manifest, path=path, text_ids_seen=seen_ids,
                   pack=pack, compile=compile, precision=precision)

    def unseen_words(self, prompt: str) -> list[str]:
        """Words of `prompt` with a token that never occurred in a training caption (the GPT cannot know them)."""
        if self.text_ids_seen is None:
            return []
        return [w for w in prompt.split() if any(i not in self.text_ids_seen for i in self.text.tokenize(w))]

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, n_per_prompt: int = 1, sampling: SamplingConfig | None = None,
                 seed: int = 0, batch_size: int | None = None) -> GenerationResult:
        """Sample `n_per_prompt` images for each prompt; rows are the prompts in order, each repeated n times.

        The k-th sample of a prompt draws from its own generator seeded by `row_seed(seed, prompt, k)`, so a row's
        image depends only on (prompt, seed, k, sampling), never on the batch it ran in. The empty prompt "" is
        the unconditional model. `sampling` defaults to the pipeline's recommended settings (`self.sampling`).
        `batch_size` caps the rows per GPT batch (CFG doubles it internally).
        """
        sampling = sampling if sampling is not None else self.sampling
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt (the empty prompt \"\" samples unconditionally).")
        if n_per_prompt < 1:
            raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}.")
        text_ids = self.text.encode(prompts, text_len=self.layout.text_len)  # (P, text_len); one warning if cut
        rows = [p for p in prompts for _ in range(n_per_prompt)]
        ks = [k for _ in prompts for k in range(n_per_prompt)]
        seeds = [row_seed(seed, p, k) for p, k in zip(rows, ks)]
        device = self.device
        prefix = self.layout.prefix(text_ids.repeat_interleave(n_per_prompt, dim=0)).to(device)  # (N, prefix_len)
        uncond = self.layout.uncond_prefix(device=device) if sampling.uses_cfg else None
        step = batch_size or len(rows)
        codes, images, passes = [], [], 0
        for start in range(0, len(rows), step):
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds[start:start + step]]
            decoded = decode_image_tokens(self.sampler_gpt(), prefix[start:start + step],
                                          image_offset=self.layout.image_offset, num_codes=self.layout.num_codes,
                                          uncond_prefix=uncond, config=sampling, generator=gens)
            passes += decoded.forward_passes
            c = decoded.codes.clone()  # the sampler returns inference-mode tensors; a clone is an ordinary one
            codes.append(c.cpu())
            images.append(self.vq.decode(c).clamp(-1, 1).float().cpu())
        return GenerationResult(images=torch.cat(images), codes=torch.cat(codes), prompts=rows, sample_index=ks,
                                row_seeds=seeds, sampling=sampling, forward_passes=passes)

    # ------------------------------------------------------------------------------- editing and control (argen.edit)
    def inpaint(self, image, prompt: str, *, mask=None, box=None, **kwargs) -> list:
        """Regenerate the region `mask` (white / nonzero) or `box` (x0, y0, x1, y1) of `image` under `prompt` ->
        PIL images; keyword arguments and the full result (codes, snapped mask, PSNR): `argen.edit.inpaint`."""
        from argen.edit import inpaint

        return inpaint(self, image, prompt, mask=mask, box=box, **kwargs).pil()

    def outpaint(self, image, prompt: str, *, keep=None, keep_box=None, **kwargs) -> list:
        """Keep the region `keep` (a mask) or `keep_box` of `image` and generate around it -> PIL images
        (`argen.edit.outpaint`)."""
        from argen.edit import outpaint

        return outpaint(self, image, prompt, keep=keep, keep_box=keep_box, **kwargs).pil()

    def complete(self, image, prompt: str, *, keep_rows: int, **kwargs) -> list:
        """Keep the top `keep_rows` pixel rows of `image` and generate the rest -> PIL images (`argen.edit.complete`)."""
        from argen.edit import complete

        return complete(self, image, prompt, keep_rows=keep_rows, **kwargs).pil()

    def rerank(self, prompts, *, clip, n: int = 8, **kwargs) -> list:
        """Best of `n` draws per prompt by the generator-side CLIP `clip` -> one PIL image per prompt
        (`argen.rerank.rerank`)."""
        from argen.rerank import rerank

        return rerank(self, prompts, clip=clip, n=n, **kwargs).pil()
