"""A unCLIP pipeline directory (CLIP + decoder + diffusion and/or AR prior + unclip.json with their hashes): built,
verified, loaded and sampled with any of its priors, or with none (the decoder fed the text embedding)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from argen.pipeline import row_seed
from argen.sample import NonFiniteSamplingError
from argen.saved import SavedDirError, read_manifest
from argen.unclip.ar_prior_sampling import ARPrior, ARPriorSamplingConfig
from argen.unclip.clip import ClipEncoder, TextEncoding, trained_with_clip
from argen.unclip.decoder import load_decoder
from argen.unclip.decoder_sampling import sample_decoder
from argen.unclip.priors import NO_PRIOR, PRIOR_CHOICES, PRIORS
from argen.unclip.schedulers import SAMPLERS
from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir, content_hash, path_inside

UNCLIP_FILE = "unclip.json"
FORMAT = "argen-unclip"
FORMAT_VERSION = 2  # v2: parts record their class and content_hash under "hash" (v1 is read through _from_v1)
PART_DIRS = {"clip": "clip", "decoder": "decoder", **{k.name: k.part_dir for k in PRIORS.values()}}
PART_CLASSES = {"clip": "argen.unclip.clip.ClipEncoder", "decoder": "argen.unclip.decoder.UnCLIPDecoder",
                **{k.name: k.part_class for k in PRIORS.values()}}


class UnclipPipelineError(SavedDirError):
    """A unCLIP pipeline directory is missing a part, a part was swapped, or its parts were trained with different CLIPs."""


def _part_clip_sha(name: str, part_dir: Path) -> str:
    """The sha256 of the CLIP a decoder or prior directory records it was trained with."""
    if name == "decoder":
        return trained_with_clip(part_dir, made_by="`argen train decoder`")["clip_sha256"]
    return PRIORS[name].clip_sha256(part_dir)


def build_unclip_pipeline(out: str | Path, *, clip: str | Path, decoder: str | Path,
                          priors: Mapping[str, str | Path] | None = None) -> Path:
    """Copy the parts into one directory with unclip.json (each part's class and hash, and the CLIP they share),
    atomically. `priors` maps a kind of argen.unclip.priors.PRIORS to its trained directory.

    Every part must have been trained with this CLIP (its recorded sha256); a mismatch is refused, naming both.
    """
    clip_model = ClipEncoder.load(clip)
    unknown = sorted(set(priors or {}) - set(PRIORS))
    if unknown:
        raise UnclipPipelineError(f"unknown prior kind(s) {unknown}; the kinds are {sorted(PRIORS)}.")
    sources = {"clip": Path(clip), "decoder": Path(decoder), **{k: Path(v) for k, v in (priors or {}).items()}}
    for name, src in sources.items():
        if not src.is_dir():
            raise FileNotFoundError(f"{name} directory {src} not found.")
        if name != "clip" and (have := _part_clip_sha(name, src)) != clip_model.sha256:
            raise UnclipPipelineError(f"the {name} in {src} was trained with CLIP {have[:12]}, but the pipeline's CLIP "
                                      f"{clip} is {clip_model.sha256[:12]}; build the pipeline from parts of one CLIP.")

    def write(tmp: Path) -> None:
        parts = {}
        for name, src in sources.items():
            shutil.copytree(src, tmp / PART_DIRS[name])
            parts[name] = {"path": PART_DIRS[name], "class": PART_CLASSES[name],
                           "hash": content_hash(tmp / PART_DIRS[name]), "source": str(src)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "clip_sha256": clip_model.sha256,
                    "parts": parts}
        atomic_write_bytes(tmp / UNCLIP_FILE, json.dumps(manifest, indent=2).encode())

    return atomic_write_dir(out, write)


def _from_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 unclip.json read as format 2. Its part hashes ("sha256") counted the output-marker files that
    content_hash leaves out, so they are kept as "v1_hash" and checked with the format-1 rule (_v1_hash)."""
    parts = {name: {**part, "class": PART_CLASSES.get(name, "?"), "hash": "", "v1_hash": part.get("sha256")}
             if isinstance(part, dict) else part for name, part in (manifest.get("parts") or {}).items()}
    return {**manifest, "format_version": FORMAT_VERSION, "parts": parts}


def _v1_hash(path: Path) -> str:
    """Format 1's part hash: SHA-256 over every file of the directory (relative path, then bytes), markers included."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- sampling settings
@dataclass
class DiffusionPriorSampling:
    """The diffusion prior's sampler (see `sample_diffusion_prior`)."""

    sampler: str = "ddim"
    steps: int = 25
    cfg_scale: float = 1.0
    best_of: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"prior sampler={self.sampler!r} is not one of {SAMPLERS}.")
        if self.steps < 1 or self.best_of < 1:
            raise ValueError(f"prior steps ({self.steps}) and best_of ({self.best_of}) must be >= 1.")


