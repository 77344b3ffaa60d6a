"""Summarise a real-image tokenizer run: codebook usage, dead codes and PSNR over training, as JSON, markdown and a plot."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from tokenizers_img.serialization import atomic_write_bytes


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def summarise(run: Path, *, usage_floor: float, manifest: Path | None) -> dict:
    evals = read_csv(run / "logs" / "eval.csv")
    train = read_csv(run / "logs" / "metrics.csv")
    if not evals:
        raise ValueError(f"{run}/logs/eval.csv has no evaluations; train with train.eval_every > 0.")
    task = json.loads((run / "task_config.json").read_text())
    train_cfg = yaml.safe_load((run / "train_config.yaml").read_text())
    loss = task["loss"]
    usage = [e["val/codebook_usage"] for e in evals]
    below = [int(e["step"]) for e in evals if e["val/codebook_usage"] < usage_floor]
    out = {
        "run": str(run),
        "data": task["data"]["spec"],
        "steps": int(train[-1]["step"]) if train else 0,
        "batch_size": train_cfg["batch_size"],
        "gan": {"disc_weight": loss["disc_weight"], "disc_start": loss["disc_start"],
                "generator_gan_from": loss["disc_start"] + loss["disc_d_only_steps"],
                "ramp_steps": loss["disc_ramp_steps"]},
        "model": {k: task["model"][k] for k in ("base_channels", "ch_mult", "codebook_size", "codebook_dim",
                                                 "l2_normalize", "kmeans_init", "dead_code_threshold")},
        "usage_floor": usage_floor,
        "evals_below_floor": below,
        "min_usage": min(usage), "final": evals[-1],
        "max_train_dead_codes": max((r.get("dead_codes", 0.0) for r in train), default=0.0),
        "evals": evals,
        "train_log": [{k: r[k] for k in ("step", "dead_codes", "perplexity", "rec", "g_adv", "g_factor") if k in r}
                      for r in train],
    }
    if manifest is not None and manifest.is_file():
        m = json.loads(manifest.read_text())
        out["dataset"] = {k: m[k] for k in ("what", "num_images", "num_photos", "num_val_photos", "num_val_images",
                                            "split_note")}
    return out


def split_coverage(run: Path, *, data_spec: str, seed: int) -> list[dict]:
    """Usage of the final tokenizer and of each kept checkpoint on the val split, on a same-size random subset of
    the train split and on the whole train split: tells codes that are dead from codes the val photos never need."""
    import safetensors.torch
    import torch
    from torch.utils.data import Subset

    from argen.data.registry import build_dataset
    from argen.eval.tokenizer import evaluate_tokenizer
    from tokenizers_img.vq_model import VQModel

    final = VQModel.from_pretrained(run / "final" / "tokenizer")
    res = final.config.resolution
    val, train = (build_dataset(data_spec, split=s, resolution=res) for s in ("val", "train"))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(val)].tolist()
    sets = {"val": val, f"train subset ({len(val)} crops)": Subset(train, pick), "train (all)": train}
    models = {}
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        model = VQModel(final.config)
        model.load_state_dict(safetensors.torch.load_file(str(ckpt / "module.vq.safetensors")), strict=True)
        models[f"checkpoint {int(ckpt.name.split('_')[1])}"] = model
    models["final"] = final
    rows = []
    for name, model in models.items():
        for set_name, ds in sets.items():
            if set_name == "train (all)" and name != "final":
                continue
            m = evaluate_tokenizer(model, ds, batch_size=250)
            rows.append({"model": name, "images": set_name, "num_images": m.num_images, "usage": m.codebook_usage,
                         "used_codes": m.used_codes, "perplexity": m.perplexity, "psnr": m.psnr})
            print(rows[-1], flush=True)
    return rows


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, tr = summary["evals"], summary["train_log"]
    steps = [e["step"] for e in ev]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(steps, [100 * e["val/codebook_usage"] for e in ev], "o-", label="val codebook usage (%)")
    ax.axhline(100 * summary["usage_floor"], color="grey", ls=":", label=f"{100 * summary['usage_floor']:.0f}% floor")
    ax.set_ylim(0, 102)
    ax.set_xlabel("step")
    ax.set_ylabel("% of codes used on the val split")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in tr], [r.get("dead_codes", 0) for r in tr], color="tab:red", alpha=0.6, lw=1,
             label=f"train dead codes (unused {summary['model']['dead_code_threshold']} steps)")
    ax2.set_ylabel("dead codes (train)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    ax.set_title("codebook usage")
    axes[1].plot(steps, [e["val/psnr"] for e in ev], "o-", color="tab:green")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("val PSNR (dB)")
    axes[1].set_title("reconstruction PSNR")
    axes[2].plot(steps, [e["val/perplexity"] for e in ev], "o-", color="tab:purple", label="val (whole split)")
    axes[2].plot([r["step"] for r in tr], [r.get("perplexity", 0) for r in tr], color="tab:purple", alpha=0.35,
                 lw=1, label="train (one batch)")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("code perplexity")
    axes[2].set_title(f"perplexity (of {summary['model']['codebook_size']} codes)")
    axes[2].legend(fontsize=8)
    control = summary.get("control")
    if control:
        cs = [e["step"] for e in control["evals"]]
        label = f"control: {control['label']}"
        ax.plot(cs, [100 * e["val/codebook_usage"] for e in control["evals"]], "s--", color="tab:blue", alpha=0.5,
                label=label)
        axes[1].plot(cs, [e["val/psnr"] for e in control["evals"]], "s--", color="tab:green", alpha=0.5, label=label)
        axes[2].plot(cs, [e["val/perplexity"] for e in control["evals"]], "s--", color="tab:purple", alpha=0.5,
                     label=label)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
        axes[1].legend(["this run", label], fontsize=8, loc="upper left")
        axes[2].legend(fontsize=8)
    gan = summary["gan"]
    if gan["disc_weight"] > 0:
        for a in axes:
            a.axvline(gan["disc_start"], color="k", ls="--", lw=0.8)
            a.axvline(gan["generator_gan_from"], color="k", ls="-.", lw=0.8)
        axes[1].text(0.98, 0.02, f"--: discriminator starts ({gan['disc_start']})\n-.: GAN loss reaches the "
                     f"generator ({gan['generator_gan_from']})", transform=axes[1].transAxes, fontsize=8, ha="right")
    fig.suptitle(f"{summary['data']}: {summary['steps']} steps, batch {summary['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(summary: dict, *, command: str, train_command: str | None) -> str:
    lines = [f"Command: `{command}`", ""]
    if train_command:
        lines += [f"Training: `{train_command}`", ""]
    if "dataset" in summary:
        lines += [(f"Data: {summary['dataset']['what']} ({summary['dataset']['num_val_images']} val crops of "
                  f"{summary['dataset']['num_val_photos']} held-out photos; {summary['dataset']['split_note']})."), ""]
    m, gan = summary["model"], summary["gan"]
    lines += [(f"Model: base {m['base_channels']}, ch_mult {m['ch_mult']}, {m['codebook_size']} codes of dim "
              f"{m['codebook_dim']} (l2 {m['l2_normalize']}, k-means {m['kmeans_init']}, dead-code restart after "
              f"{m['dead_code_threshold']} unused steps). GAN: discriminator from step {gan['disc_start']}, generator "
              f"adversarial term from {gan['generator_gan_from']} ramping over {gan['ramp_steps']} steps "
              f"(disc_weight {gan['disc_weight']})."), "",
              "| step | val usage | used codes | val perplexity | val PSNR (dB) | val SSIM |", "|" + " --- |" * 6]
    for e in summary["evals"]:
        lines.append(f"| {int(e['step'])} | {100 * e['val/codebook_usage']:.1f}% | {int(e['val/used_codes'])} | "
                     f"{e['val/perplexity']:.0f} | {e['val/psnr']:.2f} | {e['val/ssim']:.3f} |")
    verdict = ("every evaluation is at or above it" if not summary["evals_below_floor"] else
               f"evaluations below it at steps {summary['evals_below_floor']}")
    if summary.get("control"):
        c = summary["control"]
        lines += ["", f"Control run `{c['run']}` ({c['label']}; otherwise the same command):", "",
                  "| step | val usage | used codes | val perplexity | val PSNR (dB) | val SSIM |", "|" + " --- |" * 6]
        for e in c["evals"]:
            lines.append(f"| {int(e['step'])} | {100 * e['val/codebook_usage']:.1f}% | {int(e['val/used_codes'])} | "
                         f"{e['val/perplexity']:.0f} | {e['val/psnr']:.2f} | {e['val/ssim']:.3f} |")
    if summary.get("coverage"):
        lines += ["", "Usage of the same tokenizer on different image sets (all codes of every image of the set):", "",
                  "| tokenizer | images | n | usage | used codes | perplexity | PSNR (dB) |", "|" + " --- |" * 7]
        for r in summary["coverage"]:
            lines.append(f"| {r['model']} | {r['images']} | {r['num_images']} | {100 * r['usage']:.1f}% | "
                         f"{r['used_codes']} | {r['perplexity']:.0f} | {r['psnr']:.2f} |")
    lines += ["", (f"Val usage floor {100 * summary['usage_floor']:.0f}%: {verdict}; minimum "
              f"{100 * summary['min_usage']:.1f}%. Most codes counted dead during training (unused for "
              f"{m['dead_code_threshold']} steps, before their restart): {int(summary['max_train_dead_codes'])}."),
              "", ("Usage and perplexity are over every code of the whole val split (argen.eval.tokenizer); the "
              "CPU timings behind this run come from a 2-core machine shared with other jobs.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="train.out_dir of an `argen train tokenizer` run")
    parser.add_argument("--manifest", type=Path, default=Path("/work/data/real64/manifest.json"),
                        help="manifest.json written by benchmarks/make_real_folder.py (optional)")
    parser.add_argument("--train-command", default=None, help="the training command, recorded in the report")
    parser.add_argument("--usage-floor", type=float, default=0.95)
    parser.add_argument("--control", type=Path, default=None, help="a second run to draw beside this one")
    parser.add_argument("--control-label", default="control")
    parser.add_argument("--coverage", action="store_true",
                        help="also measure usage of the final tokenizer and kept checkpoints on val and train images")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/real_images"))
    args = parser.parse_args(argv)
    command = "python benchmarks/real_images_report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = summarise(args.run, usage_floor=args.usage_floor, manifest=args.manifest)
    if args.control is not None:
        summary["control"] = {"run": str(args.control), "label": args.control_label,
                              "evals": read_csv(args.control / "logs" / "eval.csv")}
    if args.coverage:
        summary["coverage"] = split_coverage(args.run, data_spec=summary["data"], seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "train_command": args.train_command, **summary}
    text = to_markdown(summary, command=command, train_command=args.train_command)
    for name, body in (("summary.json", json.dumps(payload, indent=2)), ("summary.md", text)):
        atomic_write_bytes(args.out / name, body.encode())
    plot(summary, args.out / "usage_psnr.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
