"""The unCLIP priors behind one interface. A prior maps captions to CLIP image embeddings; each kind says where it
lives in a unCLIP pipeline, how it is loaded and sampled, and which experiment and function train it. The pipeline,
`argen train prior`, `argen train unclip`, `argen sample`, `argen compare` and `argen serve` read PRIORS, so a new
prior is one module plus one entry here (and its sampler settings as a field of UnclipSampling)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from argen.unclip.ar_prior_sampling import ARPrior, ARPriorError, sample_ar_prior
from argen.unclip.clip import ClipEncoder, ClipMismatchError, TextEncoding, trained_with_clip
from argen.unclip.diffusion_prior import load_diffusion_prior
from argen.unclip.prior_sampling import sample_diffusion_prior

NO_PRIOR = "none"  # not a prior: the decoder is fed the caption's CLIP text embedding


@dataclass(frozen=True)
class PriorKind:
    """One kind of prior. `name` is its key everywhere (unclip.json, UnclipSampling.prior and its settings field,
    `argen train prior NAME`); `embed(prior, captions, text, sampling, generators)` returns (B, D) embeddings, unit
    norm; `calls(prior, sampling)` counts its sequential network evaluations per image. `experiment` and `train`
    are "module:name" references into argen.tasks, imported only to train."""

    name: str
    label: str
    part_dir: str  # its directory in a unCLIP pipeline, and its stage's directory in `argen train unclip`
    part_class: str
    preset: str  # argen/configs/unclip/PRESET.yaml
    final: str  # where training leaves the prior inside its run's out_dir
    written_last: str  # the file of `final` whose presence means the prior is complete
    load: Callable[[Path, ClipEncoder, str | torch.device], Any]
    clip_sha256: Callable[[Path], str]
    embed: Callable[[Any, Sequence[str], TextEncoding, Any, list[torch.Generator]], Tensor]
    calls: Callable[[Any, Any], int]
    settings: Callable[[Any], dict[str, Any]]  # UnclipSampling -> this kind's sampler settings, for reports
    with_cfg: Callable[[Any, float], Any]  # UnclipSampling with this kind's guidance scale replaced
    experiment: str
    train: str

    def trainer(self) -> tuple[type, Callable[..., Any]]:
        """(experiment class, training function) of this kind."""
        return _resolve(self.experiment), _resolve(self.train)


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _load_ar(path: Path, clip: ClipEncoder, device: str | torch.device) -> ARPrior:
    prior = ARPrior.load(path, device=device)
    if prior.clip_sha256 != clip.sha256:
        raise ClipMismatchError(f"the AR prior in {str(path)!r} was trained with CLIP {prior.clip_sha256[:12]}, but the "
                                f"CLIP given is {clip.sha256[:12]} ({clip.source}); use its own CLIP or retrain it.")
    return prior


def _ar_clip_sha256(path: Path) -> str:
    from argen.unclip.ar_prior_sampling import AR_PRIOR_FILE
    from tokenizers_img.serialization import read_json_object

    if not (path / AR_PRIOR_FILE).is_file():
        raise ARPriorError(f"{path} is not an AR prior directory ({AR_PRIOR_FILE} missing).")
    return str(read_json_object(path / AR_PRIOR_FILE).get("clip_sha256"))


def _diffusion_settings(sampling) -> dict[str, Any]:
    d = sampling.diffusion
    return {"prior_sampler": d.sampler, "prior_steps": d.steps, "prior_cfg": d.cfg_scale, "best_of": d.best_of}


def _ar_settings(sampling) -> dict[str, Any]:
    return {"prior_cfg": sampling.ar.tokens.cfg_scale, "prior_top_k": sampling.ar.tokens.top_k,
            "dot_quantile": sampling.ar.dot_quantile}


def _ar_with_cfg(sampling, cfg: float):
    return replace(sampling, ar=replace(sampling.ar, tokens=replace(sampling.ar.tokens, cfg_scale=cfg)))


def _embed_diffusion(prior, captions, text, sampling, generators) -> Tensor:
    d = sampling.diffusion
    return sample_diffusion_prior(prior, text, sampler=d.sampler, steps=d.steps, cfg_scale=d.cfg_scale,
                                  best_of=d.best_of, generator=generators)


def _embed_ar(prior, captions, text, sampling, generators) -> Tensor:
    embeds = text.embeds if prior.quantizer.config.text_tokens else None
    return sample_ar_prior(prior, list(captions), text_embeds=embeds, config=sampling.ar, generator=generators)


PRIORS: dict[str, PriorKind] = {kind.name: kind for kind in (
    PriorKind(name="diffusion", label="unCLIP diffusion prior", part_dir="prior_diffusion",
              part_class="argen.unclip.diffusion_prior.DiffusionPrior", preset="shapes_prior_diffusion",
              final="final/prior", written_last="model.safetensors",
              load=lambda path, clip, device: load_diffusion_prior(path, clip=clip, device=device),
              clip_sha256=lambda path: trained_with_clip(path, made_by="`argen train prior diffusion`")["clip_sha256"],
              embed=_embed_diffusion, calls=lambda prior, sampling: sampling.diffusion.steps,
              settings=_diffusion_settings,
              with_cfg=lambda sampling, cfg: replace(sampling, diffusion=replace(sampling.diffusion, cfg_scale=cfg)),
              experiment="argen.tasks.diffusion_prior:DiffusionPriorExperiment",
              train="argen.tasks.diffusion_prior:train_diffusion_prior"),
    PriorKind(name="ar", label="unCLIP AR prior", part_dir="prior_ar",
              part_class="argen.unclip.ar_prior_sampling.ARPrior", preset="shapes_prior_ar",
              final="final", written_last="ar_prior.json",
              load=_load_ar, clip_sha256=_ar_clip_sha256, embed=_embed_ar,
              calls=lambda prior, sampling: prior.quantizer.num_tokens, settings=_ar_settings, with_cfg=_ar_with_cfg,
              experiment="argen.tasks.ar_prior:ARPriorExperiment", train="argen.tasks.ar_prior:train_ar_prior"),
)}
PRIOR_CHOICES = (*PRIORS, NO_PRIOR)  # what UnclipSampling.prior, `argen sample --prior` and the page accept


def prior_label(name: str) -> str:
    """The name reports and pages give the unCLIP road with prior `name` (a kind, or "none")."""
    return PRIORS[name].label if name in PRIORS else "unCLIP no prior"
