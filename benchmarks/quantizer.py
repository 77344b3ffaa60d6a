"""Our VectorQuantizer against vector_quantize_pytorch.VectorQuantize: step time, code usage, perplexity, MSE."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizers_img.metrics import CodebookUsage
from tokenizers_img.quantizers import VectorQuantizer
from tokenizers_img.serialization import atomic_write_bytes
from tokenizers_img.vq_model import VQConfig

_VQ_DEFAULTS = VQConfig()  # "recommended" for ours = the project's own VQConfig defaults


def settings(code_dim: int) -> dict[str, dict[str, dict]]:
    """Per setting, the keyword arguments of each side's quantizer (beyond dim and codebook size).

    plain: each library with its defaults and no codebook-keeping tricks (ours: Euclidean VQ-VAE with codebook
    loss, straight-through; theirs: its defaults, which are EMA codebook with decay 0.8 and the rotation trick).
    matched_ema: one algorithm on both sides: Euclidean EMA codebook (decay 0.99), straight-through, no k-means,
    no restarts; differences are implementation only.
    recommended: ours as VQConfig's defaults (l2-normalised codes, k-means init, dead-code restart after
    `dead_code_threshold` unused steps); theirs as its README recommends for the same goals (cosine similarity,
    k-means init, replace codes whose EMA cluster size falls below 2), keeping its other defaults.
    Both project to `code_dim` channels: ours with Linear layers around the quantizer (as VQModel's quant_conv /
    post_quant_conv), theirs with its own `codebook_dim` projection.
    """
    return {
        "plain": {"ours": {"l2_normalize": False, "kmeans_init": False, "dead_code_threshold": 0},
                  "theirs": {"codebook_dim": code_dim}},
        "matched_ema": {
            "ours": {"l2_normalize": False, "ema": True, "ema_decay": 0.99, "kmeans_init": False,
                     "dead_code_threshold": 0},
            "theirs": {"codebook_dim": code_dim, "decay": 0.99, "rotation_trick": False},
        },
        "recommended": {
            "ours": {"l2_normalize": _VQ_DEFAULTS.l2_normalize, "beta": _VQ_DEFAULTS.beta,
                     "kmeans_init": _VQ_DEFAULTS.kmeans_init, "kmeans_iters": _VQ_DEFAULTS.kmeans_iters,
                     "dead_code_threshold": _VQ_DEFAULTS.dead_code_threshold},
            "theirs": {"codebook_dim": code_dim, "use_cosine_sim": True, "kmeans_init": True, "kmeans_iters": 10,
                       "threshold_ema_dead_code": 2},
        },
    }


class OursAE(nn.Module):
    """x (N, D) -> Linear(D, H) -> Linear(H, c) -> VectorQuantizer(c) -> Linear(c, H) -> Linear(H, D)."""

    def __init__(self, data_dim: int, hidden: int, code_dim: int, codebook_size: int, **vq_kwargs):
        super().__init__()
        self.enc, self.dec = nn.Linear(data_dim, hidden), nn.Linear(hidden, data_dim)
        self.proj_in, self.proj_out = nn.Linear(hidden, code_dim), nn.Linear(code_dim, hidden)
        self.vq = VectorQuantizer(dim=code_dim, codebook_size=codebook_size, **vq_kwargs)

    def _codes_in(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj_in(self.enc(x)), "n c -> 1 c n 1")  # our quantizer takes (B, c, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction (N, D), quantizer loss)."""
        q = self.vq(self._codes_in(x))
        return self.dec(self.proj_out(rearrange(q.quantized, "1 c n 1 -> n c"))), q.loss

    @torch.no_grad()
    def indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(self._codes_in(x)).flatten()


