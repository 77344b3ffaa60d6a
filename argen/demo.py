"""`argen demo`: the main job on the built-in shapes data, stage by stage, reusing finished stages on a re-run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from argen.configs import resolve as resolve_config
from argen.data.codes import META_NAME, encode_to_shard, read_meta
from argen.data.shapes import ShapesDataset, parse_templates
from argen.data.skips import collate
from argen.eval.generation import PROMPT_KINDS, code_diversity, judge_images, prompt_set, score
from argen.eval.tokenizer import evaluate_tokenizer
from argen.host import host_info
from argen.pipeline import PIPELINE_FILE, Pipeline, set_recommended_sampling
from argen.sample import SamplingConfig
from argen.tasks.gpt import GPTExperiment, train_gpt
from argen.tasks.tokenizer import TOKENIZER_DIR, TokenizerExperiment, train_tokenizer
from argen.text import TOKENIZER_FILE, TextTokenizer, dataset_captions, train_text_tokenizer
from argen.viz import contact_sheet, reconstruction_sheet, save_png
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir, pretrained_hash
from tokenizers_img.vq_model import VQModel

TOKENIZER_CONFIG = resolve_config("tokenizer", "shapes_32")
GPT_CONFIG = resolve_config("gpt", "shapes_32")


@dataclass
class DemoSettings:
    """What the demo trains and samples beyond the two YAML configs.

    num_train_codes: training scenes of every caption template encoded for the GPT (the shapes train split is a
        1M-scene stream).
    extra_train_codes: more training scenes of only some caption templates, {comma-separated template names (see
        argen.data.shapes.TEMPLATES): count}, each encoded into its own shard (codes/train+NAMES) and trained on
        with codes/train. The default adds 40,000 relation scenes to 40,000 of every template: two-object relation
        captions are then 60% of the GPT's data instead of a fifth. All shards together are a little more than the
        GPT's 2400 x 32 draws, so the encode stage spends no time on scenes it never uses.
    cfg_scales x cfg_schedules x top_ks x temperatures: the sampler sweep (scale 1 once: no guidance has no
        schedule); the setting with the best mean whole-prompt accuracy on the sweep prompts (single + relation,
        seed `seed`) is used for the report, which shows the whole sweep.
    samples_per_prompt: images per prompt in the final scoring (seed `seed + 1`), per kind.
    """

    num_train_codes: int = 40_000
    extra_train_codes: dict[str, int] = field(default_factory=lambda: {"relation": 40_000})
    text_vocab_size: int = 512
    cfg_scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    cfg_schedules: tuple[str, ...] = ("constant", "linear")
    top_ks: tuple[int | None, ...] = (4,)
    temperatures: tuple[float, ...] = (1.0, 0.5, 0.25)
    sweep_prompts: dict[str, int] = field(default_factory=lambda: {"single": 16, "relation": 64})
    eval_prompts: dict[str, int] = field(default_factory=lambda: {"single": 16, "relation": 200, "heldout": 200})
    samples_per_prompt: dict[str, int] = field(default_factory=lambda: {"single": 8, "relation": 2, "heldout": 2})
    seed: int = 0


def _stage(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def run_demo(out: str | Path = "demo", *, tokenizer_overrides: tuple[str, ...] = (), gpt_overrides: tuple[str, ...] = (),
             settings: DemoSettings | None = None) -> dict:
    """Train the shapes tokenizer, the BPE and the GPT (each reused when already finished), then sample a fixed
    prompt set with a CFG sweep, score every image with the judge and write out/report.md (+ JSON and PNGs).

    `tokenizer_overrides` / `gpt_overrides` are `key.path=value` settings for the two YAML experiments.
    """
    out = claim_output_dir(out, kind="demo")
    settings = settings or DemoSettings()
    host = host_info()
    print(f"host: {host.describe()}", flush=True)  # a slow host shows here, before the timings
    timings: dict[str, float] = {}
    # eval_every 0: stage 2 scores the whole val and held-out splits anyway (saves two whole-val passes)
    tok_exp = load_config(TOKENIZER_CONFIG, TokenizerExperiment,
                          [f"train.out_dir={out / 'tokenizer_run'}", "train.eval_every=0", *tokenizer_overrides])

    _stage("1/6 train the image tokenizer")
    start = time.perf_counter()
    tok_dir = Path(tok_exp.train.out_dir) / "final" / TOKENIZER_DIR
    if (tok_dir / "model.safetensors").is_file():
        print(f"reusing {tok_dir} (delete {tok_exp.train.out_dir} to retrain)")
    else:
        train_tokenizer(tok_exp, resume=(Path(tok_exp.train.out_dir) / "checkpoints" / "latest").is_file())
    timings["1 train image tokenizer"] = time.perf_counter() - start

    _stage("2/6 score the tokenizer on the whole val and held-out splits")
    start = time.perf_counter()
    vq = VQModel.from_pretrained(tok_dir)
    res = tok_exp.data.resolution
    tok_metrics = {split: evaluate_tokenizer(vq, ShapesDataset(split, resolution=res), batch_size=250, judge=True,
                                             progress=True).as_dict() for split in ("val", "heldout")}
    val = ShapesDataset("val", resolution=res)
    batch = collate([val[i] for i in range(16)])
    save_png(reconstruction_sheet(vq, batch["image"], batch["caption"])[0], out / "reconstructions.png")
    timings["2 score image tokenizer"] = time.perf_counter() - start

    _stage("3/6 encode training scenes into code shards")
    start = time.perf_counter()
    codes_dir = out / "codes"
    vq_hash = pretrained_hash(tok_dir)
    streams = [("train", None, settings.num_train_codes),
               *(("train", names, n) for names, n in settings.extra_train_codes.items()), ("val", None, None)]
    train_shards = []
    for split, names, limit in streams:
        dataset = ShapesDataset(split, resolution=res, templates=parse_templates(names))
        shard = codes_dir / dataset.stream
        if split == "train":
            train_shards.append(shard)
        stale = (shard / META_NAME).is_file() and read_meta(shard).tokenizer_hash != vq_hash
        encode_to_shard(vq, dataset, shard, dataset_spec="shapes" if names is None else f"shapes:{names}", split=split,
                        limit=limit, batch_size=500, resume=(shard / META_NAME).is_file() and not stale,
                        overwrite=stale, tokenizer_hash=vq_hash)
    timings["3 encode codes"] = time.perf_counter() - start

    _stage("4/6 train the BPE text tokenizer on the training captions")
    start = time.perf_counter()
    text_dir = out / "text"
    if (text_dir / TOKENIZER_FILE).is_file():
        print(f"reusing {text_dir / TOKENIZER_FILE}")
    else:
        captions = dataset_captions(f"codes:{codes_dir / 'train'}")
        train_text_tokenizer(captions, vocab_size=settings.text_vocab_size).save(text_dir)
    print(f"text tokenizer: {TextTokenizer.load(text_dir).vocab_size} tokens")
    timings["4 train text tokenizer"] = time.perf_counter() - start

    _stage("5/6 train the GPT")
    start = time.perf_counter()
    gpt_exp = load_config(GPT_CONFIG, GPTExperiment, [
        f"data.train=[{', '.join(map(str, train_shards))}]", f"data.val=[{codes_dir / 'val'}]", f"data.text_tokenizer={text_dir}",
        f"data.vq_tokenizer={tok_dir}", f"train.out_dir={out / 'gpt_run'}", *gpt_overrides])
    pipeline_dir = Path(gpt_exp.train.out_dir) / "final"
    if (pipeline_dir / PIPELINE_FILE).is_file():
        print(f"reusing {pipeline_dir} (delete {gpt_exp.train.out_dir} to retrain)")
    else:
        train_gpt(gpt_exp, resume=(Path(gpt_exp.train.out_dir) / "checkpoints" / "latest").is_file())
    gpt_metrics = json.loads((Path(gpt_exp.train.out_dir) / "metrics.json").read_text())
    timings["5 train GPT"] = time.perf_counter() - start

    _stage("6/6 sample, sweep the guidance scale and judge every image")
    start = time.perf_counter()
    pipe = Pipeline.load(pipeline_dir)
    sweep, sampling = _sampler_sweep(pipe, settings)
    print(f"sampler sweep (whole-prompt accuracy): {json.dumps(sweep)}; using {_setting_name(sampling)}")
    set_recommended_sampling(pipeline_dir, sampling)  # `argen sample` and Pipeline calls default to it
    results, sheets = {}, {}
    for kind in PROMPT_KINDS:
        prompts = prompt_set(kind, max_prompts=settings.eval_prompts[kind])
        # seed + 1: the reported images are not the ones the scale was chosen on
        gen = pipe.generate(prompts, n_per_prompt=settings.samples_per_prompt[kind], sampling=sampling,
                            seed=settings.seed + 1, batch_size=256)
        judged = judge_images(gen.prompts, gen.images)
        results[kind] = {**score(gen.prompts, judged).as_dict(), "diversity": code_diversity(gen.codes, gen.prompts)}
        sheets[kind] = f"samples_{kind}.png"
        show = range(min(32, len(gen.prompts)))
        save_png(contact_sheet([gen.images[i] for i in show],
                               [("OK " if judged[i].correct else "X ") + gen.prompts[i] for i in show], columns=8),
                 out / sheets[kind])
        print(f"{kind}: {results[kind]['accuracy']:.1%} of {results[kind]['num_images']} images correct")
    timings["6 sample and judge"] = time.perf_counter() - start

    summary = {
        "tokenizer": {"dir": str(tok_dir), "config": str(TOKENIZER_CONFIG), "metrics": tok_metrics},
        "gpt": {"pipeline": str(pipeline_dir), "config": str(GPT_CONFIG), "num_params": gpt_metrics.get("num_params"),
                "steps": gpt_metrics.get("step"), "eval": gpt_metrics.get("eval")},
        "sampler_sweep": sweep, "sampling": {"cfg_scale": sampling.cfg_scale, "cfg_schedule": sampling.cfg_schedule,
                                             "temperature": sampling.temperature, "top_k": sampling.top_k,
                                             "seed": settings.seed + 1},
        "chosen": _setting_name(sampling), "generation": results, "sheets": sheets, "timings_s": timings, "total_s": sum(timings.values()),
        "host": {**host.__dict__, "described": host.describe()},
    }
    atomic_write_bytes(out / "report.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "report.md", _report_markdown(summary).encode())
    print(f"\nwrote {out / 'report.md'} and {out / 'report.json'}; total {summary['total_s'] / 60:.1f} min")
    return summary


def _setting_name(sampling: SamplingConfig) -> str:
    schedule = f" {sampling.cfg_schedule}" if sampling.cfg_scale != 1 else ""
    return f"cfg {sampling.cfg_scale:g}{schedule}, top-k {sampling.top_k or 'all'}, T {sampling.temperature:g}"


def _sampler_sweep(pipe: Pipeline, settings: DemoSettings) -> tuple[dict[str, dict[str, float]], SamplingConfig]:
    """Whole-prompt accuracy per sampler setting and prompt kind on the sweep prompts; the best mean over kinds
    wins (the first such setting on a tie, in sweep order: CFG scale, schedule, top-k, then temperature order)."""
    sweep: dict[str, dict[str, float]] = {}
    best, best_acc = None, -1.0
    grid = [(scale, schedule, top_k, temperature) for scale in settings.cfg_scales
            for schedule in (settings.cfg_schedules[:1] if scale == 1 else settings.cfg_schedules)
            for top_k in settings.top_ks for temperature in settings.temperatures]
    for scale, schedule, top_k, temperature in grid:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, cfg_scale=scale, cfg_schedule=schedule)
        row = {}
        for kind, n in settings.sweep_prompts.items():
            gen = pipe.generate(prompt_set(kind, max_prompts=n), n_per_prompt=2, sampling=sampling,
                                seed=settings.seed, batch_size=256)
            row[kind] = score(gen.prompts, judge_images(gen.prompts, gen.images)).accuracy
        sweep[_setting_name(sampling)] = row
        mean = sum(row.values()) / len(row)
        if mean > best_acc:
            best, best_acc = sampling, mean
    return sweep, best


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _report_markdown(summary: dict) -> str:
    tok_rows = ["| split | images | PSNR (dB) | SSIM | codebook usage | perplexity | judge agreement |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
    for split, m in summary["tokenizer"]["metrics"].items():
        tok_rows.append(f"| {split} | {m['num_images']} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                        f"{m['codebook_usage']:.1%} ({m['used_codes']}/{m['num_codes']}) | {m['perplexity']:.1f} | "
                        f"{m['judge_agreement']:.2%} |")
    kinds = list(next(iter(summary["sampler_sweep"].values())))
    sweep_rows = ["| sampler | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
    chosen = summary["chosen"]
    for name, row in summary["sampler_sweep"].items():
        mark = " (chosen)" if name == chosen else ""
        sweep_rows.append(f"| {name}{mark} | " + " | ".join(_pct(row[k]) for k in kinds) + " |")
    attrs = ("count", "color", "shape", "size", "position", "relation")
    gen_rows = ["| prompts | distinct prompts | images | whole prompt | " + " | ".join(attrs) + " | binding errors | "
                "diversity |", "| --- | --- | --- | --- |" + " --- |" * (len(attrs) + 2)]
    for kind, r in summary["generation"].items():
        gen_rows.append(f"| {kind} | {r['num_prompts']} | {r['num_images']} | **{_pct(r['accuracy'])}** | "
                        + " | ".join(_pct(r["attributes"][a]) for a in attrs)
                        + f" | {_pct(r.get('binding_errors'))} | {_pct(r.get('diversity'))} |")
    failures = "\n".join(f"- {kind}: {f}" for kind, r in summary["generation"].items() for f in r["failures"][:3])
    sheets = "\n\n".join(f"**{kind}** (first 32 images; OK / X is the judge's verdict)\n\n![{kind}]({name})"
                         for kind, name in summary["sheets"].items())
    times = "\n".join(f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items())
    gpt = summary["gpt"]
    ev = gpt.get("eval") or {}
    loss = f"val image-token loss {ev['val/loss']:.3f} nats (without caption {ev.get('val/loss_uncond', float('nan')):.3f})" \
        if "val/loss" in ev else "no val loss recorded"
    return f"""# argen demo report

