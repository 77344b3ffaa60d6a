"""What machine this is: the CPU (or GPU) by name, the vector extensions that decide its speed, and its measured GEMM
throughput, so a run's timings can be read against the host that produced them."""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flags that change how fast the CPU runs our GEMMs, and the name we print for each.
CPU_EXTENSIONS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))


@dataclass(frozen=True)
class HostInfo:
    """The device, its extensions and measured GEMM throughput in GFLOP/s (bf16 None where not measured)."""

    device: str
    extensions: tuple[str, ...]
    threads: int
    fp32_gflops: float
    bf16_gflops: float | None

    def describe(self) -> str:
        ext = ", ".join(self.extensions) or "no AVX2"
        bf16 = f", bf16 {self.bf16_gflops:.0f}" if self.bf16_gflops is not None else ""
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        return (f"{self.device} ({ext}), {threads}: GEMM fp32 {self.fp32_gflops:.0f}{bf16} GFLOP/s "
                "(measured now)")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_extensions() -> tuple[str, ...]:
    """Which of CPU_EXTENSIONS this CPU lists (empty where /proc/cpuinfo cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ()
    return tuple(name for flag, name in CPU_EXTENSIONS if flag in flags)


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: CUDA when available, else the CPU) computes bf16 natively: a CUDA GPU with bf16
    support, or an x86 CPU whose /proc/cpuinfo lists avx512_bf16 or amx_bf16 (oneDNN then runs bf16 convolutions
    and GEMMs faster than float32; without them it emulates bf16, slower than float32). False where that cannot be
    read. Decides `mixed_precision: auto` in training and `precision="auto"` in sampling."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and any(name in cpu_extensions() for name in ("AVX512-BF16", "AMX"))


def gemm_gflops(dtype: torch.dtype, *, n: int = 1024, reps: int = 5, device: str = "cpu") -> float:
    """Best-of-`reps` throughput of an (n x n) @ (n x n) product in `dtype`, GFLOP/s. On an x86 CPU in float32 it is
    oneDNN's GEMM, the one argen's Linear layers run (PyTorch's default BLAS can be several times slower there)."""
    from argen.model.onednn import onednn_available

    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    onednn = device == "cpu" and dtype == torch.float32 and onednn_available()
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "") if onednn else a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def compile_problem(device: torch.device | str) -> str | None:
    """Why `torch.compile` (Inductor) cannot compile for `device` here, or None when it can: on a CPU it builds C++
    kernels and needs a C++ compiler (and Python's headers), on CUDA it needs Triton. Decided once per device kind,
    by compiling a one-line function (a few seconds, most of them the compiler stack's start-up, which a real
    compilation pays anyway)."""
    return _compile_problem(torch.device(device).type)


@functools.cache
def _compile_problem(kind: str) -> str | None:
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile on CUDA needs Triton (pip install triton), and it is not installed"
    elif kind != "cpu":
        return f"argen compiles for the CPU and CUDA only, not {kind}"
    else:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as err:  # Inductor raises several kinds when no compiler is found
            return (f"torch.compile on the CPU needs a C++ compiler, and none was found ({err}); install g++ or "
                    "clang++ (or set CXX)")
    try:
        torch.compile(_compile_probe, dynamic=False)(torch.ones(2, device=kind))
    except Exception as err:  # a broken tool chain (missing headers, a bad CXX) fails here, not in the first step
        return f"torch.compile failed on a one-line function ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
    return None


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def host_info(*, measure_bf16: bool = True) -> HostInfo:
    """This machine's HostInfo: the CUDA GPU when there is one, else the CPU (bf16 measured where it can run)."""
    if torch.cuda.is_available():
        name, ext, dev = torch.cuda.get_device_name(), ("CUDA",), "cuda"
    else:
        name, ext, dev = cpu_model(), cpu_extensions(), "cpu"
    bf16 = gemm_gflops(torch.bfloat16, device=dev) if measure_bf16 else None
    return HostInfo(device=name, extensions=ext, threads=torch.get_num_threads(),
                    fp32_gflops=gemm_gflops(torch.float32, device=dev), bf16_gflops=bf16)