class TheirsAE(nn.Module):
    """x (N, D) -> Linear(D, H) -> VectorQuantize(H, codebook_dim=c) -> Linear(H, D)."""

    def __init__(self, data_dim: int, hidden: int, code_dim: int, codebook_size: int, **vq_kwargs):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.enc, self.dec = nn.Linear(data_dim, hidden), nn.Linear(hidden, data_dim)
        self.vq = VectorQuantize(dim=hidden, codebook_size=codebook_size, **vq_kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, _, loss = self.vq(self.enc(x).unsqueeze(0))  # (1, N, H)
        return self.dec(quantized[0]), loss.sum()

    @torch.no_grad()
    def indices(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training  # in eval mode VectorQuantize leaves its codebook and statistics alone
        return self.vq(self.enc(x).unsqueeze(0))[1].flatten()


# ---- data: (N, D) float batches ----------------------------------------------------------------------------------

@dataclass
class VectorData:
    """Training batches drawn by `sample(n, generator)` and a fixed held-out set (list of (N, D) batches)."""

    name: str
    dim: int
    sample: Callable[[int, torch.Generator], torch.Tensor]
    heldout: list[torch.Tensor]
    description: str


def clustered_data(*, dim: int, latent_dim: int, clusters: int, noise: float, zipf: float, batch: int,
                   heldout_batches: int, seed: int) -> VectorData:
    """A Gaussian mixture in R^dim: `clusters` centres drawn in a random `latent_dim`-d subspace (unit variance per
    coordinate), weights ~ rank^-zipf (in random order), isotropic noise of sd `noise` in all `dim` coordinates."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, latent_dim, generator=g)).Q  # (dim, latent_dim), orthonormal columns
    centres = torch.randn(clusters, latent_dim, generator=g) @ basis.T  # (clusters, dim)
    weights = torch.arange(1, clusters + 1, dtype=torch.float64).pow(-zipf)
    weights = weights[torch.randperm(clusters, generator=g)]

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        return centres[idx] + noise * torch.randn(n, dim, generator=generator)

    hg = torch.Generator().manual_seed(seed + 1)
    heldout = [sample(batch, hg) for _ in range(heldout_batches)]
    desc = (f"synthetic Gaussian mixture in {dim}-d: {clusters} centres ~ N(0, I) in a random {latent_dim}-d "
            f"subspace, weights proportional to rank^-{zipf}, noise sd {noise}")
    return VectorData("synthetic", dim, sample, heldout, desc)


def patch_data(root: str, *, patch: int, batch: int, heldout_batches: int, max_images: int | None) -> VectorData:
    """Non-overlapping patch x patch RGB patches (values in [-1, 1]) of an image folder's train and val splits."""
    from argen.data.registry import build_dataset

    def patches(split: str) -> torch.Tensor:
        ds = build_dataset(f"imagefolder:{root}", split=split, resolution=64)
        n = len(ds) if max_images is None else min(len(ds), max_images)
        images = torch.stack([ds[i]["image"] for i in range(n)])  # (B, 3, 64, 64)
        return rearrange(images, "b c (h p) (w q) -> (b h w) (c p q)", p=patch, q=patch).contiguous()

    train, val = patches("train"), patches("val")

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        return train[torch.randint(train.shape[0], (n,), generator=generator)]

    heldout = list(val[: batch * heldout_batches].split(batch))
    desc = (f"{patch}x{patch} RGB patches ({3 * patch * patch}-d) of imagefolder:{root}: {train.shape[0]} train "
            f"patches sampled with replacement, held-out = the val split's first {sum(len(h) for h in heldout)} patches")
    return VectorData("patches", 3 * patch * patch, sample, heldout, desc)


# ---- measurements ------------------------------------------------------------------------------------------------

def build(impl: str, setting: dict, *, data_dim: int, args: argparse.Namespace, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # same seed for every model; the quantizers draw k-means/restarts from the global RNG
    cls = OursAE if impl == "ours" else TheirsAE
    return cls(data_dim, args.hidden, args.code_dim, args.codebook_size, **setting[impl])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    recon, vq_loss = model(x)
    loss = F.mse_loss(recon, x) + vq_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def heldout_metrics(model: nn.Module, data: VectorData, codebook_size: int) -> dict:
    was = model.training
    model.eval()
    usage = CodebookUsage(codebook_size)
    se, n = 0.0, 0
    for x in data.heldout:
        usage.update(model.indices(x))
        recon, _ = model(x)
        se += float((recon - x).pow(2).sum())
        n += x.numel()
    model.train(was)
    return {"usage": usage.usage, "used_codes": int((usage.counts > 0).sum()), "perplexity": usage.perplexity,
            "mse": se / n}


def time_steps(models: dict[str, nn.Module], data: VectorData, args: argparse.Namespace) -> dict[str, dict]:
    """Median seconds per train step of each model, timed round-robin (one step each per round) on one batch."""
    x = data.sample(args.batch, torch.Generator().manual_seed(args.seed))
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in models.items()}
    for _ in range(args.warmup):  # includes k-means init on the first call
        for k, m in models.items():
            train_step(m, opts[k], x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.reps):
        for k, m in models.items():
            start = time.perf_counter()
            train_step(m, opts[k], x)
            times[k].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "reps": len(v)}
            for k, v in times.items()}


