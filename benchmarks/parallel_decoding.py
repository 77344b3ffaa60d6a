"""Parallel decoding (speculative Jacobi: exact; row-parallel ZipAR-style: approximate) against one token per pass
and Hugging Face `generate`: forward passes per image, images/s, and the judge's whole-prompt accuracy with a paired
bootstrap interval; JSON + markdown + PNG."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import build_pair, hf_processor  # noqa: E402  (the same HF peer as benchmarks/sampling.py)

from argen.eval.generation import judge_images, prompt_set  # noqa: E402
from argen.eval.stats import PromptBootstrap  # noqa: E402
from argen.host import host_info  # noqa: E402
from argen.model import GPT, GPTConfig, bf16_blocks, onednn_available, pack_for_cpu  # noqa: E402
from argen.pipeline import Pipeline  # noqa: E402
from argen.sample import SamplingConfig, decode_image_tokens  # noqa: E402
from argen.viz import contact_sheet, save_png  # noqa: E402
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir  # noqa: E402


def settings(base: SamplingConfig, specs: list[str]) -> dict[str, SamplingConfig]:
    """`token` plus each 'DECODING:WINDOW' spec, named like 'spatial w16'."""
    out = {"token": SamplingConfig(**{**base.__dict__, "decoding": "token"})}
    for spec in specs:
        decoding, _, window = spec.partition(":")
        out[f"{decoding} w{window}"] = SamplingConfig(**{**base.__dict__, "decoding": decoding, "window": int(window)})
    return out


def hf_peers(cfg: GPTConfig, *, seed: int, device: torch.device, bf16: bool) -> dict:
    """HF's same-size Llama on `device`, float32 (its default) as "hf", and with `bf16` a bfloat16 copy as "hf bf16"."""
    _, hf = build_pair(cfg, seed=seed)  # without our code features or position table
    hf = hf.to(device)
    return {"hf": hf, **({"hf bf16": copy.deepcopy(hf).to(torch.bfloat16)} if bf16 else {})}


