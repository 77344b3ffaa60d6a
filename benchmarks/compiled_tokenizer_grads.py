"""Does `torch.compile` give a tokenizer the gradients eager mode gives? One training forward and backward of a
tokenizer preset's VQ model on the same random images, eagerly and compiled (Inductor), in float32 and under bf16
autocast; per module, the relative difference of the gradients. `TokenizerTask.compile_problem` keeps tokenizers
eager under bf16 autocast on the CPU because of what this shows on torch 2.13; run it again on a new torch:

    python benchmarks/compiled_tokenizer_grads.py --config real_64 --threads 2 -o OUT

writes OUT/compiled_tokenizer_grads.json and prints one line per precision and module.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from argen.configs import resolve
from argen.host import host_info
from argen.tasks.tokenizer import TokenizerExperiment
from tokenizers_img.config import load_config
from tokenizers_img.serialization import atomic_write_bytes, claim_output_dir
from tokenizers_img.vq_model import VQModel

MODULES = ("encoder", "quant_conv", "quantizer", "post_quant_conv", "decoder")


def gradients(model: VQModel, images: torch.Tensor, *, compiled: bool, bf16: bool) -> dict[str, torch.Tensor]:
    """The flattened gradient of each of MODULES after one L1 reconstruction + quantizer loss on a copy of model."""
    model = copy.deepcopy(model)
    forward = torch.compile(model) if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(images)
        loss = (out.reconstruction.float() - images).abs().mean() + out.quantizer_output.loss
    loss.backward()
    return {name: torch.cat([p.grad.flatten() for p in getattr(model, name).parameters() if p.grad is not None])
            for name in MODULES if any(True for _ in getattr(model, name).parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="real_64", help="a tokenizer preset name or YAML path")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    experiment = load_config(resolve("tokenizer", args.config), TokenizerExperiment)
    model = VQModel(experiment.model).train()
    size = experiment.model.resolution
    images = torch.rand(args.batch, experiment.model.in_channels, size, size) * 2 - 1
    model(images)  # k-means initialisation, eagerly, so both runs start from the same codebook
    rows = {}
    for precision, bf16 in (("float32", False), ("bf16 autocast", True)):
        torch._dynamo.reset()
        eager = gradients(model, images, compiled=False, bf16=bf16)
        compiled = gradients(model, images, compiled=True, bf16=bf16)
        rows[precision] = {name: {"eager_norm": eager[name].norm().item(), "compiled_norm": compiled[name].norm().item(),
                                  "relative_difference": ((compiled[name] - eager[name]).norm()
                                                          / eager[name].norm().clamp(min=1e-30)).item()}
                           for name in eager}
        for name, r in rows[precision].items():
            print(f"{precision:14s} {name:16s} |grad| eager {r['eager_norm']:.4g}, compiled {r['compiled_norm']:.4g}, "
                  f"relative difference {r['relative_difference']:.3g}", flush=True)
    out = claim_output_dir(args.out, kind="benchmark")
    record = {"command": "python " + " ".join(sys.argv), "host": host_info(measure_bf16=False).describe(),
              "torch": torch.__version__, "config": args.config, "batch": args.batch, "gradients": rows}
    atomic_write_bytes(out / "compiled_tokenizer_grads.json", (json.dumps(record, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
