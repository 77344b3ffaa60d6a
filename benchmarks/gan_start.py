"""PSNR before and after the GAN starts: a VQGAN run beside the same run without GAN, from their eval logs (PNG + markdown)."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from argen.tasks.tokenizer import TokenizerExperiment  # noqa: E402
from tokenizers_img.config import load_config  # noqa: E402

COLUMNS = ("val/psnr", "val/ssim", "val/codebook_usage", "val/judge_agreement")


def read_eval(run: Path) -> dict[int, dict[str, float]]:
    file = run / "logs" / "eval.csv"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: give a run directory of `argen train tokenizer` with eval_every > 0.")
    with open(file) as fh:
        return {int(row["step"]): {k: float(row[k]) for k in COLUMNS if row.get(k)} for row in csv.DictReader(fh)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gan-run", type=Path, required=True, help="run dir of the VQGAN config (e.g. shapes_32_gan)")
    parser.add_argument("--gan-config", type=Path, required=True, help="its YAML (for the GAN schedule)")
    parser.add_argument("--plain-run", type=Path, required=True, help="the same recipe without GAN")
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/gan_start"))
    args = parser.parse_args(argv)
    command = "python benchmarks/gan_start.py " + " ".join(sys.argv[1:] if argv is None else argv)
    loss = load_config(args.gan_config, TokenizerExperiment).loss
    gan, plain = read_eval(args.gan_run), read_eval(args.plain_run)
    d_start, g_start = loss.disc_start, loss.disc_start + loss.disc_d_only_steps
    g_full = g_start + loss.disc_ramp_steps

    lines = [f"Command: `{command}`", "",
             f"Discriminator trains from step {d_start}; the decoder hears it from step {g_start}, at full weight "
             f"({loss.disc_weight}, adaptive) from step {g_full}. Whole val split at every step shown.", "",
             "| step | GAN phase | PSNR with GAN (dB) | PSNR without (dB) | SSIM with / without | judge agreement with / without |",
             "| --- | --- | --- | --- | --- | --- |"]
    for step in sorted(gan):
        # eval at step N follows N optimizer steps (0..N-1), so the GAN has acted on it only for N > start
        phase = "off" if step <= d_start else "discriminator only" if step <= g_start else "on"
        g, p = gan[step], plain.get(step, {})
        fmt = (lambda d, k, f: f.format(d[k]) if k in d else "n/a")  # noqa: E731
        lines.append(f"| {step} | {phase} | {fmt(g, 'val/psnr', '{:.2f}')} | {fmt(p, 'val/psnr', '{:.2f}')} | "
                     f"{fmt(g, 'val/ssim', '{:.3f}')} / {fmt(p, 'val/ssim', '{:.3f}')} | "
                     f"{fmt(g, 'val/judge_agreement', '{:.2%}')} / {fmt(p, 'val/judge_agreement', '{:.2%}')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gan_start.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for runs, label in ((gan, "with GAN"), (plain, "without GAN")):
        steps = sorted(runs)
        ax.plot(steps, [runs[s]["val/psnr"] for s in steps], marker="o", label=label)
    ax.axvline(d_start, color="grey", ls=":", label="discriminator starts")
    ax.axvspan(g_start, g_full, color="orange", alpha=0.15, label="generator weight ramps up")
    ax.set_xlabel("step")
    ax.set_ylabel("val PSNR (dB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "gan_start.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
