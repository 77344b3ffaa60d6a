"""`argen train unclip`: the whole unCLIP stack on the built-in shapes data from the configs/unclip/shapes_*.yaml set
(CLIP, embedding shards, diffusion prior, AR prior, decoder, judge CLIP, pipeline), each stage reused when finished."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "unclip"
NUM_TRAIN_EMBEDDINGS = 50_000  # training scenes the priors learn from (the shapes train split is a 1M-scene stream)


def _config(name: str) -> dict:
    path = CONFIG_ROOT / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `argen train unclip` from a source checkout (pip install -e .).")
    return yaml.safe_load(path.read_text())


def _stage(name: str, done: Path, run: Callable[[], None], timings: dict[str, float]) -> None:
    print(f"\n== {name} ==", flush=True)
    if done.exists():
        print(f"reusing {done} (delete it to redo this stage)", flush=True)
        timings[name] = 0.0
        return
    start = time.perf_counter()
    run()
    timings[name] = time.perf_counter() - start
    print(f"[{name}: {timings[name] / 60:.1f} min]", flush=True)


def train_unclip_stack(out: str | Path = "runs/unclip_stack", *, overrides: dict[str, list[str]] | None = None) -> dict:
    """Train every unCLIP part into `out` and build `out/pipeline` (a unCLIP pipeline directory).

    `overrides` maps a stage ("clip", "prior_diffusion", "prior_ar", "decoder", "judge_clip") to `key=value`
    overrides of its YAML. Returns (and writes to out/stack.json) the seconds each stage took.
    """
    from argen.data.registry import build_dataset
    from argen.tasks.ar_prior import ARPriorExperiment, train_ar_prior
    from argen.tasks.clip import CLIP_DIR, CLIPExperiment, train_clip
    from argen.tasks.decoder import DECODER_DIR, DecoderExperiment, train_decoder
    from argen.tasks.diffusion_prior import PRIOR_DIR, DiffusionPriorExperiment, train_diffusion_prior
    from argen.unclip.clip import ClipEncoder
    from argen.unclip.embeddings import encode_embedding_shard
    from argen.unclip.pipeline import UNCLIP_FILE, build_unclip_pipeline

    out = Path(out)
    overrides = overrides or {}
    timings: dict[str, float] = {}
    clip_dir = out / "clip" / "final" / CLIP_DIR
    emb = {"train": out / "emb_train", "val": out / "emb_val"}
    prior_diffusion = out / "prior_diffusion" / "final" / PRIOR_DIR
    prior_ar = out / "prior_ar" / "final"
    decoder = out / "decoder" / "final" / DECODER_DIR
    judge = out / "judge_clip" / "final" / CLIP_DIR

    def clip_run() -> None:
        exp = load_config(_config("shapes_clip.yaml"), CLIPExperiment, [f"train.out_dir={out / 'clip'}", *overrides.get("clip", [])])
        train_clip(exp, resume=(out / "clip" / "checkpoints").is_dir())

    def embed_run() -> None:
        clip = ClipEncoder.load(clip_dir)
        for split, limit in (("train", NUM_TRAIN_EMBEDDINGS), ("val", None)):
            dataset = build_dataset("shapes", split=split, resolution=32)
            encode_embedding_shard(clip, dataset, emb[split], dataset_spec="shapes", split=split, limit=limit,
                                   overwrite=True, seed=0, resolution=32)

    def prior_overrides(stage: str) -> list[str]:
        return [f"data.clip={clip_dir}", f"data.train=[{emb['train']}]", f"data.val=[{emb['val']}]",
                f"train.out_dir={out / stage}", *overrides.get(stage, [])]

    def diffusion_run() -> None:
        exp = load_config(_config("shapes_prior_diffusion.yaml"), DiffusionPriorExperiment, prior_overrides("prior_diffusion"))
        train_diffusion_prior(exp, resume=(out / "prior_diffusion" / "checkpoints").is_dir())

    def ar_run() -> None:
        exp = load_config(_config("shapes_prior_ar.yaml"), ARPriorExperiment, prior_overrides("prior_ar"))
        train_ar_prior(exp, resume=(out / "prior_ar" / "checkpoints").is_dir())

    def decoder_run() -> None:
        exp = load_config(_config("shapes_decoder.yaml"), DecoderExperiment,
                          [f"clip={clip_dir}", f"train.out_dir={out / 'decoder'}", *overrides.get("decoder", [])])
        train_decoder(exp, resume=(out / "decoder" / "checkpoints").is_dir())

    def judge_run() -> None:
        exp = load_config(_config("shapes_judge_clip.yaml"), CLIPExperiment,
                          [f"train.out_dir={out / 'judge_clip'}", *overrides.get("judge_clip", [])])
        train_clip(exp, resume=(out / "judge_clip" / "checkpoints").is_dir())

    def pipeline_run() -> None:
        build_unclip_pipeline(out / "pipeline", clip=clip_dir, decoder=decoder, diffusion_prior=prior_diffusion,
                              ar_prior=prior_ar)

    _stage("1/7 CLIP", clip_dir, clip_run, timings)
    _stage("2/7 embedding shards", emb["val"], embed_run, timings)
    _stage("3/7 diffusion prior", prior_diffusion, diffusion_run, timings)
    _stage("4/7 AR prior", prior_ar / "ar_prior.json", ar_run, timings)
    _stage("5/7 decoder", decoder, decoder_run, timings)
    _stage("6/7 pipeline", out / "pipeline" / UNCLIP_FILE, pipeline_run, timings)
    _stage("7/7 judge CLIP (for argen compare; not part of the generator)", judge, judge_run, timings)
    generator = sum(v for k, v in timings.items() if not k.startswith("7/7"))
    report = {"seconds": timings, "generator_stack_seconds": generator, "total_seconds": sum(timings.values()),
              "pipeline": str(out / "pipeline"), "judge_clip": str(judge), "train_embeddings": str(emb["train"])}
    atomic_write_bytes(out / "stack.json", json.dumps(report, indent=2).encode())
    print(f"\nunCLIP stack in {out}: generator parts {generator / 60:.1f} min, judge CLIP included "
          f"{report['total_seconds'] / 60:.1f} min. Compare with:\n  argen compare --gpt GPT_PIPELINE --unclip "
          f"{out / 'pipeline'} --judge-clip {judge} --train-embeddings {emb['train']}", flush=True)
    return report
