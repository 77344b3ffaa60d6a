"""`argen` with accelerate's FSDP2 path allowed on CPU, for the multi-process tests (see
train_toy_script.allow_fsdp_on_cpu): `accelerate launch --use_fsdp --fsdp_version 2 tests/cli_fsdp_cpu.py train ...`."""

from __future__ import annotations

import sys

from train_toy_script import allow_fsdp_on_cpu

from argen.cli import main

if __name__ == "__main__":
    allow_fsdp_on_cpu()
    sys.exit(main(sys.argv[1:]))