Everything here was trained from scratch by `argen demo` on the built-in shapes world (32 px).

## 1. Image tokenizer (whole splits)

Tokenizer `{summary['tokenizer']['dir']}` from `{summary['tokenizer']['config']}`.
Judge agreement: the judge reads the reconstruction as the same scene as the original.

{chr(10).join(tok_rows)}

![originals beside reconstructions](reconstructions.png)

## 2. Text-to-image GPT

GPT with {gpt['num_params'] / 1e6:.2f}M parameters, {gpt['steps']} steps, {loss}. Pipeline: `{gpt['pipeline']}`.

### Sampler sweep (whole-prompt accuracy, seed {summary['sampling']['seed'] - 1}, 2 images per prompt)

{chr(10).join(sweep_rows)}

### Judge scores with {summary['chosen']} (seed {summary['sampling']['seed']}: other images than the sweep's)

single: one object with colour, shape, size and position stated (val scenes, never trained on).
relation: two objects and a spatial relation (val scenes). heldout: colour-shape pairs and coloured relations
that never appear in training (any caption template). Attribute columns: share correct among images whose
prompt states that attribute. Binding errors: share of the images of two-object prompts that show every stated
colour, shape and size but on the wrong objects. Diversity: share of image tokens that differ between two images
of the same prompt (0: copies).

{chr(10).join(gen_rows)}

Some failures, as the judge states them:

{failures or '- none'}

{sheets}

## Timings

Host: {summary['host']['described']}.

| stage | seconds |
| --- | --- |
{times}
| total | {summary['total_s']:.1f} |
"""
