"""Step times of the demo's two training loops on this host, to estimate the demo's time on a host with fewer ISA
extensions: the shapes tokenizer's step (float32, as the demo trains it) and the demo GPT's (bf16 autocast with
--bf16, as the demo trains it where bf16 is native; float32 otherwise), plus a 1024^3 float32 GEMM rate. Two threads.
Also the per-image costs of the demo's other stages: VQ encoding (stage 3), VQ decoding (code features and stage 6)
and sampling 64 image tokens as stage 6 does (a batch of 256 rows, one generator per row, top-k 4, T 0.5), all with
random weights: they time the same operations as the trained models.

    python benchmarks/demo_host_steps.py --bf16 --compile          # as the demo runs on this host
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/demo_host_steps.py --compile             # the same kernels capped at AVX2, float32

With --compile the GPT step is timed both eagerly and through torch.compile (as `train.compile: auto` trains it where
a C++ compiler is found; Inductor's generated kernels follow ATEN_CPU_CAPABILITY), after the compilation.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from argen.demo import GPT_CONFIG, TOKENIZER_CONFIG
from argen.layout import SequenceLayout
from argen.model import GPT, onednn_available, pack_for_cpu
from argen.sample import SamplingConfig, decode_image_tokens
from argen.tasks.gpt import GPTExperiment, gpt_config_for, sequence_loss
from argen.tasks.tokenizer import TokenizerExperiment
from tokenizers_img.config import load_config
from tokenizers_img.vq_model import VQModel


def seconds_per_call(fn, n: int = 20, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bf16", action="store_true", help="train the GPT step under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time the GPT step through torch.compile")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gflops = 2 * 1024**3 / seconds_per_call(lambda: a @ b, 20, 3) / 1e9

    vq_config = load_config(TOKENIZER_CONFIG, TokenizerExperiment).model
    vq = VQModel(vq_config)
    vq_opt, images = torch.optim.AdamW(vq.parameters()), torch.rand(32, 3, 32, 32)

    def tokenizer_step() -> None:
        (vq(images).reconstruction.float() - images).pow(2).mean().backward()
        vq_opt.step()
        vq_opt.zero_grad()

    # the demo GPT (its YAML) at the demo tokenizers' sizes: the shapes BPE's 357 tokens, the VQ's code pairs
    experiment = load_config(GPT_CONFIG, GPTExperiment)
    layout = SequenceLayout(text_vocab_size=357, pad_id=0, text_len=experiment.data.text_len,
                            num_codes=vq_config.num_codes, image_grid=(vq_config.grid_size,) * 2)
    gpt = GPT(gpt_config_for(experiment.model, layout, code_factors=(vq_config.codebook_size, vq_config.colour_codes)))
    gpt_opt = torch.optim.AdamW(gpt.parameters())
    text_ids = torch.randint(1, 357, (32, experiment.data.text_len))
    codes = torch.randint(0, vq_config.num_codes, (32, vq_config.grid_size**2))

    def gpt_step(model: torch.nn.Module = gpt) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = sequence_loss(model, text_ids, codes, layout=layout).loss
        loss.backward()
        gpt_opt.step()
        gpt_opt.zero_grad()

    vq.eval()
    scenes, grids = torch.rand(500, 3, 32, 32) * 2 - 1, torch.randint(0, vq_config.num_codes, (256, vq_config.grid_size**2))
    sampler = (pack_for_cpu(gpt) if onednn_available() else gpt).eval()
    prefix = layout.prefix(torch.randint(1, 357, (256, experiment.data.text_len)))  # text ids, then BOI

    def sample() -> None:
        decode_image_tokens(sampler, prefix, image_offset=layout.image_offset, num_codes=layout.num_codes,
                            config=SamplingConfig(temperature=0.5, top_k=4),
                            generator=[torch.Generator().manual_seed(i) for i in range(256)])

    def compiled_step() -> str:
        if not args.compile:
            return ""
        compiled = torch.compile(gpt)
        start = time.perf_counter()
        gpt_step(compiled)
        gpt_step(compiled)
        compile_s = time.perf_counter() - start
        return f" (compiled {seconds_per_call(lambda: gpt_step(compiled)) * 1e3:.0f} ms, after {compile_s:.0f} s for its first two steps)"

    with torch.inference_mode():
        encode = seconds_per_call(lambda: vq.encode(scenes), 5, 1) / 500
        decode = seconds_per_call(lambda: vq.decode(grids), 5, 1) / 256
        per_image = seconds_per_call(sample, 3, 1) / 256
    print(f"ISA cap {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}, GPT {'bf16' if args.bf16 else 'float32'}, "
          f"{args.threads} threads: GEMM fp32 {gflops:.0f} GFLOP/s, tokenizer step {seconds_per_call(tokenizer_step) * 1e3:.0f} ms, "
          f"GPT step {seconds_per_call(gpt_step) * 1e3:.0f} ms{compiled_step()}; per image: VQ encode {encode * 1e3:.2f} ms, "
          f"VQ decode {decode * 1e3:.2f} ms, sampling {per_image * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
