#!/usr/bin/env bash
# LLaMA 7B in the least memory galore-train reaches (issue 24): GaLore-Adafactor (factored second moment, no first
# moment), 4-bit projections, layer-wise updates, activation checkpointing, micro-batch 1, INT8 weights with
# stochastic rounding.
#
# GPUs: 1 GPU with >= 8 GB (e.g. an RTX 3070 / 4060 Ti 8 GB at the edge, 10-12 GB cards with room).
#
# Expected result: it runs. Estimate (`galore-train memory` with the flags below): 7.40 GiB peak = INT8 weights
# 6.61 + one gradient 0.24 (the embedding's) + states 0.01 + 4-bit projections 0.45 + one dequantized matrix 0.08
# (activations, 0.17, are below the gradient). APOLLO-Mini the same way: 7.93 GiB; 8-bit GaLore-AdamW: 10.95 GiB.
# The weights are now 89% of it: below this, the embeddings and lm_head (0.49 GiB in bf16) or the INT8 codes
# themselves would have to shrink. Not in the estimate: CUDA context, fragmentation, the SVD workspace at a refresh.
# Batch: 1 sequence per step (accumulating more would hold gradients; see int8_7b_512batch_24gb.sh for the 512 batch).
#
# Usage: scripts/int8_7b_smallest.sh    DRY_RUN=1 scripts/int8_7b_smallest.sh    MAX_STEPS=20 scripts/int8_7b_smallest.sh

source "$(dirname "$0")/_common.sh"

name=llama_7b-galore_adafactor-int8-smallest
note "7B in the least memory: $name"
# shellcheck disable=SC2046  # steps expands to several flags on purpose
train 1 --model llama_7b --recipe paper --optimizer galore_adafactor --layerwise --activation-checkpointing \
  --batch-size 1 --total-batch-size 1 --proj-bits 4 --int8-weights $(steps) \
  --weight-decay 0 --dtype bf16 --eval-every 1000 --eval-tokens 10000000 --save-every 5000 \
  --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-project galore-int8 --tag llama_7b --tag int8

note "memory and throughput of the run"
run galore-train report "$RUNS_DIR/$name" --title "LLaMA 7B in the least memory (INT8 weights)" \
  --output "$RUNS_DIR/report.md" --csv --plots-dir "$RUNS_DIR/plots"
