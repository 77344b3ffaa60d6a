"""A unCLIP pipeline directory (CLIP + decoder + diffusion and/or AR prior + unclip.json with their hashes): built,
verified, loaded and sampled with any of its priors, or with none (the decoder fed the text embedding)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from argen.pipeline import manifest_parts, row_seed
from argen.sample import NonFiniteSamplingError
from argen.unclip.ar_prior_sampling import ARPrior, ARPriorSamplingConfig, sample_ar_prior
from argen.unclip.clip import ClipEncoder, TextEncoding
from argen.unclip.decoder_sampling import sample_decoder
from argen.unclip.prior_sampling import sample_diffusion_prior
from argen.unclip.schedulers import SAMPLERS
from tokenizers_img.serialization import atomic_write_bytes, atomic_write_dir, path_inside, read_json_object

UNCLIP_FILE = "unclip.json"
FORMAT = "argen-unclip"
FORMAT_VERSION = 1
PRIORS = ("diffusion", "ar", "none")
PART_DIRS = {"clip": "clip", "decoder": "decoder", "diffusion": "prior_diffusion", "ar": "prior_ar"}


class UnclipPipelineError(ValueError):
    """A unCLIP pipeline directory is missing a part, a part was swapped, or its parts were trained with different CLIPs."""


def directory_hash(path: str | Path) -> str:
    """SHA-256 over every file of a directory: relative paths and contents, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _part_clip_sha(name: str, part_dir: Path) -> str:
    """The sha256 of the CLIP a decoder or prior directory records it was trained with."""
    if name == "decoder":
        from argen.tasks.decoder import decoder_training_record

        return decoder_training_record(part_dir)["clip_sha256"]
    if name == "diffusion":
        from argen.tasks.diffusion_prior import prior_training_record

        return prior_training_record(part_dir)["clip_sha256"]
    from argen.unclip.ar_prior_sampling import AR_PRIOR_FILE

    return json.loads((part_dir / AR_PRIOR_FILE).read_text())["clip_sha256"]


