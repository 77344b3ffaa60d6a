"""Parallel decoding (speculative Jacobi: exact; row-parallel ZipAR-style: approximate) against one token per pass
and Hugging Face `generate`: forward passes per image, images/s, and the judge's whole-prompt accuracy with a paired
bootstrap interval; JSON + markdown + PNG."""

from __future__ import annotations

import argparse
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
from argen.model import GPT, GPTConfig, onednn_available, pack_for_cpu  # noqa: E402
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


def measure_speed(gpt: GPT, hf, *, prefix: torch.Tensor, uncond: torch.Tensor, image_offset: int, num_codes: int,
                  configs: dict[str, SamplingConfig], reps: int, seed: int) -> dict:
    """Seconds per batch (best of `reps`, settings interleaved) and forward passes per batch, ours and HF."""
    from transformers import LogitsProcessorList

    B, N = prefix.shape[0], gpt.config.num_image_tokens
    base = next(iter(configs.values()))
    rows = torch.cat([prefix, uncond.expand(B, -1)]) if base.uses_cfg else prefix
    processors = LogitsProcessorList([hf_processor(image_offset=image_offset, num_codes=num_codes,
                                                   cfg_scale=base.cfg_scale if base.uses_cfg else None)])
    times: dict[str, list[float]] = {name: [] for name in [*configs, "hf"]}
    passes: dict[str, int] = {}
    for _ in range(reps):  # the first rep also warms up; the best is reported
        for name, config in configs.items():
            gens = [torch.Generator().manual_seed(seed + i) for i in range(B)]
            start = time.perf_counter()
            out = decode_image_tokens(gpt, prefix, image_offset=image_offset, num_codes=num_codes, uncond_prefix=uncond,
                                      config=config, generator=gens)
            times[name].append(time.perf_counter() - start)
            passes[name] = out.forward_passes
        if hf is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(rows, attention_mask=torch.ones_like(rows), do_sample=True, temperature=1.0, top_k=None,
                            top_p=None, max_new_tokens=N, min_new_tokens=N, logits_processor=processors,
                            pad_token_id=0, eos_token_id=None)
            times["hf"].append(time.perf_counter() - start)
            passes["hf"] = N
    best = {name: min(t) for name, t in times.items() if t}
    return {"batch": B, "cfg": base.uses_cfg, "seconds": times, "forward_passes_per_batch": passes,
            "images_per_s": {n: B / t for n, t in best.items()},
            "speedup_vs_token": {n: best["token"] / t for n, t in best.items()},
            "speedup_vs_hf": {n: best["hf"] / t for n, t in best.items()} if "hf" in best else {}}


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


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}`", "", f"Host: {payload['host']}, torch {payload['torch']}.", ""]
    for block in payload["speed"]:
        lines += [f"### {block['model']}", "", block["about"], "",
                  "| batch | CFG | setting | forward passes per batch | images/s | vs token | vs HF `generate` |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in block["rows"]:
            for name, ips in r["images_per_s"].items():
                vs_hf = r["speedup_vs_hf"].get(name)
                lines.append(f"| {r['batch']} | {'on' if r['cfg'] else 'off'} | {name} | "
                             f"{r['forward_passes_per_batch'][name]} | {ips:.2f} | "
                             f"{r['speedup_vs_token'][name]:.2f}x | {f'{vs_hf:.2f}x' if vs_hf else ''} |")
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/gpt_run/final"),
                        help="the demo's pipeline directory (`argen demo` writes it to demo/gpt_run/final)")
    parser.add_argument("--report", type=Path, default=None,
                        help="the demo's report.json: its chosen sampler setting (default: PIPELINE/../../report.json)")
    parser.add_argument("--settings", nargs="+", default=["spatial:8", "spatial:16", "jacobi:8", "zipar:1", "zipar:2", "zipar:4"],
                        help="parallel settings DECODING:WINDOW beside token (for zipar the window is the rows' lag)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--relation-prompts", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--random-gpt", action="store_true",
                        help="also time the 8 x 512 benchmark GPT of benchmarks/sampling.py (random weights)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/parallel_decoding"))
    args = parser.parse_args(argv)
    command = "python benchmarks/parallel_decoding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = claim_output_dir(args.out, kind="benchmark")
    import transformers

    pipe = Pipeline.load(args.pipeline)
    report = args.report or args.pipeline.parent.parent / "report.json"
    chosen = json.loads(report.read_text())["sampling"] if report.is_file() else {}
    base = SamplingConfig(cfg_scale=chosen.get("cfg_scale", 2.0), cfg_schedule=chosen.get("cfg_schedule", "constant"),
                          temperature=chosen.get("temperature", 0.25), top_k=chosen.get("top_k", 4))
    layout = pipe.layout
    gpt = pipe.sampler_gpt()
    _, hf = build_pair(pipe.gpt.config, seed=args.seed)  # a same-size Llama (without code features or position table)
    relation = prompt_set("relation", max_prompts=max(args.batches))
    speed_rows = []
    guided = base.cfg_scale if base.cfg_scale > 1 else 2.0  # a demo whose sweep chose no guidance still gets CFG rows
    for batch in args.batches:
        text = pipe.text.encode([relation[i % len(relation)] for i in range(batch)], text_len=layout.text_len)
        prefix = layout.prefix(text)
        for cfg_on in (False, True):
            config = SamplingConfig(**{**base.__dict__, "cfg_scale": guided if cfg_on else 1.0})
            row = measure_speed(gpt, hf, prefix=prefix, uncond=layout.uncond_prefix(), image_offset=layout.image_offset,
                                num_codes=layout.num_codes, configs=settings(config, args.settings),
                                reps=args.reps, seed=args.seed)
            print(json.dumps({k: row[k] for k in ("batch", "cfg", "speedup_vs_token", "speedup_vs_hf")}), flush=True)
            speed_rows.append(row)
    speed = [{"model": f"demo GPT ({args.pipeline})",
              "about": f"{pipe.gpt.num_params() / 1e6:.1f}M parameters, {layout.prefix_len}-token prefix, "
                       f"{layout.num_image_tokens} image tokens, {layout.num_codes} codes; sampling {base} (CFG off: "
                       f"scale 1; CFG on: scale {guided:g}); relation prompts; ours on the pipeline's CPU sampling copy (oneDNN-packed, "
                       f"{pipe.sampling_precision}: the default here); HF on a same-size float32 Llama with random "
                       "weights.",
              "rows": speed_rows}]
    if args.random_gpt:
        cfg = GPTConfig(vocab_size=300 + 1 + 1024, prefix_len=32, image_grid=(16, 16), n_layer=8, n_head=8, n_embd=512)
        ours, hf_big = build_pair(cfg, seed=args.seed)
        ours = pack_for_cpu(ours, bf16=pipe.sampling_precision == "bf16") if onednn_available() else ours
        rows = []
        for batch in args.batches:
            g = torch.Generator().manual_seed(args.seed)
            prefix = torch.randint(1, 300, (batch, 32), generator=g)
            prefix[:, -1] = 300
            uncond = torch.zeros(32, dtype=torch.long)
            uncond[-1] = 300
            for cfg_on in (False, True):
                config = SamplingConfig(temperature=1.0, cfg_scale=4.0 if cfg_on else 1.0)
                rows.append(measure_speed(ours, hf_big, prefix=prefix, uncond=uncond, image_offset=301, num_codes=1024,
                                          configs=settings(config, args.settings), reps=args.reps,
                                          seed=args.seed))
                print(json.dumps({k: rows[-1][k] for k in ("batch", "cfg", "speedup_vs_token", "speedup_vs_hf")}),
                      flush=True)
        speed.append({"model": "benchmark GPT, 8 x 512, random weights",
                      "about": f"{ours.config.n_layer} layers x {ours.config.n_embd}, 1024 codes, 16 x 16 image tokens, "
                               f"{pipe.sampling_precision} as the demo GPT, "
                               "temperature 1, CFG scale 4 where on. Random weights predict nearly uniform codes, so "
                               "Jacobi drafts (q = the last prediction) are accepted almost always and copied ones "
                               "almost never: the speed here says what a pass costs, not what a trained model gains.",
                      "rows": rows})
    configs = settings(base, args.settings)
    quality = measure_quality(pipe, configs, prompts={"single": prompt_set("single", max_prompts=16),
                                                      "relation": prompt_set("relation", max_prompts=args.relation_prompts)},
                              per_prompt={"single": 8, "relation": 2}, seed=args.seed + 1, n_boot=args.n_boot, out=out)
    payload = {"command": command, "host": host_info(measure_bf16=False).describe(), "torch": torch.__version__, "transformers": transformers.__version__,
               "sampling": str(base), "speed": speed, "quality": quality}
    atomic_write_bytes(out / "parallel_decoding.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "parallel_decoding.md", markdown(payload).encode())
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
