#!/usr/bin/env bash
# LLaMA 7B with the GaLore paper's batch (512 sequences of 256 tokens per step) on ONE 24 GB GPU (issue 24):
# 8-bit GaLore, layer-wise updates, INT8 weights with stochastic rounding, and the 32 micro-batches of 16 summed
# in the projected space (R = P^T G, r x n per matrix) instead of as full gradients.
#
# GPUs: 1 x RTX 4090 / any GPU with >= 24 GB.
#
# Expected result: it runs, at the paper's recipe and batch. Estimate (`galore-train memory` with the flags below):
# 17.24 GiB peak = INT8 weights 6.61 + held gradients 3.81 (low-rank R of the 224 matrices; full gradients of
# embeddings, lm_head, norms and of the one matrix whose projection the step refreshes, --stagger-refresh being
# implied; plus the one being formed) + 8-bit states 3.56 + 4-bit projections 0.45 + activations 2.71 + one
# dequantized matrix 0.08. Without INT8 weights 23.09 GiB, without projected accumulation 25.98 GiB: it takes both.
# Not in the estimate: the CUDA context, the allocator's fragmentation and the SVD workspace at a refresh (~0.5 GB),
# within the 24 GB - 17.24 GiB (18.5 GB) margin.
# Every refresh takes its SVD from the step's whole 512-sequence gradient; for the first projections step 0 replays
# its micro-batches 4 times (4 groups of matrices whose full gradients fit in what later steps hold: docs/int8.md).
# No gradient clipping (layer-wise updates cannot clip the global norm).
#
# Usage: scripts/int8_7b_512batch_24gb.sh    DRY_RUN=1 scripts/int8_7b_512batch_24gb.sh    MAX_STEPS=20 ...

source "$(dirname "$0")/_common.sh"

name=llama_7b-galore8bit-int8-batch512-24gb
note "7B, batch 512, one 24 GB GPU: $name"
# shellcheck disable=SC2046  # steps expands to several flags on purpose
train 1 --model llama_7b --recipe paper --optimizer galore_adamw --8bit --layerwise --activation-checkpointing \
  --batch-size 16 --total-batch-size 512 --proj-bits 4 --int8-weights --accumulate-projected $(steps) \
  --weight-decay 0 --dtype bf16 --eval-every 1000 --eval-tokens 10000000 --save-every 1000 \
  --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-project galore-int8 --tag llama_7b --tag int8

note "memory and throughput of the run"
run galore-train report "$RUNS_DIR/$name" --title "LLaMA 7B, batch 512, one 24 GB GPU (INT8 weights)" \
  --output "$RUNS_DIR/report.md" --csv --plots-dir "$RUNS_DIR/plots"