def fit(model: nn.Module, data: VectorData, args: argparse.Namespace) -> dict:
    """Train for args.steps on the same batch sequence for every model; held-out metrics along the way."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = train_step(model, opt, data.sample(args.batch, gen))
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "train_loss": loss, **heldout_metrics(model, data, args.codebook_size)})
    return {"final": curve[-1], "curve": curve, "fit_seconds": time.perf_counter() - start}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    datasets = []
    for spec in args.data:
        if spec == "synthetic":
            datasets.append(clustered_data(dim=args.synthetic_dim, latent_dim=8, clusters=args.synthetic_clusters,
                                           noise=0.1, zipf=0.5, batch=args.batch,
                                           heldout_batches=args.heldout_batches, seed=args.seed))
        elif spec.startswith("patches:"):
            datasets.append(patch_data(spec.split(":", 1)[1], patch=4, batch=args.batch,
                                       heldout_batches=args.heldout_batches, max_images=args.max_images))
        else:
            raise ValueError(f"--data entries must be 'synthetic' or 'patches:PATH', got {spec!r}.")
    cfg = settings(args.code_dim)
    models = {f"{s}/{impl}": build(impl, cfg[s], data_dim=datasets[0].dim, args=args, seed=args.seed)
              for s in cfg for impl in ("ours", "theirs")}
    timing = time_steps(models, datasets[0], args)
    fits = {}
    for data in datasets:
        for key in models:
            setting, impl = key.split("/")
            model = build(impl, cfg[setting], data_dim=data.dim, args=args, seed=args.seed)
            fits[f"{data.name}/{key}"] = fit(model, data, args)
            print(f"{data.name}/{key}: {fits[f'{data.name}/{key}']['final']}", flush=True)
    ratios = {}
    for setting in cfg:
        r = {"step_time": timing[f"{setting}/ours"]["median_s"] / timing[f"{setting}/theirs"]["median_s"]}
        for data in datasets:
            ours, theirs = fits[f"{data.name}/{setting}/ours"]["final"], fits[f"{data.name}/{setting}/theirs"]["final"]
            for m in ("usage", "perplexity", "mse"):
                r[f"{data.name}/{m}"] = ours[m] / theirs[m] if theirs[m] else math.inf
        ratios[setting] = r
    from importlib.metadata import version

    return {
        "settings": {s: {impl: {k: v for k, v in kw.items()} for impl, kw in d.items()} for s, d in cfg.items()},
        "data": {d.name: d.description for d in datasets},
        "timing": timing, "fits": fits, "ratios_ours_over_theirs": ratios,
        "environment": {"torch": torch.__version__, "vector_quantize_pytorch": version("vector-quantize-pytorch"),
                        "threads": args.threads, "machine": platform.processor() or platform.machine(),
                        "note": "shared 2-core CPU machine: absolute times are noisy, the ratios (same process, "
                                "round-robin) are what count"},
    }


def to_markdown(result: dict, *, command: str, args: argparse.Namespace) -> str:
    t, fits, ratios = result["timing"], result["fits"], result["ratios_ours_over_theirs"]
    setup = (f"Codebook {args.codebook_size} codes of dim {args.code_dim}; model Linear(D,{args.hidden}) -> "
             f"quantizer -> Linear({args.hidden},D); Adam lr {args.lr}; batch {args.batch} vectors; {args.steps} fit "
             f"steps; torch threads {args.threads}. {result['environment']['note']}.")
    lines = [f"Command: `{command}`", "", setup, "",
             "## Time per training step (forward + backward + Adam step)", "",
             "| setting | ours ms | theirs ms | ours/theirs |", "| --- | --- | --- | --- |"]
    for s in ratios:
        lines.append(f"| {s} | {t[f'{s}/ours']['median_s'] * 1e3:.2f} | {t[f'{s}/theirs']['median_s'] * 1e3:.2f} "
                     f"| {ratios[s]['step_time']:.2f} |")
    timed = (f"Median of {args.reps} steps after {args.warmup} warm-up steps, timed round-robin on the "
             f"{next(iter(result['data']))} data.")
    legend = ("usage = fraction of the codebook used at least once; perplexity = exp(entropy) of the held-out code "
              "histogram; mse = reconstruction mean squared error.")
    head = ("| data | setting | usage ours | usage theirs | perplexity ours | perplexity theirs | mse ours | "
            "mse theirs | usage ratio | perplexity ratio | mse ratio |")
    lines += ["", timed, "", "## After the fit, on held-out vectors", "", legend, "", head, "|" + " --- |" * 11]
    for d in result["data"]:
        for s in ratios:
            o, th = fits[f"{d}/{s}/ours"]["final"], fits[f"{d}/{s}/theirs"]["final"]
            lines.append(f"| {d} | {s} | {o['usage']:.3f} | {th['usage']:.3f} | {o['perplexity']:.0f} | "
                         f"{th['perplexity']:.0f} | {o['mse']:.4f} | {th['mse']:.4f} | {ratios[s][f'{d}/usage']:.2f} | "
                         f"{ratios[s][f'{d}/perplexity']:.2f} | {ratios[s][f'{d}/mse']:.2f} |")
    lines += ["", "## Settings", ""]
    for s, d in result["settings"].items():
        lines.append(f"- {s}: ours `VectorQuantizer({', '.join(f'{k}={v}' for k, v in d['ours'].items())})`; theirs "
                     f"`VectorQuantize({', '.join(f'{k}={v}' for k, v in d['theirs'].items())})` (other arguments "
                     "at their defaults)")
    lines += ["", "## Data", ""] + [f"- {k}: {v}" for k, v in result["data"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", default=["synthetic"],
                        help="'synthetic' and/or 'patches:PATH' (4x4 patches of an image folder, e.g. /work/data/real64)")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--code-dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048, help="vectors per step")
    parser.add_argument("--steps", type=int, default=800, help="fit steps per model")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--heldout-batches", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--synthetic-dim", type=int, default=32)
    parser.add_argument("--synthetic-clusters", type=int, default=4096)
    parser.add_argument("--max-images", type=int, default=None, help="cap on images read per split for patches:")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/quantizer"))
    args = parser.parse_args(argv)
    command = "python benchmarks/quantizer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    payload = {"command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               **result}
    args.out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(result, command=command, args=args)
    for name, body in (("quantizer.json", json.dumps(payload, indent=2)), ("quantizer.md", text)):
        atomic_write_bytes(args.out / name, body.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
