#!/usr/bin/env bash
# GaLore paper (Zhao et al. 2024, arXiv 2403.03507), the headline claim: pre-training LLaMA 7B on ONE
# 24 GB consumer GPU (RTX 4090) with 8-bit GaLore + layer-wise weight updates.
#
# GPUs: 1 x RTX 4090 (24 GB) or any GPU with >= 24 GB.
#
# Expected result: it runs. Memory (paper Figure 1 and the reference single-GPU scripts): 22.72 GB at
# micro-batch 1 without activation checkpointing, 22.8 GB at micro-batch 16 with it (0.37 s/iteration at
# batch 1 on the reference). `galore-train memory --model llama_7b --optimizer galore_adamw --8bit
# --layerwise --rank 1024 --activation-checkpointing --batch-size 16` estimates it before you start.
#
# Settings (paper Section 5.2 and scripts/single_gpu/llama_7b_checkpointing.sh of the reference; `--recipe
# paper` fills them in): rank 1024, gap 500, scale 0.25, lr 0.005, 150K steps with 15K warm-up, cosine
# to 10%, BF16, activation checkpointing, micro-batch 16 (BATCH=1 NO_CHECKPOINTING=1 gives the paper's batch-1 variant).
# Two deliberate differences from the reference:
#  - no gradient clipping: layer-wise updates change each parameter before the others' gradients exist,
#    so the global norm cannot be clipped (galore-train refuses the combination rather than ignore it);
#  - total batch = micro-batch: with --layerwise, accumulating micro-batches keeps a full gradient
#    buffer (13.5 GB for 7B in BF16), which would not fit in 24 GB. The reference asked for a total batch
#    of 512 but, in layer-wise mode, silently updated on every micro-batch, i.e. the same effective batch.
#
# Usage: scripts/paper_4090_7b.sh    DRY_RUN=1 scripts/paper_4090_7b.sh    MAX_STEPS=20 scripts/paper_4090_7b.sh

source "$(dirname "$0")/_common.sh"

BATCH=${BATCH:-16}
checkpointing=(--activation-checkpointing)
[[ "${NO_CHECKPOINTING:-0}" == 1 ]] && checkpointing=()

name=llama_7b-galore8bit-layerwise-4090
note "single-GPU 7B: $name"
# shellcheck disable=SC2046  # steps expands to several flags on purpose
train 1 --model llama_7b --recipe paper --optimizer galore_adamw --8bit --layerwise "${checkpointing[@]}" \
  --batch-size "$BATCH" --total-batch-size "$BATCH" $(steps) --weight-decay 0 --dtype bf16 \
  --eval-every 1000 --eval-tokens 10000000 --save-every 5000 \
  --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-project galore-paper --tag rtx4090 --tag llama_7b

note "memory and throughput of the run"
run galore-train report "$RUNS_DIR/$name" --title "LLaMA 7B on one 24 GB GPU" \
  --output "$RUNS_DIR/report.md" --csv --plots-dir "$RUNS_DIR/plots"
