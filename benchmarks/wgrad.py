"""The float32 weight-gradient GEMM of `argen.model.Linear` two ways, per shape: oneDNN after a contiguous copy of
x^T (what `_OneDNNLinear.backward` runs below `WGRAD_BLAS_ROWS`) against PyTorch's BLAS reading both transposes in
place. Which wins depends on the host's BLAS, so `WGRAD_BLAS_ROWS` should be read against this on each host kind.

    python benchmarks/wgrad.py                      # the demo GPT's shapes and those of docs/speed.md
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/wgrad.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_host_steps import seconds_per_call  # noqa: E402  (one timing loop for the benchmarks of this page)

from argen.host import host_info  # noqa: E402
from argen.model.onednn import WGRAD_BLAS_ROWS, _onednn_matmul, onednn_available  # noqa: E402

# rows N x (in -> out): the demo GPT's four block GEMMs (batch 32 x 92 tokens), then docs/speed.md's table
SHAPES = ((2944, 256, 1408), (2944, 704, 256), (2944, 256, 768), (2944, 256, 256),
          (16640, 96, 384), (8064, 128, 128), (5120, 512, 128), (2304, 512, 1536))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("oneDNN linears are not available on this build/CPU: nothing to compare.")
    torch.set_num_threads(args.threads)
    print(host_info(measure_bf16=False).describe())
    print(f"| rows N x (in -> out) | oneDNN + copy (ms) | BLAS (ms) | BLAS speed-up | Linear picks (N >= {WGRAD_BLAS_ROWS} (in + out): BLAS) |")
    print("| --- | --- | --- | --- | --- |")
    for n, d_in, d_out in SHAPES:
        gy, x = torch.randn(n, d_out), torch.randn(n, d_in)
        onednn = seconds_per_call(lambda: _onednn_matmul(gy.t(), x.t().contiguous()), args.reps, 3) * 1e3
        blas = seconds_per_call(lambda: gy.t().mm(x), args.reps, 3) * 1e3
        picks = "BLAS" if n >= WGRAD_BLAS_ROWS * (d_in + d_out) else "oneDNN"
        print(f"| {n} x ({d_in} -> {d_out}) | {onednn:.2f} | {blas:.2f} | {onednn / blas:.2f}x | {picks} |")


if __name__ == "__main__":
    main()