@dataclass
class DecoderSampling:
    """The decoder's sampler (see `sample_decoder`)."""

    sampler: str = "dpm++"
    steps: int = 10
    cfg_scale: float = 2.0
    thresholding: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"decoder sampler={self.sampler!r} is not one of {SAMPLERS}.")
        if self.steps < 1:
            raise ValueError(f"decoder steps must be >= 1, got {self.steps}.")


@dataclass
class UnclipSampling:
    """Which prior (a kind of argen.unclip.priors.PRIORS, or "none": the decoder reads the text embedding) and each
    stage's sampler; a prior kind's settings are the field of its name."""

    prior: str = "diffusion"
    diffusion: DiffusionPriorSampling = field(default_factory=DiffusionPriorSampling)
    ar: ARPriorSamplingConfig = field(default_factory=ARPriorSamplingConfig)
    decoder: DecoderSampling = field(default_factory=DecoderSampling)

    def __post_init__(self) -> None:
        if self.prior not in PRIOR_CHOICES:
            raise ValueError(f"prior={self.prior!r} is not one of {PRIOR_CHOICES}.")


def sampling_from_options(prior: str, *, prior_steps: int, prior_cfg: float, decoder_steps: int,
                          decoder_cfg: float | None = None) -> UnclipSampling:
    """The UnclipSampling of `argen sample`'s unCLIP options, which the web page uses too (its download records that
    command): the guidance scale goes to whichever prior samples; `decoder_cfg` None keeps the decoder's default."""
    sampling = UnclipSampling(prior=prior, diffusion=DiffusionPriorSampling(steps=prior_steps),
                              decoder=DecoderSampling(steps=decoder_steps,
                                                      **({} if decoder_cfg is None else {"cfg_scale": decoder_cfg})))
    return PRIORS[prior].with_cfg(sampling, prior_cfg) if prior in PRIORS else sampling


@dataclass
class UnclipGeneration:
    """Images of one `UnclipPipeline.generate` call; row r is sample sample_index[r] of prompts[r].
    image_embeds: (N, D) unit-norm embeddings the decoder was conditioned on (the prior's samples, or for prior
    "none" the text embeddings)."""

    images: Tensor  # (N, 3, H, W) float32 in [-1, 1], on the CPU
    image_embeds: Tensor  # (N, D) float32, on the CPU
    prompts: list[str]
    sample_index: list[int]
    row_seeds: list[int]
    sampling: UnclipSampling


