#!/usr/bin/env bash
# Every stage of the 256 px road for a few minutes on one GPU: the GPU tests, then `argen train pipeline` at 256 px
# (the real_256 VQGAN with 16x16 codes, the ~100M gpu_100m GPT, a judge CLIP) on the 256 px icon set with short
# step counts, eager and compiled sampling, parallel decoding's speed, and the GPU's memory in use. Not run yet: no
# GPU has been lent here.
# Usage: bash benchmarks/gpu_smoke.sh [OUT]   (default runs/gpu_smoke; needs CUDA and `pip install -e ".[dev]"`)
set -euo pipefail
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
log() { echo "[gpu_smoke $(date +%H:%M:%S)] $*"; }

log "GPU: $(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")')"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script checks the GPU road")'

log "GPU tests (attention backends, bf16 autocast, CUDA sampling, a bf16 training step)"
python -m pytest -q -m gpu tests/test_gpu.py

log "data: the icon set at 256 px (icons whose largest PNG is at least 128 px)"
python benchmarks/make_icon_folder.py -o "$OUT/icons_256" --size 256 --min-source 128

log "every stage at 256 px, short: tokenizer 300 steps (LPIPS off: no weights file here), GPT 300, judge CLIP 300"
python -m argen train pipeline --dataset "imagefolder:$OUT/icons_256" --resolution 256 -o "$OUT/run" \
    --eval-prompts 40 --eval-reference 40 \
    tokenizer.train.max_steps=300 tokenizer.loss.perceptual_weight=0 tokenizer.train.save_every=100 \
    gpt.train.max_steps=300 gpt.train.save_every=100 clip.train.max_steps=300

log "sampling: eager and compiled decode step, batch 8 with CFG"
python -m argen sample --pipeline "$OUT/run/gpt_run/final" "document open, an action icon" -n 8 -o "$OUT/eager.png"
python -m argen sample --pipeline "$OUT/run/gpt_run/final" "document open, an action icon" -n 8 --compile \
    -o "$OUT/compiled.png"

log "parallel decoding against one token per pass and HF generate (float32 and bf16), batch 8 and 1, CFG off and on"
python benchmarks/parallel_decoding.py --pipeline "$OUT/run/gpt_run/final" --no-judge --hf-bf16 \
    --settings spatial:8 zipar:2 --batches 8 1 --reps 2 -o "$OUT/parallel_decoding"

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
log "done: $OUT/run/report.md"
