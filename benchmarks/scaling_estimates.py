"""What one training sample of the GPU configs costs, measured on the CPU: parameters, the bytes autograd saves for the
backward (saved-tensor hooks) in float32 and under bf16 autocast, and the FLOPs of forward + backward (torch's
FlopCounterMode for the tokenizer; for the GPT, whose oneDNN linears it does not see, 6 x weights x tokens + attention). docs/scaling.md turns these into memory and time per GPU and at 8 GPUs.

    python benchmarks/scaling_estimates.py -o benchmarks/results/scaling

GPT: argen/configs/gpt/gpu_100m.yaml and gpu_300m.yaml with an 8192-token BPE and the 16x16 codes of a 16384-code VQ
(sequence 64 + 1 + 256). Tokenizer: argen/configs/tokenizer/real_256.yaml (VQ + PatchGAN; LPIPS with random weights:
the VGG16 it runs is the same), measured at micro-batches of 1 and 2, each model in its own process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from argen.host import cpu_model

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def saved_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Counts the bytes of every tensor autograd saves for the backward (each storage once), but for the storages in
    `exclude` (the parameters: they are in memory anyway)."""
    total, seen = [0], set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def measure(step: Callable[[int], torch.Tensor], modules: list[torch.nn.Module], *, bf16: bool,
            count_flops: bool) -> dict[str, float]:
    """What autograd saves for the backward of `step(batch)` (which returns the loss), at batches 1 and 2: the bytes
    per sample (the difference) and the bytes that do not grow with the batch (under autocast, the bf16 copies of
    the weights). With `count_flops`, the forward + backward FLOPs of aten's matmuls and convolutions of one sample."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    sizes = []
    for batch in (1, 2):
        with saved_bytes(params) as saved, autocast:
            loss = step(batch)
        sizes.append(saved[0])
        del loss
    out = {"activation_bytes_per_sample": sizes[1] - sizes[0], "saved_bytes_fixed": 2 * sizes[0] - sizes[1]}
    if count_flops:
        counter = FlopCounterMode(display=False)
        with counter:
            with autocast:
                loss = step(1)
            loss.backward()
        out["counted_flops_per_sample"] = counter.get_total_flops()
    return out


def gpt_flops(model, *, tokens: int) -> float:
    """Forward + backward FLOPs of one sequence: 6 per matmul weight and token (the input embedding is a lookup) plus
    attention's 12 * layers * tokens^2 * width (QK^T and AV, forward and twice backward). The GPT's linears run
    oneDNN kernels that FlopCounterMode does not see, hence the formula."""
    cfg = model.config
    matmul = model.num_params() - model.tok_emb.weight.numel() * (not cfg.tie_embeddings)
    return 6.0 * matmul * tokens + 12.0 * cfg.n_layer * tokens**2 * cfg.n_embd


def gpt_numbers(preset: str, *, bf16: bool) -> dict:
    from argen.configs import resolve
    from argen.layout import SequenceLayout
    from argen.model.gpt import GPT
    from argen.tasks.gpt import GPTExperiment, gpt_config_for, sequence_loss
    from tokenizers_img.config import load_config

    exp = load_config(resolve("gpt", preset), GPTExperiment)
    layout = SequenceLayout(text_vocab_size=8192, pad_id=0, text_len=exp.data.text_len, num_codes=16384,
                            image_grid=(16, 16))
    torch.manual_seed(0)
    model = GPT(gpt_config_for(exp.model, layout)).train()
    text = torch.randint(1, 8192, (2, exp.data.text_len))
    codes = torch.randint(0, 16384, (2, 256))
    out = measure(lambda b: sequence_loss(model, text[:b], codes[:b], layout=layout).loss, [model], bf16=bf16,
                  count_flops=False)
    return {"params": model.num_params(), "sequence": layout.seq_len, "vocab": layout.vocab_size,
            "layers": model.config.n_layer, "width": model.config.n_embd,
            "flops_per_sample": gpt_flops(model, tokens=layout.seq_len - 1), **out}


def tokenizer_numbers(*, bf16: bool) -> dict:
    from argen.configs import resolve
    from argen.tasks.tokenizer import TokenizerExperiment
    from tokenizers_img.config import load_config
    from tokenizers_img.discriminator import PatchDiscriminator
    from tokenizers_img.losses import VQGANLoss
    from tokenizers_img.lpips import LPIPS
    from tokenizers_img.vq_model import VQModel

    exp = load_config(resolve("tokenizer", "real_256"), TokenizerExperiment,
                      ["loss.lpips_path=null", "loss.perceptual_weight=0", "model.kmeans_init=false"])
    torch.manual_seed(0)
    vq, disc, loss = VQModel(exp.model).train(), PatchDiscriminator(exp.discriminator).train(), VQGANLoss(exp.loss)
    loss.lpips = LPIPS().eval().requires_grad_(False)  # random weights, the same VGG16 work as the real ones
    loss.config = type(exp.loss)(**{**exp.loss.__dict__, "perceptual_weight": 1.0})
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    step = exp.loss.disc_start + exp.loss.disc_d_only_steps + exp.loss.disc_ramp_steps  # both GAN terms on

    def train_step(batch: int) -> torch.Tensor:
        x = images[:batch]
        out = vq(x)
        g = loss.generator_loss(x, out.reconstruction, quantizer_loss=out.quantizer_output.loss,
                                last_layer=vq.last_decoder_layer, step=step, discriminator=disc)
        d = loss.discriminator_loss(x, out.reconstruction, step=step, discriminator=disc)
        return g.total + d.total

    out = measure(train_step, [vq, disc, loss.lpips], bf16=bf16, count_flops=not bf16)  # FLOPs: of the float32 run
    return {"vq_params": sum(p.numel() for p in vq.parameters()), "disc_params": sum(p.numel() for p in disc.parameters()),
            "lpips_params": sum(p.numel() for p in loss.lpips.parameters()), **out}


MODELS = {"gpt_100m": lambda bf16: gpt_numbers("gpu_100m", bf16=bf16),
          "gpt_300m": lambda bf16: gpt_numbers("gpu_300m", bf16=bf16),
          "tokenizer_real_256": lambda bf16: tokenizer_numbers(bf16=bf16)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help="measure one (in its own process)")
    p.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks" / "results" / "scaling")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.one:
        name, precision = args.one
        print(json.dumps(MODELS[name](precision == "bf16_autocast")))
        return 0
    report: dict = {"host": cpu_model(), "torch": torch.__version__,
                    "command": "python benchmarks/scaling_estimates.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for precision in ("float32", "bf16_autocast"):
        report[precision] = {}
        for name in MODELS:  # one process each: the memory of one does not stay for the next
            run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", name, precision],
                                 capture_output=True, text=True, check=True)
            report[precision][name] = json.loads(run.stdout.strip().splitlines()[-1])
            print(precision, name, report[precision][name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