class UnclipPipeline:
    """A loaded unCLIP pipeline directory. Use `UnclipPipeline.load(dir)`."""

    def __init__(self, *, clip: ClipEncoder, decoder, priors: dict[str, Any] | None = None,
                 manifest: dict[str, Any] | None = None, path: Path | None = None) -> None:
        self.clip, self.decoder = clip, decoder
        self.prior_models = dict(priors or {})  # kind -> loaded prior (argen.unclip.priors.PRIORS)
        self.manifest, self.path = manifest or {}, path

    @property
    def priors(self) -> tuple[str, ...]:
        """The priors this pipeline can sample with ("none" always)."""
        return (*(k for k in PRIORS if k in self.prior_models), NO_PRIOR)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def modules(self) -> list[nn.Module]:
        """The networks it runs (the CLIP aside): the decoder and each prior's."""
        priors = [m.gpt if isinstance(m, ARPrior) else m for m in self.prior_models.values()]
        return [m for m in (self.decoder, *priors) if isinstance(m, nn.Module)]

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> UnclipPipeline:
        """Load a unCLIP pipeline directory; with `verify` every part's hash is recomputed against unclip.json."""
        path = Path(path)
        file = path / UNCLIP_FILE
        if not file.is_file():
            raise UnclipPipelineError(f"{str(path)!r} is not a unCLIP pipeline directory: {UNCLIP_FILE} is missing. "
                                      "Make one with argen.unclip.pipeline.build_unclip_pipeline.")
        manifest, parts = read_manifest(file, format=FORMAT, version=FORMAT_VERSION, classes=PART_CLASSES,
                                        required=("clip", "decoder"), what="unCLIP pipeline", error=UnclipPipelineError,
                                        upgrade=_from_v1)
        for name, part in parts.items():
            where = path_inside(path, part["path"], named_in=file)
            if not where.is_dir():
                raise UnclipPipelineError(f"unCLIP pipeline {str(path)!r} is missing its {name} at {str(where)!r}.")
            recorded = part.get("v1_hash") or part["hash"]
            if verify and (have := (_v1_hash(where) if part.get("v1_hash") else content_hash(where))) != recorded:
                raise UnclipPipelineError(f"{name} {str(where)!r} has hash {have[:12]}, but {file} records "
                                          f"{str(recorded)[:12]}: the part was replaced after the pipeline was built. "
                                          "Restore it or rebuild the pipeline.")
        clip = ClipEncoder.load(path_inside(path, parts["clip"]["path"], named_in=file), device=device)
        if clip.sha256 != manifest.get("clip_sha256"):
            raise UnclipPipelineError(f"{path}: the CLIP is {clip.sha256[:12]} but {file} records "
                                      f"{str(manifest.get('clip_sha256'))[:12]}.")
        decoder = load_decoder(path_inside(path, parts["decoder"]["path"], named_in=file), clip=clip, device=device)
        priors = {name: kind.load(path_inside(path, parts[name]["path"], named_in=file), clip, device)
                  for name, kind in PRIORS.items() if name in parts}
        return cls(clip=clip, decoder=decoder, priors=priors, manifest=manifest, path=path)

    def calls_per_image(self, sampling: UnclipSampling) -> int:
        """Sequential network evaluations per image: the CLIP text tower, the prior, the decoder's steps."""
        prior = 0 if sampling.prior == NO_PRIOR else PRIORS[sampling.prior].calls(self.prior_models[sampling.prior], sampling)
        return 1 + prior + sampling.decoder.steps

    def image_embeddings(self, rows: Sequence[str], text: TextEncoding, *, sampling: UnclipSampling,
                         seeds: Sequence[int]) -> Tensor:
        """The unit-norm embeddings the decoder is conditioned on, one per row (rows[i] seeded by seeds[i])."""
        if sampling.prior not in self.priors:
            raise UnclipPipelineError(f"prior {sampling.prior!r} is not in this pipeline; it has {self.priors}.")
        if sampling.prior == NO_PRIOR:
            return F.normalize(text.embeds.float(), dim=-1)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        embeds = PRIORS[sampling.prior].embed(self.prior_models[sampling.prior], rows, text, sampling, gens)
        return F.normalize(embeds, dim=-1)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, n_per_prompt: int = 1, seed: int = 0,
                 sampling: UnclipSampling | None = None, batch_size: int = 256) -> UnclipGeneration:
        """Sample `n_per_prompt` images per prompt; the k-th sample of a prompt uses seeds derived from
        `row_seed(seed, prompt, k)` (the prior's from it, the decoder's from it + 1), so a row does not depend on
        its batch."""
        sampling = sampling or UnclipSampling()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt.")
        if n_per_prompt < 1:
            raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}.")
        rows = [p for p in prompts for _ in range(n_per_prompt)]
        ks = [k for _ in prompts for k in range(n_per_prompt)]
        seeds = [row_seed(seed, p, k) for p, k in zip(rows, ks)]
        images, embeds = [], []
        uses_text = self.decoder.config.text_width is not None
        for start in range(0, len(rows), batch_size):
            batch, batch_seeds = rows[start:start + batch_size], seeds[start:start + batch_size]
            text = self.clip.encode_text(batch)
            e = self.image_embeddings(batch, text, sampling=sampling, seeds=batch_seeds)
            dec = sampling.decoder
            gens = [torch.Generator(device=self.device).manual_seed(s + 1) for s in batch_seeds]
            x = sample_decoder(self.decoder, e, text=text if uses_text else None, sampler=dec.sampler, steps=dec.steps,
                               cfg_scale=dec.cfg_scale, thresholding=dec.thresholding, generator=gens)
            if not (torch.isfinite(x).all() and torch.isfinite(e).all()):
                raise NonFiniteSamplingError(f"the unCLIP {sampling.prior} prior or the decoder produced non-finite values "
                                             f"for prompts {batch[:4]} with {sampling}: no image was made. Check the "
                                             "weights (a NaN in training?) or lower the guidance scales.")
            images.append(x.float().cpu())
            embeds.append(e.float().cpu())
        return UnclipGeneration(images=torch.cat(images), image_embeds=torch.cat(embeds), prompts=rows, sample_index=ks,
                                row_seeds=seeds, sampling=sampling)

    # ------------------------------------------------------------------------------- controls (argen.unclip.controls)
    def variations(self, image, *, n: int = 4, **kwargs) -> list:
        """`n` decodings of `image`'s CLIP image embedding -> PIL images (`argen.unclip.controls.variations`)."""
        from argen.unclip.controls import variations

        return variations(self, image, n=n, **kwargs).pil()

    def interpolate(self, image_a, image_b, *, steps: int = 5, **kwargs) -> list:
        """Decodings along slerp(z_a, z_b, t), t from 0 to 1 -> PIL images (`argen.unclip.controls.interpolate`)."""
        from argen.unclip.controls import interpolate

        return interpolate(self, image_a, image_b, steps=steps, **kwargs).pil()

    def text_diff(self, image, source_caption: str, target_caption: str, **kwargs) -> list:
        """`image` moved along the text diff source -> target caption -> PIL images (`argen.unclip.controls.text_diff`)."""
        from argen.unclip.controls import text_diff

        return text_diff(self, image, source_caption, target_caption, **kwargs).pil()

    def sdedit(self, image, caption: str, *, strength: float = 0.5, **kwargs) -> list:
        """`image` noised to `strength` and denoised under `caption` -> PIL images (`argen.unclip.controls.sdedit`)."""
        from argen.unclip.controls import sdedit

        return sdedit(self, image, caption, strength=strength, **kwargs).pil()
