"""`argen train unclip`: the whole unCLIP stack on the built-in shapes data from the argen/configs/unclip/shapes_*.yaml presets
(CLIP, embedding shards, diffusion prior and AR prior side by side, decoder, judge CLIP, pipeline), each stage reused
when finished."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from argen.configs import resolve as resolve_config
from argen.unclip.priors import PRIORS
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir

NUM_TRAIN_EMBEDDINGS = 50_000  # training scenes the priors learn from (the shapes train split is a 1M-scene stream)


def _config(name: str) -> dict:
    return yaml.safe_load(resolve_config("unclip", name).read_text())


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


def train_prior_stage(kind: str, overrides: list[str], resume: bool) -> None:
    """Train the stack's prior of `kind` (argen.unclip.priors.PRIORS) from its shapes preset + overrides."""
    prior = PRIORS[kind]
    experiment, train_fn = prior.trainer()
    train_fn(load_config(_config(prior.preset + ".yaml"), experiment, overrides), resume=resume)


def _run_logged(log: Path, threads: int, target: Callable, args: tuple) -> None:
    """A side-by-side child: `threads` torch threads, stdout and stderr into `log`, then target(*args)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    target(*args)


def _last_line(log: Path) -> str:
    """The last progress bar or line written to `log` ('' when none yet)."""
    if not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        lines = [x.strip() for x in re.split(r"[\r\n]", f.read().decode(errors="replace")) if x.strip()]
    return lines[-1] if lines else ""


def run_side_by_side(jobs: dict[str, tuple[Callable, tuple]], logs: Path, *, threads: int,
                     poll_seconds: float = 30.0) -> dict[str, float]:
    """Run each job (a picklable target and its args) in its own spawned process at once, the `threads` torch
    threads split between them, each one's output in logs/NAME.log (its last line echoed every `poll_seconds`).
    Small models (the priors) cannot use a second core; two of them side by side finish in about the time of one.
    Returns each job's seconds; a failed job raises RuntimeError naming its log and showing its tail."""
    logs.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pool or RNG state
    per_job = max(1, threads // len(jobs))
    start, seconds, procs = time.perf_counter(), {}, {}
    for name, (target, args) in jobs.items():
        procs[name] = context.Process(target=_run_logged, args=(logs / f"{name}.log", per_job, target, args), name=name)
        procs[name].start()
    print(f"{', '.join(jobs)} side by side, {per_job} thread(s) each; logs in {logs}/", flush=True)
    try:
        last_echo = start
        while len(seconds) < len(procs):
            time.sleep(0.5)
            for name, proc in procs.items():
                if name not in seconds and not proc.is_alive():
                    proc.join()
                    seconds[name] = time.perf_counter() - start
                    print(f"  [{name}] exited with code {proc.exitcode} after {seconds[name] / 60:.1f} min", flush=True)
            if time.perf_counter() - last_echo >= poll_seconds and len(seconds) < len(procs):
                last_echo = time.perf_counter()
                for name in procs:
                    if name not in seconds:
                        print(f"  [{name}] {_last_line(logs / f'{name}.log')[:110]}", flush=True)
    finally:  # the parent interrupted or failed: do not leave the children training
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [name for name, proc in procs.items() if proc.exitcode != 0]
    if failed:
        tails = "\n".join(f"--- {logs / f'{n}.log'} (exit code {procs[n].exitcode}), last lines:\n"
                          + "\n".join((logs / f"{n}.log").read_text(errors="replace").splitlines()[-15:]) for n in failed)
        raise RuntimeError(f"side-by-side stage(s) {', '.join(failed)} failed; their logs are kept:\n{tails}")
    return seconds


def train_unclip_stack(out: str | Path = "runs/unclip_stack", *, overrides: dict[str, list[str]] | None = None) -> dict:
    """Train every unCLIP part into `out` and build `out/pipeline` (a unCLIP pipeline directory).

    `overrides` maps a stage ("clip", each prior's part_dir such as "prior_diffusion", "decoder", "judge_clip") to
    `key=value` overrides of its YAML. Returns (and writes to out/stack.json) the seconds each stage took.
    """
    from argen.data.registry import build_dataset
    from argen.tasks.clip import CLIP_DIR, CLIPExperiment, train_clip
    from argen.tasks.decoder import DECODER_DIR, DecoderExperiment, train_decoder
    from argen.unclip.clip import ClipEncoder
    from argen.unclip.embeddings import encode_embedding_shard
    from argen.unclip.pipeline import UNCLIP_FILE, build_unclip_pipeline

    out = claim_output_dir(out, kind="unclip-stack")
    overrides = overrides or {}
    timings: dict[str, float] = {}
    side_by_side: dict[str, float] = {}  # each prior's own seconds when they train at once
    clip_dir = out / "clip" / "final" / CLIP_DIR
    emb = {"train": out / "emb_train", "val": out / "emb_val"}
    priors = {kind: out / prior.part_dir / prior.final for kind, prior in PRIORS.items()}
    prior_done = {kind: priors[kind] / PRIORS[kind].written_last for kind in PRIORS}
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

    def prior_args(kind: str) -> tuple[str, list[str], bool]:
        stage = PRIORS[kind].part_dir
        return (kind, [f"data.clip={clip_dir}", f"data.train=[{emb['train']}]", f"data.val=[{emb['val']}]",
                       f"train.out_dir={out / stage}", *overrides.get(stage, [])], (out / stage / "checkpoints").is_dir())

    def priors_side_by_side() -> None:
        jobs = {PRIORS[kind].part_dir: (train_prior_stage, prior_args(kind)) for kind in PRIORS}
        side_by_side.update(run_side_by_side(jobs, out / "logs", threads=torch.get_num_threads()))

    def decoder_run() -> None:
        exp = load_config(_config("shapes_decoder.yaml"), DecoderExperiment,
                          [f"clip={clip_dir}", f"train.out_dir={out / 'decoder'}", *overrides.get("decoder", [])])
        train_decoder(exp, resume=(out / "decoder" / "checkpoints").is_dir())

    def judge_run() -> None:
        exp = load_config(_config("shapes_judge_clip.yaml"), CLIPExperiment,
                          [f"train.out_dir={out / 'judge_clip'}", *overrides.get("judge_clip", [])])
        train_clip(exp, resume=(out / "judge_clip" / "checkpoints").is_dir())

    def pipeline_run() -> None:
        build_unclip_pipeline(out / "pipeline", clip=clip_dir, decoder=decoder, priors=priors)

    _stage("1/7 CLIP", clip_dir, clip_run, timings)
    _stage("2/7 embedding shards", emb["val"], embed_run, timings)
    todo = [kind for kind, done in prior_done.items() if not done.exists()]
    if len(todo) == len(PRIORS) > 1 and torch.get_num_threads() >= 2 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _stage("3+4/7 the priors side by side", prior_done[todo[0]], priors_side_by_side, timings)
    else:
        for number, (kind, prior) in zip((3, 4), PRIORS.items()):
            _stage(f"{number}/7 {prior.label}", prior_done[kind], lambda kind=kind: train_prior_stage(*prior_args(kind)),
                   timings)
    _stage("5/7 decoder", decoder, decoder_run, timings)
    _stage("6/7 pipeline", out / "pipeline" / UNCLIP_FILE, pipeline_run, timings)
    _stage("7/7 judge CLIP (for argen compare; not part of the generator)", judge, judge_run, timings)
    generator = sum(v for k, v in timings.items() if not k.startswith("7/7"))
    report = {"seconds": timings, "side_by_side_seconds": side_by_side, "generator_stack_seconds": generator,
              "total_seconds": sum(timings.values()), "pipeline": str(out / "pipeline"), "judge_clip": str(judge),
              "train_embeddings": str(emb["train"])}
    atomic_write_bytes(out / "stack.json", json.dumps(report, indent=2).encode())
    print(f"\nunCLIP stack in {out}: generator parts {generator / 60:.1f} min, judge CLIP included "
          f"{report['total_seconds'] / 60:.1f} min. Compare with:\n  argen compare --gpt GPT_PIPELINE --unclip "
          f"{out / 'pipeline'} --judge-clip {judge} --train-embeddings {emb['train']}", flush=True)
    return report
