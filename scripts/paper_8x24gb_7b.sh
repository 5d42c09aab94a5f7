#!/usr/bin/env bash
# Pre-training LLaMA 7B with the GaLore paper's 7B settings (Zhao et al. 2024, arXiv 2403.03507, Section 5.2)
# on 8 GPUs of 24 GB: 8-bit GaLore + layer-wise weight updates, with FSDP2 sharding weights, gradients and
# optimizer state over the 8 GPUs, at the paper's total batch of 512 x 256 tokens.
#
# GPUs: 8 x 24 GB on one node (RTX 4090 / A10 / L4 class). Several such nodes: run the script on every node
# with NNODES=<n> NODE_RANK=<0..n-1> RDZV_ENDPOINT=<host of node 0>:29500 (n = 1, 2 or 4 keeps 512 divisible).
#
# Expected result: it runs, at about 10 GiB per GPU. `galore-train memory --model llama_7b --optimizer
# galore_adamw --8bit --layerwise --rank 1024 --proj-type right --activation-checkpointing --batch-size 16
# --total-batch-size 512 --nproc 8 --distributed fsdp` estimates 10.1 GiB per GPU (weights 1.57, gradient
# shards held over the 4 micro-batches 1.57, 8-bit moments 0.39, projections 2.17, activations 2.72, the root
# and one decoder layer unsharded 1.73; 16-bit moments: 10.5 GiB). Not run on
# GPUs here. Validation perplexity: the paper's Table 3 for 8-bit GaLore (17.94 / 15.39 / 14.95 / 14.65 after
# 40K / 80K / 120K / 150K steps; scripts/paper_table3_7b.sh runs that table on 64 GPUs).
#
# Settings (`--recipe paper` fills them in): rank 1024, gap 500, scale 0.25, lr 0.005, 150K steps with 15K
# warm-up, cosine to 10%, BF16, total batch 512 (micro-batch 16 x 8 GPUs x 4 accumulated micro-batches).
# Differences from the paper's run, each forced by the setup:
#  - no gradient clipping: layer-wise updates change each parameter before the others' gradients exist
#    (galore-train refuses the combination rather than ignore it);
#  - right-side projections (--proj-type right): under FSDP each GPU holds blocks of rows of every weight
#    matrix, and only the right-side projection G Q^T is row-local (docs/distributed.md). For the m < n MLP
#    down projection this keeps m x r moments instead of r x n.
# Accumulation works with layer-wise updates under FSDP: the hooks of the earlier micro-batches hold only this
# GPU's reduce-scattered gradient shards (1/8 of the gradients), so the paper's batch fits, unlike layer-wise
# on one GPU or under DDP, where the held gradients are whole (scripts/paper_4090_7b.sh trains at batch 16).
#
# Usage: scripts/paper_8x24gb_7b.sh    BATCH=32 ... (accumulation 2)    DRY_RUN=1 ...    MAX_STEPS=20 ...

source "$(dirname "$0")/_common.sh"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
BATCH=${BATCH:-16}

name=llama_7b-galore8bit-layerwise-fsdp-8x24gb
note "7B on $GPUS_PER_NODE GPUs per node, FSDP + layer-wise: $name"
# shellcheck disable=SC2046  # steps expands to several flags on purpose
train "$GPUS_PER_NODE" --model llama_7b --recipe paper --optimizer galore_adamw --8bit --layerwise \
  --distributed fsdp --proj-type right --activation-checkpointing --batch-size "$BATCH" $(steps) \
  --weight-decay 0 --dtype bf16 --eval-every 1000 --eval-tokens 10000000 --save-every 5000 \
  --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-project galore-paper --tag 8x24gb --tag llama_7b

note "memory and throughput of the run"
run galore-train report "$RUNS_DIR/$name" --title "LLaMA 7B on 8 GPUs of 24 GB (FSDP, layer-wise)" \
  --output "$RUNS_DIR/report.md" --csv --plots-dir "$RUNS_DIR/plots"
