"""`argen train pipeline` (and `argen demo`, its shapes preset): one command from a captioned dataset to a trained,
evaluated text-to-image pipeline, stage by stage; a finished stage is reused, an interrupted one resumed, and one
whose inputs changed is redone.

Stages: image tokenizer -> its scoring -> code extraction -> BPE -> GPT -> judge CLIP (trained separately on the
train split, for evaluation only) -> sampling -> evaluation (`argen.eval.suite`, plus the shapes judge on shapes)
-> OUT/report.md, report.json and PNG grids.

Sizes come from one preset per resolution (YAML files in argen/configs), changed with `tokenizer.KEY=VALUE`,
`gpt.KEY=VALUE` and `clip.KEY=VALUE`:

| resolution | tokenizer (codes)                | GPT                              | judge CLIP        | sized for |
| ---------- | -------------------------------- | -------------------------------- | ----------------- | --------- |
| 32 shapes  | shapes_32 (f4 patch, 8x8, 128x32 pairs) | shapes_32 (4 x 256, 3.5M)  | shapes_judge_clip | CPU       |
| 32         | real_32 (f4, 8x8, 512)           | real_32 (4 x 256)                | judge_clip_32     | CPU       |
| 64         | real_64 (f8 VQ, 8x8, 1024)       | real_64 (4 x 256, dropout 0.1)   | judge_clip_64     | CPU       |
| 128        | real_128 (f8 VQGAN, 16x16, 4096) | real_128 (8 x 512, ~30M)         | judge_clip_128    | one GPU   |
| 256        | real_256 (f16 VQGAN, 16x16, 16k) | gpu_100m (10 x 768, ~100M)       | judge_clip_256    | one GPU   |

real_256 trains with LPIPS: give its weights file with tokenizer.loss.lpips_path=PATH (or turn it off with
tokenizer.loss.perceptual_weight=0). The keys that wire the stages together (data.spec, data.resolution, data.train,
data.val, data.text_tokenizer, data.vq_tokenizer, train.out_dir) are set here and cannot be overridden.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argen.configs import resolve as resolve_config
from argen.data.registry import has_heldout
from argen.eval.suite import EvalSettings
from argen.sample import SamplingConfig

# tokenizer, GPT and judge-CLIP presets per resolution (see the table above)
PRESETS: dict[int, tuple[str, str, str]] = {
    32: ("real_32", "real_32", "judge_clip_32"),
    64: ("real_64", "real_64", "judge_clip_64"),
    128: ("real_128", "real_128", "judge_clip_128"),
    256: ("real_256", "gpu_100m", "judge_clip_256"),
}
SHAPES_PRESETS = ("shapes_32", "shapes_32", "shapes_judge_clip")  # the shapes world at 32 px: the demo's recipe
OVERRIDE_PREFIXES = ("tokenizer", "gpt", "clip")
# keys that wire the stages together: set by the recipe, never by an override
WIRED_KEYS = {
    "tokenizer": ("data.spec", "data.resolution", "train.out_dir"),
    "gpt": ("data.train", "data.val", "data.text_tokenizer", "data.vq_tokenizer", "train.out_dir"),
    "clip": ("data.spec", "data.resolution", "train.out_dir", "text_tokenizer"),
}
STAGES_DIR = "stages"  # OUT/stages/NAME.json: the inputs each stage ran with, and whether it finished


@dataclass
class RecipeSettings:
    """What the recipe trains and samples beyond the three YAML experiments.

    num_train_codes: training items encoded for the GPT; None: the whole train split (on shapes, whose train split
        is a 1M-scene stream, 40,000 scenes of every caption template).
    extra_train_codes (shapes only): more training scenes of only some caption templates, {comma-separated template
        names (see argen.data.shapes.TEMPLATES): count}, each encoded into its own shard (codes/train+NAMES) and
        trained on with codes/train. The default adds 40,000 relation scenes to 40,000 of every template: two-object
        relation captions are then 60% of the GPT's data instead of a fifth.
    text_vocab_size: upper bound on the BPE vocabulary (None: 512 on shapes, 2048 otherwise). lowercase: lowercase
        captions and prompts (None: on shapes, whose captions are lower case, so a prompt's case does not matter;
        off otherwise, since case says something in real captions).
    cfg_scales x cfg_schedules x top_ks x temperatures (shapes): the sampler sweep (scale 1 once: no guidance has no
        schedule); the setting with the best mean whole-prompt accuracy of the shapes judge on the sweep prompts
        (single + relation, seed `seed`) is used for the report, which shows the whole sweep.
    samples_per_prompt (shapes): images per prompt in the final judge scoring (seed `seed + 1`), per kind.
    sampling: the sampler setting where no rule-based judge can sweep (data other than shapes).
    judge_clip: train the judge CLIP and run the argen.eval suite (`argen demo` leaves it off: the shapes judge
        scores its images). eval: the suite's settings (its splits are val, and heldout on shapes). With
        eval.rerank N > 1 a second CLIP (the judge's preset, the next seed) is trained to pick the best of N draws
        per caption, scored beside the first draws (argen.eval.suite).
    score_images: val images the tokenizer is scored on (None: the whole val split; a stream's first 1000).
    """

    num_train_codes: int | None = None
    extra_train_codes: dict[str, int] = field(default_factory=lambda: {"relation": 40_000})
    text_vocab_size: int | None = None
    lowercase: bool | None = None
    cfg_scales: tuple[float, ...] = (1.0, 2.0)  # CFG 3 and T 1 never won a demo sweep (docs/demo.md): not swept
    cfg_schedules: tuple[str, ...] = ("constant", "linear")
    top_ks: tuple[int | None, ...] = (4,)
    temperatures: tuple[float, ...] = (0.5, 0.25)
    sweep_prompts: dict[str, int] = field(default_factory=lambda: {"single": 16, "relation": 64})
    eval_prompts: dict[str, int] = field(default_factory=lambda: {"single": 16, "relation": 200, "heldout": 200})
    samples_per_prompt: dict[str, int] = field(default_factory=lambda: {"single": 8, "relation": 2, "heldout": 2})
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg_scale=2.0))
    judge_clip: bool = True
    eval: EvalSettings = field(default_factory=EvalSettings)
    score_images: int | None = None
    seed: int = 0


def _stage(name: str) -> None:
    print(f"\n== {name} ==", flush=True)


def split_overrides(overrides: tuple[str, ...] | list[str], *, prefixes: tuple[str, ...] = OVERRIDE_PREFIXES
                    ) -> dict[str, tuple[str, ...]]:
    """`tokenizer.train.max_steps=10` -> {"tokenizer": ("train.max_steps=10",), ...}. A bad item is a ValueError that
    names it; so is one that sets a key the recipe wires (WIRED_KEYS)."""
    out: dict[str, list[str]] = {p: [] for p in prefixes}
    for item in overrides:
        stage, _, rest = item.partition(".")
        key = rest.partition("=")[0]
        if stage not in prefixes or "=" not in rest or not key:
            raise ValueError(f"override {item!r} must look like STAGE.key.path=value with STAGE one of "
                             f"{', '.join(prefixes)} (e.g. gpt.train.max_steps=2000).")
        if key in WIRED_KEYS.get(stage, ()):
            raise ValueError(f"override {item!r}: {stage}.{key} is set by the recipe (from --dataset, --resolution and "
                             "-o), not by an override.")
        out[stage].append(rest)
    return {k: tuple(v) for k, v in out.items()}


def presets_for(dataset: str, resolution: int) -> tuple[str, str, str]:
    """The (tokenizer, GPT, judge CLIP) preset names for a dataset at a resolution (see the module's table)."""
    if dataset == "shapes" and resolution == 32:
        return SHAPES_PRESETS
    if resolution not in PRESETS:
        raise ValueError(f"--resolution {resolution} has no preset; choose one of {sorted(PRESETS)} (or give your own "
                         "configs with --tokenizer-config, --gpt-config and --clip-config).")
    return PRESETS[resolution]


class StageRecords:
    """OUT/stages/NAME.json: the inputs (configs, hashes of what a stage read) a stage last ran with, and whether it
    finished. `state` compares them with the inputs of this run."""

    def __init__(self, out: Path) -> None:
        self.dir = out / STAGES_DIR

    def state(self, name: str, inputs: dict[str, Any]) -> str:
        """"finished" (reuse it), "started" (resume it), "changed" (redo it: prints which inputs changed) or "new"."""
        file = self.dir / f"{name}.json"
        if not file.is_file():
            return "new"
        record = json.loads(file.read_text())
        if record["inputs"] != _plain(inputs):
            changed = _changed_keys(record["inputs"], _plain(inputs))
            print(f"{name}: its inputs changed since it last ran ({', '.join(changed[:6])}); redoing it")
            return "changed"
        return "finished" if record["finished"] else "started"

    def mark(self, name: str, inputs: dict[str, Any], *, finished: bool) -> None:
        from tokenizers_img.serialization import atomic_write_bytes

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{name}.json",
                           json.dumps({"inputs": _plain(inputs), "finished": finished}, indent=1).encode())


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _train_stage(records: StageRecords, name: str, inputs: dict[str, Any], *, run_dir: Path, product: Path, train_fn,
                 experiment: Any) -> None:
    """Reuse `product` when the stage finished with these inputs, resume the run from its latest checkpoint when it
    was interrupted with them, else train from scratch (deleting only that run's own files)."""
    state = records.state(name, inputs)
    if state == "finished" and product.exists():
        print(f"reusing {product} (delete {run_dir} to retrain)")
        return
    resume = state in ("started", "finished") and (run_dir / "checkpoints" / "latest").is_file()
    print(f"resuming {run_dir} from its latest checkpoint" if resume else f"training into {run_dir}")
    records.mark(name, inputs, finished=False)
    train_fn(experiment, resume=resume, overwrite=not resume)
    records.mark(name, inputs, finished=True)


def run_recipe(out: str | Path, *, dataset: str = "shapes", resolution: int = 32, overrides: tuple[str, ...] = (),
               tokenizer_config: str | Path | None = None, gpt_config: str | Path | None = None,
               clip_config: str | Path | None = None, settings: RecipeSettings | None = None,
               val_fraction: float = 0.05, follow_symlinks: bool = False, strict: bool = False,
               allow_pipe: bool = False, kind: str = "pipeline-run", title: str = "argen train pipeline") -> dict:
    """Train and evaluate a text-to-image pipeline on `dataset` at `resolution` px into `out` (see the module doc).

    `overrides` are `tokenizer.KEY=VALUE`, `gpt.KEY=VALUE` and `clip.KEY=VALUE`; `*_config` replace the presets (a
    YAML file or a preset name). The dataset options are as for `argen.data.registry.build_dataset`. Returns the
    report dict written to out/report.json.
    """
    from argen.data.registry import DatasetConfig, parse_spec
    from argen.host import host_info
    from argen.tasks.clip import CLIPExperiment
    from argen.tasks.gpt import GPTExperiment
    from argen.tasks.tokenizer import TOKENIZER_DIR, TokenizerExperiment
    from tokenizers_img.config import to_dict
    from tokenizers_img.serialization import claim_output_dir

    settings = settings or RecipeSettings()
    parse_spec(dataset)  # a bad spec fails before anything is written
    if settings.eval.rerank > 1 and not settings.judge_clip:
        raise ValueError(f"rerank {settings.eval.rerank} is scored by the judge CLIP: drop --no-judge-clip or --rerank.")
    shapes = dataset == "shapes"  # the shapes world with its judge (shapes:TEMPLATES is scored like any data)
    split = split_overrides(overrides, prefixes=OVERRIDE_PREFIXES)
    names = presets_for(dataset, resolution) if None in (tokenizer_config, gpt_config, clip_config) else ("",) * 3
    configs = {"tokenizer": resolve_config("tokenizer", str(tokenizer_config or names[0])),
               "gpt": resolve_config("gpt", str(gpt_config or names[1])),
               "clip": resolve_config("unclip", str(clip_config or names[2]))}
    data_keys = [f"data.spec={dataset}", f"data.resolution={resolution}", f"data.val_fraction={val_fraction}",
                 *([f"data.follow_symlinks={follow_symlinks}", f"data.strict={strict}"]
                   if dataset.startswith("imagefolder:") else [])]
    out = Path(out)
    # eval_every 0: stage 2 scores the whole val split anyway
    tok_exp = _load("tokenizer", configs, TokenizerExperiment,
                    ["train.eval_every=0", *split["tokenizer"], *data_keys, f"train.out_dir={out / 'tokenizer_run'}"])
    clip_exp = _load("clip", configs, CLIPExperiment,
                     [*split["clip"], *data_keys, f"train.out_dir={out / 'judge_clip_run'}"]) if settings.judge_clip else None
    rerank_exp = _load("clip", configs, CLIPExperiment, [
        *split["clip"], *data_keys, f"train.seed={clip_exp.train.seed + 1}", f"train.out_dir={out / 'rerank_clip_run'}"
    ]) if clip_exp is not None and settings.eval.rerank > 1 else None
    data = DatasetConfig(spec=dataset, resolution=resolution, val_fraction=val_fraction,
                         follow_symlinks=follow_symlinks, strict=strict)
    streams = _code_streams(data, out / "codes", shapes=shapes, settings=settings)
    train_shards = [shard for which, _, _, shard, _ in streams if which == "train"]
    tok_dir = Path(tok_exp.train.out_dir) / "final" / TOKENIZER_DIR
    gpt_exp = _load("gpt", configs, GPTExperiment, [
        *split["gpt"], f"data.train=[{', '.join(map(str, train_shards))}]", f"data.val=[{out / 'codes' / 'val'}]",
        f"data.text_tokenizer={out / 'text'}", f"data.vq_tokenizer={tok_dir}", f"train.out_dir={out / 'gpt_run'}"])
    options = {"val_fraction": val_fraction, "follow_symlinks": follow_symlinks, "strict": strict,
               "allow_pipe": allow_pipe}
    data.build("train", allow_pipe=allow_pipe)  # a missing folder or a bad shard pattern fails before anything is written
    out = claim_output_dir(out, kind=kind)  # only after every config loaded: a typo writes nothing
    records = StageRecords(out)
    host = host_info()
    print(f"host: {host.describe()}", flush=True)  # a slow host shows here, before the timings
    stages = ["train the image tokenizer", "score the tokenizer on the val split" + (" and held-out split" if shapes else ""),
              "encode the training images into code shards", "train the BPE text tokenizer on the training captions",
              "train the GPT", *(["train the judge CLIP on the train split (evaluation only)"] if clip_exp else []),
              *([f"train the rerank CLIP (the judge's preset, another seed: picks the best of {settings.eval.rerank})"]
                if rerank_exp else []),
              "sample, sweep the guidance scale and judge every image" if shapes else "sample val captions",
              *(["evaluate with the judge CLIP (argen.eval suite)"] if clip_exp else [])]
    step = iter(range(1, len(stages) + 1))
    timings: dict[str, float] = {}

    def begin(i: int) -> float:
        _stage(f"{next(step)}/{len(stages)} {stages[i]}")
        return time.perf_counter()

    def end(start: float, i: int) -> None:
        timings[f"{len(timings) + 1} {stages[i]}"] = time.perf_counter() - start

    from argen.tasks.tokenizer import train_tokenizer
    from tokenizers_img.serialization import pretrained_hash
    from tokenizers_img.vq_model import VQModel

    start = begin(0)
    tok_run = Path(tok_exp.train.out_dir)
    _train_stage(records, "tokenizer", {"config": to_dict(tok_exp)}, run_dir=tok_run, product=tok_dir / "model.safetensors",
                 train_fn=train_tokenizer, experiment=tok_exp)
    end(start, 0)

    start = begin(1)
    vq = VQModel.from_pretrained(tok_dir)
    vq_hash = pretrained_hash(tok_dir)
    tok_metrics = _score_tokenizer(vq, data, shapes=shapes, settings=settings, out=out)
    end(start, 1)

    start = begin(2)
    codes_inputs = _encode_codes(vq, data, streams, vq_hash=vq_hash, records=records, allow_pipe=allow_pipe)
    end(start, 2)

    start = begin(3)
    text_dir, text_sha = _train_bpe(Path(gpt_exp.data.text_tokenizer), out / "codes" / "train", codes_inputs=codes_inputs, shapes=shapes,
                                    settings=settings, records=records)
    end(start, 3)

    from argen.pipeline import PIPELINE_FILE, Pipeline
    from argen.tasks.gpt import train_gpt

    start = begin(4)
    gpt_run = Path(gpt_exp.train.out_dir)
    pipeline_dir = gpt_run / "final"
    gpt_inputs = {"config": to_dict(gpt_exp), "vq_hash": vq_hash, "text_sha256": text_sha, "codes": codes_inputs}
    _train_stage(records, "gpt", gpt_inputs, run_dir=gpt_run, product=pipeline_dir / PIPELINE_FILE,
                 train_fn=train_gpt, experiment=gpt_exp)
    gpt_metrics = json.loads((gpt_run / "metrics.json").read_text())
    end(start, 4)

    i = 5
    clip_dirs: dict[str, Path] = {}  # the judge CLIP, then the rerank CLIP: one stage each, where asked for
    for name, exp in (("judge_clip", clip_exp), ("rerank_clip", rerank_exp)):
        if exp is None:
            continue
        from argen.tasks.clip import CLIP_DIR, train_clip

        start = begin(i)
        run_dir = Path(exp.train.out_dir)
        clip_dirs[name] = run_dir / "final" / CLIP_DIR
        _train_stage(records, name, {"config": to_dict(exp)}, run_dir=run_dir, product=clip_dirs[name],
                     train_fn=train_clip, experiment=exp)
        end(start, i)
        i += 1
    clip_dir, rerank_dir = clip_dirs.get("judge_clip"), clip_dirs.get("rerank_clip")

    start = begin(i)
    pipe = Pipeline.load(pipeline_dir)
    summary: dict[str, Any] = {
        "title": title, "dataset": dataset, "resolution": resolution,
        "tokenizer": {"dir": str(tok_dir), "config": str(configs["tokenizer"]), "metrics": tok_metrics},
        "gpt": {"pipeline": str(pipeline_dir), "config": str(configs["gpt"]), "num_params": gpt_metrics.get("num_params"),
                "steps": gpt_metrics.get("step"), "eval": gpt_metrics.get("eval"),
                "mixed_precision": gpt_metrics.get("mixed_precision"), "compiled": gpt_metrics.get("compiled")},
    }
    if shapes:
        summary.update(_sample_and_judge(pipe, pipeline_dir, settings=settings, out=out))
    else:
        summary.update(_sample_captions(pipe, pipeline_dir, data, settings=settings, out=out, allow_pipe=allow_pipe))
    end(start, i)
    i += 1

    if clip_exp is not None:
        start = begin(i)
        pipe = Pipeline.load(pipeline_dir)  # with the sampler setting just recorded
        eval_inputs = {"gpt": gpt_inputs, "judge_clip": to_dict(clip_exp), "sampling": dataclasses.asdict(pipe.sampling),
                       "settings": dataclasses.asdict(settings.eval),
                       "splits": ["val", "heldout"] if has_heldout(dataset) else ["val"],
                       **({"rerank_clip": to_dict(rerank_exp)} if rerank_exp else {})}
        summary["judge_clip"] = {"dir": str(clip_dir), "config": str(configs["clip"]),
                                 "eval": json.loads((Path(clip_exp.train.out_dir) / "metrics.json").read_text()).get("eval")}
        summary["eval"] = _evaluate(pipe, clip_dir, dataset, eval_inputs, out=out / "eval", records=records,
                                    rerank_dir=rerank_dir, options=options)
        end(start, i)

    summary.update({"timings_s": timings, "total_s": sum(timings.values()),
                    "host": {**host.__dict__, "described": host.describe()}})
    from tokenizers_img.serialization import atomic_write_bytes

    atomic_write_bytes(out / "report.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "report.md", report_markdown(summary).encode())
    print(f"\nwrote {out / 'report.md'} and {out / 'report.json'}; total {summary['total_s'] / 60:.1f} min")
    return summary


def _load(stage: str, configs: dict[str, Path], schema: type, overrides: list[str]) -> Any:
    """One stage's experiment from its YAML and overrides; a config error names the stage and its file."""
    from tokenizers_img.config import ConfigError, load_config

    try:
        return load_config(configs[stage], schema, overrides)
    except ConfigError as err:
        raise ConfigError(f"{stage} config {configs[stage]} (override as {stage}.KEY=VALUE): {err}") from None


def _score_tokenizer(vq, data, *, shapes: bool, settings: RecipeSettings, out: Path) -> dict[str, dict]:
    """Tokenizer figures on the val split (and the held-out split on shapes, with the judge's agreement), and
    out/reconstructions.png of the first 16 val images."""
    from argen.data.registry import indexable
    from argen.data.skips import collate
    from argen.eval.tokenizer import evaluate_tokenizer
    from argen.viz import reconstruction_sheet, save_png

    splits = ("val", "heldout") if has_heldout(data.spec) else ("val",)
    metrics, first = {}, None
    for split in splits:
        dataset = data.build(split)
        dataset = indexable(dataset, max_images=settings.score_images or 1000)
        first = first or dataset
        metrics[split] = evaluate_tokenizer(vq, dataset, batch_size=250 if shapes else 64, judge=shapes,
                                            max_images=settings.score_images, progress=True).as_dict()
    batch = collate([first[i] for i in range(min(16, len(first)))])
    save_png(reconstruction_sheet(vq, batch["image"], batch["caption"])[0], out / "reconstructions.png")
    return metrics


def _code_streams(data, codes_dir: Path, *, shapes: bool, settings: RecipeSettings
                  ) -> list[tuple[str, str | None, int | None, Path, str]]:
    """(split, shapes templates, limit, shard directory, dataset spec) of each code shard: the train split (on
    shapes: its streams) and the val split."""
    from argen.data.shapes import ShapesDataset, parse_templates

    if not shapes:
        return [("train", None, settings.num_train_codes, codes_dir / "train", data.spec),
                ("val", None, None, codes_dir / "val", data.spec)]
    streams = [("train", None, settings.num_train_codes or 40_000),
               *(("train", names, n) for names, n in settings.extra_train_codes.items()), ("val", None, None)]
    return [(split, names, limit, codes_dir / ShapesDataset(split, resolution=data.resolution,
                                                            templates=parse_templates(names)).stream,
             "shapes" if names is None else f"shapes:{names}") for split, names, limit in streams]


def _encode_codes(vq, data, streams: list[tuple], *, vq_hash: str, records: StageRecords, allow_pipe: bool
                  ) -> dict[str, Any]:
    """Encode each stream (`_code_streams`) into its code shard; a shard interrupted with the same inputs resumes at
    its first unfinished unit, one with other inputs is rewritten. Returns the stage's inputs."""
    from argen.data.codes import META_NAME, PLAN_NAME, encode_to_shard
    from argen.data.registry import build_dataset

    inputs = {"vq_hash": vq_hash, "dataset": dataclasses.asdict(data),
              "streams": [[split, names, limit] for split, names, limit, _, _ in streams]}
    state = records.state("codes", inputs)
    records.mark("codes", inputs, finished=False)
    shapes = data.spec == "shapes"
    for split, _, limit, shard, spec in streams:
        dataset = build_dataset(spec, split=split, resolution=data.resolution, val_fraction=data.val_fraction,
                                follow_symlinks=data.follow_symlinks, strict=data.strict, allow_pipe=allow_pipe)
        exists = (shard / META_NAME).is_file() or (shard / PLAN_NAME).is_file()
        redo = exists and state in ("new", "changed")
        encode_to_shard(vq, dataset, shard, dataset_spec=spec, split=split, limit=limit,
                        batch_size=500 if shapes else 64, resume=exists and not redo, overwrite=redo,
                        tokenizer_hash=vq_hash)
    records.mark("codes", inputs, finished=True)
    return inputs


def _train_bpe(text_dir: Path, train_shard: Path, *, codes_inputs: dict[str, Any], shapes: bool,
               settings: RecipeSettings, records: StageRecords) -> tuple[Path, str]:
    from argen.text import TOKENIZER_FILE, TextTokenizer, dataset_captions, train_text_tokenizer

    vocab = settings.text_vocab_size or (512 if shapes else 2048)
    lowercase = shapes if settings.lowercase is None else settings.lowercase
    inputs = {"codes": codes_inputs, "vocab_size": vocab, "lowercase": lowercase}
    if records.state("text_tokenizer", inputs) == "finished" and (text_dir / TOKENIZER_FILE).is_file():
        print(f"reusing {text_dir / TOKENIZER_FILE}")
    else:
        captions = dataset_captions(f"codes:{train_shard}")
        train_text_tokenizer(captions, vocab_size=vocab, lowercase=lowercase).save(text_dir)
        records.mark("text_tokenizer", inputs, finished=True)
    tok = TextTokenizer.load(text_dir)
    print(f"text tokenizer: {tok.vocab_size} tokens ({'lowercasing' if lowercase else 'case kept'})")
    return text_dir, tok.sha256


def setting_name(sampling: SamplingConfig) -> str:
    schedule = f" {sampling.cfg_schedule}" if sampling.cfg_scale != 1 else ""
    return f"cfg {sampling.cfg_scale:g}{schedule}, top-k {sampling.top_k or 'all'}, T {sampling.temperature:g}"


def _sample_and_judge(pipe, pipeline_dir: Path, *, settings: RecipeSettings, out: Path) -> dict[str, Any]:
    """Shapes: sweep the sampler by the judge, record the best setting in the pipeline, then judge each prompt kind."""
    from argen.eval.generation import PROMPT_KINDS, code_diversity, heldout_part, judge_images, prompt_set, score
    from argen.pipeline import set_recommended_sampling
    from argen.viz import contact_sheet, save_png

    sweep, sampling = sampler_sweep(pipe, settings)
    print(f"sampler sweep (whole-prompt accuracy): {json.dumps(sweep)}; using {setting_name(sampling)}")
    set_recommended_sampling(pipeline_dir, sampling)  # `argen sample` and Pipeline calls default to it
    results, sheets = {}, {}
    for kind in PROMPT_KINDS:
        prompts = prompt_set(kind, max_prompts=settings.eval_prompts[kind])
        # seed + 1: the reported images are not the ones the scale was chosen on
        gen = pipe.generate(prompts, n_per_prompt=settings.samples_per_prompt[kind], sampling=sampling,
                            seed=settings.seed + 1, batch_size=256)
        judged = judge_images(gen.prompts, gen.images)
        results[kind] = {**score(gen.prompts, judged).as_dict(), "diversity": code_diversity(gen.codes, gen.prompts)}
        if kind == "heldout":  # the two kinds of held-out combination fail for different reasons: one row each
            parts = [heldout_part(p) for p in gen.prompts]
            for part in dict.fromkeys(parts):
                rows = [i for i, p in enumerate(parts) if p == part]
                prompts_part = [gen.prompts[i] for i in rows]
                results[f"heldout: {part}"] = {**score(prompts_part, [judged[i] for i in rows]).as_dict(),
                                               "diversity": code_diversity(gen.codes[rows], prompts_part)}
        sheets[kind] = f"samples_{kind}.png"
        show = range(min(32, len(gen.prompts)))
        save_png(contact_sheet([gen.images[i] for i in show],
                               [("OK " if judged[i].correct else "X ") + gen.prompts[i] for i in show], columns=8),
                 out / sheets[kind])
        print(f"{kind}: {results[kind]['accuracy']:.1%} of {results[kind]['num_images']} images correct")
    return {"sampler_sweep": sweep, "sampling": _sampling_dict(sampling, seed=settings.seed + 1, pipe=pipe),
            "chosen": setting_name(sampling), "generation": results, "sheets": sheets}


def _in_precision(summary: dict) -> str:
    """' in bf16' / ' in fp32': what the report's images were sampled in ('' for a report from before it was
    recorded)."""
    precision = summary["sampling"].get("precision")
    return f" in {precision}" if precision else ""


def _sampling_dict(sampling: SamplingConfig, *, seed: int, pipe) -> dict[str, Any]:
    """The report's sampler record; `precision` is what the GPT sampled in (bf16 where native: figures move
    slightly)."""
    return {"cfg_scale": sampling.cfg_scale, "cfg_schedule": sampling.cfg_schedule, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "seed": seed, "precision": pipe.sampling_precision}


def _sample_captions(pipe, pipeline_dir: Path, data, *, settings: RecipeSettings, out: Path, allow_pipe: bool
                     ) -> dict[str, Any]:
    """Data without a rule-based judge: record `settings.sampling` in the pipeline and draw two images for each of the
    16 distinct val captions in a seeded random order (out/samples_val.png, real image first)."""
    from argen.eval.suite import dataset_items
    from argen.pipeline import set_recommended_sampling
    from argen.viz import contact_sheet, save_png

    set_recommended_sampling(pipeline_dir, settings.sampling)
    real: dict[str, Any] = {}
    for item in dataset_items(data.build("val", allow_pipe=allow_pipe), seed=settings.seed):
        real.setdefault(item["caption"], item["image"])
        if len(real) == 16:
            break
    gen = pipe.generate(list(real), n_per_prompt=2, sampling=settings.sampling, seed=settings.seed + 1, batch_size=64)
    tiles, labels = [], []
    for p, caption in enumerate(real):
        tiles += [real[caption], gen.images[2 * p], gen.images[2 * p + 1]]
        labels += [f"real: {caption}", "generated", "generated"]
    save_png(contact_sheet(tiles, labels, columns=3), out / "samples_val.png")
    print(f"sampled {len(gen.images)} images for {len(real)} val captions with {setting_name(settings.sampling)}")
    return {"sampling": _sampling_dict(settings.sampling, seed=settings.seed + 1, pipe=pipe),
            "chosen": setting_name(settings.sampling), "sheets": {"val": "samples_val.png"}}


def _evaluate(pipe, clip_dir: Path, dataset: str, inputs: dict[str, Any], *, out: Path, records: StageRecords,
              rerank_dir: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    from argen.eval.suite import evaluate_pipeline
    from argen.unclip.clip import ClipEncoder

    if records.state("eval", inputs) == "finished" and (out / "report.json").is_file():
        print(f"reusing {out / 'report.json'}")
        return json.loads((out / "report.json").read_text())
    settings = dataclasses.replace(EvalSettings(**inputs["settings"]), splits=tuple(inputs["splits"]))
    evaluate_pipeline(pipe, dataset=dataset, judge_clip=ClipEncoder.load(clip_dir), settings=settings, out=out,
                      rerank_clip=ClipEncoder.load(rerank_dir) if rerank_dir is not None else None, **options)
    records.mark("eval", inputs, finished=True)
    return json.loads((out / "report.json").read_text())  # as a re-run reads it back


def sampler_sweep(pipe, settings: RecipeSettings) -> tuple[dict[str, dict[str, float]], SamplingConfig]:
    """Whole-prompt accuracy per sampler setting and prompt kind on the sweep prompts; the best mean over kinds
    wins (the first such setting on a tie, in sweep order: CFG scale, schedule, top-k, then temperature order)."""
    from argen.eval.generation import judge_images, prompt_set, score

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
        sweep[setting_name(sampling)] = row
        mean = sum(row.values()) / len(row)
        if mean > best_acc:
            best, best_acc = sampling, mean
    return sweep, best


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _how_trained(gpt: dict) -> str:
    """' (bf16 autocast, compiled)' from the GPT's metrics.json: what makes its weights differ across hosts; '' for a
    run recorded before these were."""
    if gpt.get("mixed_precision") is None:
        return ""
    precision = "float32" if gpt["mixed_precision"] == "no" else f"{gpt['mixed_precision']} autocast"
    return f" ({precision}, {'compiled' if gpt.get('compiled') else 'eager'})"


def report_markdown(summary: dict) -> str:
    """The run's report.md: tokenizer, GPT, the shapes judge's sweep and scores (shapes), the judge-CLIP evaluation
    (when trained), timings and host."""
    from argen.eval.suite import markdown as eval_markdown

    shapes = "sampler_sweep" in summary
    judged = any(m.get("judge_agreement") is not None for m in summary["tokenizer"]["metrics"].values())
    head = "| split | images | PSNR (dB) | SSIM | codebook usage | perplexity |" + (" judge agreement |" if judged else "")
    tok_rows = [head, "| --- |" + " --- |" * (head.count("|") - 2)]
    for split, m in summary["tokenizer"]["metrics"].items():
        tok_rows.append(f"| {split} | {m['num_images']} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                        f"{m['codebook_usage']:.1%} ({m['used_codes']}/{m['num_codes']}) | {m['perplexity']:.1f} |"
                        + (f" {m['judge_agreement']:.2%} |" if judged else ""))
    gpt = summary["gpt"]
    ev = gpt.get("eval") or {}
    loss = f"val image-token loss {ev['val/loss']:.3f} nats (without caption {ev.get('val/loss_uncond', float('nan')):.3f})" \
        if "val/loss" in ev else "no val loss recorded"
    where = "the built-in shapes world" if summary["dataset"] == "shapes" else f"`{summary['dataset']}`"
    parts = [f"""# {summary['title']} report

Everything here was trained from scratch by `{summary['title']}` on {where} ({summary['resolution']} px).

## 1. Image tokenizer (whole splits)

Tokenizer `{summary['tokenizer']['dir']}` from `{summary['tokenizer']['config']}`.""" + ("""
Judge agreement: the judge reads the reconstruction as the same scene as the original.""" if judged else "") + f"""

{chr(10).join(tok_rows)}

![originals beside reconstructions](reconstructions.png)

## 2. Text-to-image GPT

GPT with {gpt['num_params'] / 1e6:.2f}M parameters, {gpt['steps']} steps{_how_trained(gpt)}, {loss}. Pipeline: `{gpt['pipeline']}`.
"""]
    if shapes:
        parts.append(_shapes_markdown(summary))
    else:
        parts.append(f"Sampler: {summary['chosen']}{_in_precision(summary)} (seed {summary['sampling']['seed']}).\n\n"
                     "**val captions** (real image, then two generated)\n\n![val](samples_val.png)\n")
    if "eval" in summary:
        clip_eval = summary["judge_clip"].get("eval") or {}
        retrieval = ", ".join(f"{k.removeprefix('val/')} {v:.3g}" for k, v in clip_eval.items()) or "not recorded"
        body = eval_markdown(summary["eval"]).split("\n", 1)[1].replace("](samples_", "](eval/samples_")
        parts.append(f"## 3. Judge-CLIP evaluation\n\nJudge CLIP `{summary['judge_clip']['dir']}` from "
                     f"`{summary['judge_clip']['config']}`, trained on the train split only; its own val retrieval: "
                     f"{retrieval}.\n{body.replace('## ', '### ')}")
    times = "\n".join(f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items())
    parts.append(f"""## Timings

Host: {summary['host']['described']}.

| stage | seconds |
| --- | --- |
{times}
| total | {summary['total_s']:.1f} |
""")
    return "\n".join(parts)


def _shapes_markdown(summary: dict) -> str:
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
    failures = "\n".join(f"- {kind}: {f}" for kind, r in summary["generation"].items() if not kind.startswith("heldout: ")
                         for f in r["failures"][:3])
    sheets = "\n\n".join(f"**{kind}** (first 32 images; OK / X is the judge's verdict)\n\n![{kind}]({name})"
                         for kind, name in summary["sheets"].items())
    return f"""### Sampler sweep (whole-prompt accuracy, seed {summary['sampling']['seed'] - 1}, 2 images per prompt)

{chr(10).join(sweep_rows)}

### Judge scores with {summary['chosen']}{_in_precision(summary)} (seed {summary['sampling']['seed']}: other images than the sweep's)

single: one object with colour, shape, size and position stated (val scenes, never trained on).
relation: two objects and a spatial relation (val scenes). heldout: colour-shape pairs and coloured relations
that never appear in training (any caption template), then each of the two on its own. Attribute columns: share correct among images whose
prompt states that attribute. Binding errors: share of the images of two-object prompts that show every stated
colour, shape and size but on the wrong objects. Diversity: share of image tokens that differ between two images
of the same prompt (0: copies).

{chr(10).join(gen_rows)}

Some failures, as the judge states them:

{failures or '- none'}

{sheets}
"""