def build_unclip_pipeline(out: str | Path, *, clip: str | Path, decoder: str | Path, diffusion_prior: str | Path | None = None,
                          ar_prior: str | Path | None = None) -> Path:
    """Copy the parts into one directory with unclip.json (each part's hash and the CLIP they share), atomically.

    Every part must have been trained with this CLIP (its recorded sha256); a mismatch is refused, naming both.
    `diffusion_prior` is a `train_diffusion_prior` final/prior directory; `ar_prior` a `train_ar_prior` final/.
    """
    clip_model = ClipEncoder.load(clip)
    sources = {"clip": Path(clip), "decoder": Path(decoder)}
    if diffusion_prior is not None:
        sources["diffusion"] = Path(diffusion_prior)
    if ar_prior is not None:
        sources["ar"] = Path(ar_prior)
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
            parts[name] = {"path": PART_DIRS[name], "sha256": directory_hash(tmp / PART_DIRS[name]), "source": str(src)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "clip_sha256": clip_model.sha256,
                    "parts": parts}
        atomic_write_bytes(tmp / UNCLIP_FILE, json.dumps(manifest, indent=2).encode())

    return atomic_write_dir(out, write)


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
    """Which prior ("diffusion", "ar" or "none": the decoder reads the text embedding) and each stage's sampler."""

    prior: str = "diffusion"
    diffusion: DiffusionPriorSampling = field(default_factory=DiffusionPriorSampling)
    ar: ARPriorSamplingConfig = field(default_factory=ARPriorSamplingConfig)
    decoder: DecoderSampling = field(default_factory=DecoderSampling)

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior={self.prior!r} is not one of {PRIORS}.")

    def prior_calls(self, ar_tokens: int) -> int:
        """Sequential prior network evaluations per image."""
        return {"diffusion": self.diffusion.steps, "ar": ar_tokens, "none": 0}[self.prior]


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

    def __init__(self, *, clip: ClipEncoder, decoder, diffusion_prior=None, ar_prior: ARPrior | None = None,
                 manifest: dict[str, Any] | None = None, path: Path | None = None) -> None:
        self.clip, self.decoder = clip, decoder
        self.diffusion_prior, self.ar_prior = diffusion_prior, ar_prior
        self.manifest, self.path = manifest or {}, path

    @property
    def priors(self) -> tuple[str, ...]:
        """The priors this pipeline can sample with ("none" always)."""
        have = {"diffusion": self.diffusion_prior is not None, "ar": self.ar_prior is not None, "none": True}
        return tuple(p for p in PRIORS if have[p])

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> UnclipPipeline:
        """Load a unCLIP pipeline directory; with `verify` every part's hash is recomputed against unclip.json."""
        from argen.tasks.decoder import load_decoder
        from argen.tasks.diffusion_prior import load_diffusion_prior

        path = Path(path)
        file = path / UNCLIP_FILE
        if not file.is_file():
            raise UnclipPipelineError(f"{str(path)!r} is not a unCLIP pipeline directory: {UNCLIP_FILE} is missing. "
                                      "Make one with argen.unclip.pipeline.build_unclip_pipeline.")
        manifest = read_json_object(file)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise UnclipPipelineError(f"{file} has format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                                      f"this argen reads {FORMAT!r} v{FORMAT_VERSION}.")
        parts = manifest_parts(manifest, file, required=("clip", "decoder"), error=UnclipPipelineError)
        for name, part in parts.items():
            where = path_inside(path, part.get("path"), named_in=file)
            if not where.is_dir():
                raise UnclipPipelineError(f"unCLIP pipeline {str(path)!r} is missing its {name} at {str(where)!r}.")
            if verify and (have := directory_hash(where)) != (recorded := str(part.get("sha256"))):
                raise UnclipPipelineError(f"{name} {str(where)!r} has hash {have[:12]}, but {file} records "
                                          f"{recorded[:12]}: the part was replaced after the pipeline was built. "
                                          "Restore it or rebuild the pipeline.")
        clip = ClipEncoder.load(path_inside(path, parts["clip"]["path"], named_in=file), device=device)
        if clip.sha256 != manifest.get("clip_sha256"):
            raise UnclipPipelineError(f"{path}: the CLIP is {clip.sha256[:12]} but {file} records "
                                      f"{str(manifest.get('clip_sha256'))[:12]}.")
        decoder = load_decoder(path_inside(path, parts["decoder"]["path"], named_in=file), clip=clip, device=device)
        diffusion = ar = None
        if "diffusion" in parts:
            diffusion = load_diffusion_prior(path_inside(path, parts["diffusion"]["path"], named_in=file), clip=clip, device=device)
        if "ar" in parts:
            ar = ARPrior.load(path_inside(path, parts["ar"]["path"], named_in=file), device=device)
            if ar.clip_sha256 != clip.sha256:
                raise UnclipPipelineError(f"the AR prior in {path} was trained with CLIP {ar.clip_sha256[:12]}, but the "
                                          f"pipeline's CLIP is {clip.sha256[:12]}.")
        return cls(clip=clip, decoder=decoder, diffusion_prior=diffusion, ar_prior=ar, manifest=manifest, path=path)

    def calls_per_image(self, sampling: UnclipSampling) -> int:
        """Sequential network evaluations per image: the CLIP text tower, the prior, the decoder's steps."""
        ar_tokens = self.ar_prior.quantizer.num_tokens if self.ar_prior is not None else 0
        return 1 + sampling.prior_calls(ar_tokens) + sampling.decoder.steps

    def image_embeddings(self, rows: Sequence[str], text: TextEncoding, *, sampling: UnclipSampling,
                         seeds: Sequence[int]) -> Tensor:
        """The unit-norm embeddings the decoder is conditioned on, one per row (rows[i] seeded by seeds[i])."""
        if sampling.prior not in self.priors:
            raise UnclipPipelineError(f"prior {sampling.prior!r} is not in this pipeline; it has {self.priors}.")
        if sampling.prior == "none":
            return F.normalize(text.embeds.float(), dim=-1)
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        if sampling.prior == "ar":
            embeds = text.embeds if self.ar_prior.quantizer.config.text_tokens else None
            return F.normalize(sample_ar_prior(self.ar_prior, list(rows), text_embeds=embeds, config=sampling.ar,
                                               generator=gens), dim=-1)
        d = sampling.diffusion
        return F.normalize(sample_diffusion_prior(self.diffusion_prior, text, sampler=d.sampler, steps=d.steps,
                                                  cfg_scale=d.cfg_scale, best_of=d.best_of, generator=gens), dim=-1)

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