def clock(device: torch.device) -> float:
    """time.perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_speed(gpt: GPT, hfs: dict, *, prefix: torch.Tensor, uncond: torch.Tensor, image_offset: int,
                  num_codes: int, configs: dict[str, SamplingConfig], reps: int, seed: int) -> dict:
    """Seconds per batch (best of `reps`, settings interleaved) and forward passes per batch, ours and HF's `generate`
    on each of `hfs` (name -> LlamaForCausalLM; "hf" is the float32 one, "hf bf16" a bfloat16 copy)."""
    from transformers import LogitsProcessorList

    B, N, device = prefix.shape[0], gpt.config.num_image_tokens, prefix.device
    base = next(iter(configs.values()))
    rows = torch.cat([prefix, uncond.expand(B, -1)]) if base.uses_cfg else prefix
    processors = LogitsProcessorList([hf_processor(image_offset=image_offset, num_codes=num_codes,
                                                   cfg_scale=base.cfg_scale if base.uses_cfg else None)])
    times: dict[str, list[float]] = {name: [] for name in [*configs, *hfs]}
    passes: dict[str, int] = {}
    for _ in range(reps):  # the first rep also warms up; the best is reported
        for name, config in configs.items():
            gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(B)]
            start = clock(device)
            out = decode_image_tokens(gpt, prefix, image_offset=image_offset, num_codes=num_codes, uncond_prefix=uncond,
                                      config=config, generator=gens)
            times[name].append(clock(device) - start)
            passes[name] = out.forward_passes
        for name, hf in hfs.items():
            start = clock(device)
            with torch.inference_mode():
                hf.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_k=None,
                            top_p=None, max_new_tokens=N, min_new_tokens=N, logits_processor=processors,
                            pad_token_id=0, eos_token_id=None)
            times[name].append(clock(device) - start)
            passes[name] = N
    best = {name: min(t) for name, t in times.items() if t}
    return {"batch": B, "cfg": base.uses_cfg, "seconds": times, "forward_passes_per_batch": passes,
            "images_per_s": {n: B / t for n, t in best.items()},
            "speedup_vs_token": {n: best["token"] / t for n, t in best.items()},
            **{f"speedup_vs_{h.replace(' ', '_')}": {n: best[h] / t for n, t in best.items()} for h in hfs}}


def measure_quality(pipe: Pipeline, configs: dict[str, SamplingConfig], *, prompts: dict[str, list[str]],
                    per_prompt: dict[str, int], seed: int, n_boot: int, out: Path) -> dict:
    """Judge whole-prompt accuracy per prompt kind for each setting on the same prompts and row seeds, each against
    `token` with a paired prompt-bootstrap interval; writes a side-by-side grid of the first prompts."""
    results: dict[str, dict] = {}
    grids = {}
    for kind, kind_prompts in prompts.items():
        verdicts: dict[str, np.ndarray] = {}
        for name, config in configs.items():
            gen = pipe.generate(kind_prompts, n_per_prompt=per_prompt[kind], sampling=config, seed=seed, batch_size=256)
            verdicts[name] = np.array([r.correct for r in judge_images(gen.prompts, gen.images)], dtype=np.float64)
            if kind == "relation":
                grids[name] = (gen.images[:16], gen.prompts[:16])
        boot = PromptBootstrap([p for p in kind_prompts for _ in range(per_prompt[kind])], n_boot=n_boot, seed=seed)
        results[kind] = {
            "prompts": len(kind_prompts), "images": len(verdicts["token"]),
            "accuracy": {n: boot.mean(v).as_dict() for n, v in verdicts.items()},
            "difference_vs_token": {n: boot.difference(v, verdicts["token"]).as_dict() for n, v in verdicts.items()
                                    if n != "token"},
        }
    if "relation" in prompts:
        names = list(grids)
        tiles = [img for n in names for img in grids[n][0]]
        labels = [f"{n}: {p}" for n in names for p in grids[n][1]]
        save_png(contact_sheet(tiles, labels, columns=16), out / "relation_side_by_side.png")
    return results


def measure_clip_quality(pipe: Pipeline, configs: dict[str, SamplingConfig], *, dataset: str, judge_clip,
                         prompts: int, per_prompt: int, seed: int, n_boot: int, out: Path) -> dict:
    """For a pipeline trained on a dataset (an image folder): the judge CLIP's R-precision and CLIP score (`argen
    eval`'s) of each setting's draws for the val split's captions, with the same row seeds, each against `token` as a
    paired prompt-bootstrap difference. Writes a side-by-side grid. No Fréchet distance: the captions take most of
    the val split, which leaves too few reference images for one."""
    from argen.eval.clip_metrics import clip_scores
    from argen.eval.suite import EvalSettings, PairScorer, caption_set

    settings = EvalSettings(prompts=prompts, images_per_prompt=per_prompt, n_boot=n_boot, seed=seed)
    cset = caption_set(dataset, "val", resolution=pipe.vq.config.resolution, settings=settings)
    scorer = PairScorer(judge_clip, cset, settings)

    def judged(feats: torch.Tensor, caption_index: torch.Tensor) -> tuple[np.ndarray, np.ndarray, dict]:
        """Each image's R-precision hit (0/1) and CLIP score against its caption, and their prompt-bootstrap means
        (R-precision in %) as `PairScorer.score_features` gives them, without its Fréchet and manifold figures."""
        hits = scorer.hits(feats, caption_index).astype(np.float64)
        scores = clip_scores(feats.float(), scorer.text[caption_index].float())
        boot = PromptBootstrap(caption_index.tolist(), n_boot=n_boot, seed=seed)
        return hits, scores, {"r_precision": boot.mean(hits * 100).as_dict(), "clip_score": boot.mean(scores).as_dict()}

    index = torch.arange(len(cset.captions)).repeat_interleave(per_prompt)  # (N,) caption of each image
    boot = PromptBootstrap(index.tolist(), n_boot=n_boot, seed=seed)
    rows, hits, scores, grids = {}, {}, {}, {}
    for name, config in configs.items():
        gen = pipe.generate(cset.captions, n_per_prompt=per_prompt, sampling=config, seed=seed, batch_size=256)
        hits[name], scores[name], rows[name] = judged(scorer.encode(gen.images), index)
        grids[name] = gen.images[::per_prompt][:16]
    for name in configs:
        if name != "token":
            rows[name]["r_precision_vs_token"] = boot.difference(hits[name], hits["token"]).as_dict()
            rows[name]["clip_score_vs_token"] = boot.difference(scores[name], scores["token"]).as_dict()
    *_, real = judged(scorer.encode(cset.images), torch.arange(len(cset.captions)))
    names = list(grids)
    save_png(contact_sheet([img for n in names for img in grids[n]],
                           [f"{n}: {c}" for n in names for c in cset.captions[:16]], columns=16),
             out / "val_side_by_side.png")
    return {"dataset": dataset, "split": "val", "prompts": len(cset.captions), "images": len(index),
            "candidates": min(settings.candidates, len(cset.captions)), "settings": rows,
            "real (ceiling)": real}


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "", f"Host: {payload['host']}, torch {payload['torch']}.", ""]
    for block in payload["speed"]:
        peers = [k for k in block["rows"][0] if k.startswith("speedup_vs_hf")]  # vs HF float32, and bf16 if timed
        lines += [f"### {block['model']}", "", block["about"], "",
                  "| batch | CFG | setting | forward passes per batch | images/s | vs token | "
                  + " | ".join(f"vs HF `generate`{' bf16' if k.endswith('bf16') else ''}" for k in peers) + " |",
                  "|" + " --- |" * (6 + len(peers))]
        for r in block["rows"]:
            for name, ips in r["images_per_s"].items():
                lines.append(f"| {r['batch']} | {'on' if r['cfg'] else 'off'} | {name} | "
                             f"{r['forward_passes_per_batch'][name]} | {ips:.2f} | {r['speedup_vs_token'][name]:.2f}x | "
                             + " | ".join(f"{r[k][name]:.2f}x" for k in peers) + " |")
        lines.append("")
    if payload.get("quality"):
        q = payload["quality"]
        lines += ["### Judge whole-prompt accuracy, same prompts and row seeds", "",
                  f"Sampling: {payload['sampling']}. 95% prompt-bootstrap intervals; the difference is paired.", "",
                  "| prompts | setting | accuracy | difference vs token |",
                  "| --- | --- | --- | --- |"]
        for kind, r in q.items():
            for name, acc in r["accuracy"].items():
                diff = r["difference_vs_token"].get(name)
                d = f"{diff['estimate'] * 100:+.1f} [{diff['low'] * 100:+.1f}, {diff['high'] * 100:+.1f}]" if diff else ""
                lines.append(f"| {kind} ({r['images']} images) | {name} | "
                             f"{acc['estimate'] * 100:.1f}% [{acc['low'] * 100:.1f}, {acc['high'] * 100:.1f}] | {d} |")
        lines += ["", "![relation prompts, one row per setting](relation_side_by_side.png)", ""]
    if payload.get("clip_quality"):
        q = payload["clip_quality"]
        iv = lambda d, f=1.0: f"{d['estimate'] * f:.1f} [{d['low'] * f:.1f}, {d['high'] * f:.1f}]"  # noqa: E731
        dv = lambda d, f=1.0: f"{d['estimate'] * f:+.1f} [{d['low'] * f:+.1f}, {d['high'] * f:+.1f}]"  # noqa: E731
        real = q["real (ceiling)"]
        lines += ["### The judge CLIP on the val captions, same captions and row seeds", "",
                  f"Sampling: {payload['sampling']}. {q['prompts']} captions of {q['dataset']}, {q['images']} images per "
                  f"setting, R-precision among {q['candidates']} captions (real images: {iv(real['r_precision'])}%, "
                  f"CLIP score {iv(real['clip_score'])}). "
                  "95% prompt-bootstrap intervals; the differences are paired.", "",
                  "| setting | R-precision % | vs token | CLIP score | vs token |",
                  "| --- | --- | --- | --- | --- |"]
        for name, r in q["settings"].items():
            rp, cs = r.get("r_precision_vs_token"), r.get("clip_score_vs_token")
            lines.append(f"| {name} | {iv(r['r_precision'])} | {dv(rp, 100) if rp else ''} | {iv(r['clip_score'])} | "
                         f"{dv(cs) if cs else ''} |")
        lines += ["", "![val captions, one row per setting](val_side_by_side.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/gpt_run/final"),
                        help="the demo's pipeline directory (`argen demo` writes it to demo/gpt_run/final)")
    parser.add_argument("--report", type=Path, default=None,
                        help="the demo's report.json: its chosen sampler setting (default: PIPELINE/../../report.json)")
    parser.add_argument("--settings", nargs="+", default=["spatial:8", "spatial:16", "jacobi:8", "zipar:1", "zipar:2", "zipar:4"],
                        help="parallel settings DECODING:WINDOW beside token (for zipar the window is the rows' lag)")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="none: judge only, no timing")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--relation-prompts", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--random-gpt", action="store_true",
                        help="also time the 8 x 512 benchmark GPT of benchmarks/sampling.py (random weights)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hf-bf16", action="store_true", help="also time HF `generate` on a bfloat16 copy of its Llama")
    parser.add_argument("--no-judge", action="store_true",
                        help="speed only: skip the judge's accuracy, which reads the demo's scenes (for other pipelines)")
    parser.add_argument("--judge-clip", type=Path, default=None,
                        help="a pipeline trained on --dataset: judge with this CLIP (`argen eval`'s) instead of the "
                             "demo's scene judge")
    parser.add_argument("--dataset", default=None, help="with --judge-clip: the dataset whose val captions are drawn")
    parser.add_argument("--val-prompts", type=int, default=310, help="with --judge-clip: val captions")
    parser.add_argument("--per-prompt", type=int, default=4, help="with --judge-clip: images per caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/parallel_decoding"))
    args = parser.parse_args(argv)
    if args.judge_clip is not None and args.dataset is None:
        parser.error("--judge-clip needs --dataset (the dataset the pipeline was trained on)")
    command = "python benchmarks/parallel_decoding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = claim_output_dir(args.out, kind="benchmark")
    import transformers

    pipe = Pipeline.load(args.pipeline, device=device)
    report = args.report or args.pipeline.parent.parent / "report.json"
    chosen = json.loads(report.read_text()).get("sampling", {}) if report.is_file() else {}
    recommended = pipe.sampling
    base = SamplingConfig(**{k: chosen.get(k, getattr(recommended, k))
                             for k in ("cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")})
    layout, bf16 = pipe.layout, pipe.sampling_precision == "bf16"
    gpt = pipe.sampler_gpt()
    relation = prompt_set("relation", max_prompts=max(args.batches, default=1))
    speed_rows = []
    guided = base.cfg_scale if base.cfg_scale > 1 else 2.0  # a demo whose sweep chose no guidance still gets CFG rows
    hfs = hf_peers(pipe.gpt.config, seed=args.seed, device=device, bf16=args.hf_bf16) if args.batches else {}
    for batch in args.batches:
        text = pipe.text.encode([relation[i % len(relation)] for i in range(batch)], text_len=layout.text_len)
        prefix = layout.prefix(text).to(device)
        for cfg_on in (False, True):
            config = SamplingConfig(**{**base.__dict__, "cfg_scale": guided if cfg_on else 1.0})
            row = measure_speed(gpt, hfs, prefix=prefix, uncond=layout.uncond_prefix(device=device),
                                image_offset=layout.image_offset, num_codes=layout.num_codes,
                                configs=settings(config, args.settings), reps=args.reps, seed=args.seed)
            print(json.dumps({k: v for k, v in row.items() if k.startswith("speedup") or k in ("batch", "cfg")}),
                  flush=True)
            speed_rows.append(row)
    del hfs
    packed = device.type == "cpu" and onednn_available()
    speed = [] if not speed_rows else [{"model": f"pipeline GPT ({args.pipeline})",
              "about": f"{pipe.gpt.num_params() / 1e6:.1f}M parameters, {layout.prefix_len}-token prefix, "
                       f"{layout.num_image_tokens} image tokens, {layout.num_codes} codes; sampling {base} (CFG off: "
                       f"scale 1; CFG on: scale {guided:g}); relation prompts; ours on the pipeline's sampling copy "
                       f"({'oneDNN-packed, ' if packed else ''}{pipe.sampling_precision}: the default on {device.type}); "
                       "HF on a same-size Llama with random weights.",
              "rows": speed_rows}]
    if args.random_gpt:
        cfg = GPTConfig(vocab_size=300 + 1 + 1024, prefix_len=32, image_grid=(16, 16), n_layer=8, n_head=8, n_embd=512)
        torch.manual_seed(args.seed)
        ours = GPT(cfg).eval().to(device)
        ours = pack_for_cpu(ours, bf16=bf16) if packed else bf16_blocks(ours) if bf16 else ours
        hfs = hf_peers(cfg, seed=args.seed, device=device, bf16=args.hf_bf16)
        rows = []
        for batch in args.batches:
            g = torch.Generator().manual_seed(args.seed)
            prefix = torch.randint(1, 300, (batch, 32), generator=g)
            prefix[:, -1] = 300
            uncond = torch.zeros(32, dtype=torch.long)
            uncond[-1] = 300
            for cfg_on in (False, True):
                config = SamplingConfig(temperature=1.0, cfg_scale=4.0 if cfg_on else 1.0)
                rows.append(measure_speed(ours, hfs, prefix=prefix.to(device), uncond=uncond.to(device),
                                          image_offset=301, num_codes=1024, configs=settings(config, args.settings),
                                          reps=args.reps, seed=args.seed))
                print(json.dumps({k: v for k, v in rows[-1].items() if k.startswith("speedup") or k in ("batch", "cfg")}),
                      flush=True)
        del hfs
        speed.append({"model": "benchmark GPT, 8 x 512, random weights",
                      "about": f"{ours.config.n_layer} layers x {ours.config.n_embd}, 1024 codes, 16 x 16 image tokens, "
                               f"{pipe.sampling_precision} as the pipeline GPT, "
                               "temperature 1, CFG scale 4 where on. Random weights predict nearly uniform codes, so "
                               "Jacobi drafts (q = the last prediction) are accepted almost always and copied ones "
                               "almost never: the speed here says what a pass costs, not what a trained model gains.",
                      "rows": rows})
    quality = clip_quality = None
    if args.judge_clip is not None and not args.no_judge:
        from argen.unclip.clip import ClipEncoder

        clip_quality = measure_clip_quality(
            pipe, settings(base, args.settings), dataset=args.dataset,
            judge_clip=ClipEncoder.load(args.judge_clip, device=device), prompts=args.val_prompts,
            per_prompt=args.per_prompt, seed=args.seed + 1, n_boot=args.n_boot, out=out)
    elif not args.no_judge:
        quality = measure_quality(
            pipe, settings(base, args.settings), prompts={"single": prompt_set("single", max_prompts=16),
                                                           "relation": prompt_set("relation", max_prompts=args.relation_prompts)},
            per_prompt={"single": 8, "relation": 2}, seed=args.seed + 1, n_boot=args.n_boot, out=out)
    payload = {"command": command, "host": host_info(measure_bf16=False).describe(), "torch": torch.__version__, "transformers": transformers.__version__,
               "sampling": str(base), "speed": speed, "quality": quality, "clip_quality": clip_quality}
    atomic_write_bytes(out / "parallel_decoding.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "parallel_decoding.md", markdown(payload).encode())
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
