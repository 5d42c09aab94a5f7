#!/usr/bin/env bash
# One command that proves the CUDA paths on a GPU and measures them; <= 8 minutes on one H100 80 GB.
#
#   scripts/gpu_check.sh          -> results/gpu_<card>.json and results/gpu_<card>.md
#
# Steps (scripts/gpu_check.py; each guarded: a failure is recorded and the next step runs; exit 1 if any failed):
#   1. the CUDA test tier, `pytest -m cuda` (tests/test_cuda.py);
#   2. llama_60m and llama_130m, micro-batch 32 x 256 tokens, bf16: tokens/s and peak allocated/reserved memory of
#      our loop with AdamW and with GaLore, and of a bare galore-torch loop on the same model and batch;
#   3. `torchrun --nproc_per_node 1` smoke runs on NCCL: DDP, FSDP2, FSDP2 with --layerwise (GaLore, right side);
#   4. llama_7b, 8-bit GaLore, layer-wise, activation checkpointing, micro-batch 1: two steps and a checkpoint, a
#      third resumed from it; measured peaks (the resume's included) against `galore-train memory`.
#
# Needs: a CUDA torch (a stock PyTorch CUDA image has it), the real data in ../shared/data (C4 shards and the T5
# tokenizer, 2.5 MB; GALORE_TRAIN_SHARED_DATA points elsewhere) and the packages the image lacks. Without a
# network those come from wheels carried beside the project: fill wheels/ once, in the same image, with a network:
#     pip download -d wheels transformers datasets sentencepiece protobuf typer rich bitsandbytes peft \
#         matplotlib wandb safetensors galore-torch==1.0 pytest
#     rm -f wheels/torch-* wheels/nvidia_* wheels/triton-*      # the image has its own
# and this script installs what is missing from them (pip --no-index; WHEELS=folder to use another).
#
# Without CUDA it stops at once with one line. GPU_CHECK_DRY_RUN=1 runs every step on the CPU with a tiny model
# and gloo (tests/test_gpu_check.py does, in CI); RESULTS_DIR and GPU_CHECK_WORK move its output and scratch runs.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch here, nothing to check (GPU_CHECK_DRY_RUN=1 dry-runs the steps on the CPU)"
    exit 1
  fi
  # module:package pairs the check imports
  missing=()
  for pair in transformers:transformers datasets:datasets sentencepiece:sentencepiece google.protobuf:protobuf \
    typer:typer rich:rich bitsandbytes:bitsandbytes peft:peft matplotlib:matplotlib wandb:wandb \
    safetensors:safetensors galore_torch:galore-torch==1.0 pytest:pytest; do
    "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    WHEELS=${WHEELS:-wheels}
    if [ ! -d "$WHEELS" ]; then
      echo "gpu_check: missing ${missing[*]} and no $WHEELS/ folder to install them from (see this script's header)"
      exit 1
    fi
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}" || {
      echo "gpu_check: could not install ${missing[*]} from $WHEELS/ (see this script's header)"
      exit 1
    }
  fi
fi
exec "$PYTHON" scripts/gpu_check.py
