"""Host facts: the device is named, its extensions listed from /proc/cpuinfo, its GEMM speed measured."""

from __future__ import annotations

import dataclasses

import torch

from argen.host import CPU_EXTENSIONS, cpu_extensions, gemm_gflops, host_info


def test_host_info_names_the_device_and_measures_it():
    info = host_info(measure_bf16=False)
    assert info.fp32_gflops > 0 and info.bf16_gflops is None and info.threads == torch.get_num_threads()
    assert info.device in info.describe() and "GFLOP/s" in info.describe()
    assert set(cpu_extensions()) <= {name for _, name in CPU_EXTENSIONS}
    assert gemm_gflops(torch.bfloat16, n=64, reps=1) > 0


def test_host_description_counts_threads_in_words():
    info = host_info(measure_bf16=False)
    one, two = (dataclasses.replace(info, threads=n).describe() for n in (1, 2))
    assert ", 1 thread: GEMM" in one and ", 2 threads: GEMM" in two
