#!/usr/bin/env bash
# GaLore paper (Zhao et al. 2024, arXiv 2403.03507) on LLaMA 1B, two parts:
#
# PART=figure3: GaLore applied to three optimizers (Figure 3). AdamW, 8-bit Adam and Adafactor, each
#   alone and with GaLore at rank 512 and 1024 (d_model 2048), 10K steps on C4, validation perplexity
#   over training. GPUs: 8 x A100-80GB per run (micro-batch 16, total batch 512 x 256), like Table 2's 1B.
#   Expected: for every optimizer, GaLore at rank 512 and 1024 ends close to the optimizer alone
#   (the paper's curves overlap at the end; see its Figure 3), so GaLore is optimizer-agnostic.
#
# PART=table8: memory and throughput (Table 8). AdamW, Adafactor, 8-bit Adam and 8-bit GaLore (rank 512),
#   each with and without --layerwise, 300 steps each. GPUs: 1 x A100-80GB (layer-wise updates are
#   single-process). Total batch = micro-batch 16 x 256 tokens: with --layerwise, accumulating several
#   micro-batches would keep a full gradient buffer and hide the saving being measured.
#   Expected (qualitative; compare the numbers with the paper's Table 8): 8-bit GaLore has the lowest
#   peak memory, layer-wise updates lower every optimizer's peak by about the size of the gradients
#   (2 bytes x 1.3B parameters in BF16), and GaLore's throughput stays close to its base optimizer's
#   (the SVD refresh runs once every 200 steps). Compare with `galore-train memory --model llama_1b
#   --compare --rank 512`. The report shows measured peak memory by component and tokens/s per run.
#
# Settings as Table 2 (see paper_table2.sh): BF16, cosine with 10% warm-up down to 10%, GaLore lr 0.01,
# scale 0.25, gap 200. ASSUMPTION: the baselines' lr is not published; 0.001 is used for AdamW, 8-bit
# Adam and Adafactor (override LR_BASE), 0.01 for every GaLore variant (override LR_GALORE).
#
# Usage: PART=figure3 scripts/paper_table8_memory_1b.sh    PART=table8 ...    (default: both)
#        DRY_RUN=1 ...    MAX_STEPS=20 ...

source "$(dirname "$0")/_common.sh"

PART=${PART:-"figure3 table8"}
GPUS=${GPUS:-8}
LR_BASE=${LR_BASE:-0.001}
LR_GALORE=${LR_GALORE:-0.01}
COMMON=(--model llama_1b --max-length 256 --scheduler cosine --min-lr-ratio 0.1 --weight-decay 0 --dtype bf16
        --wandb-project galore-paper --tag llama_1b)

# optimizer_flags NAME: the optimizer (full rank or GaLore, 8-bit or not) and its lr.
optimizer_flags() {
  case $1 in
    adamw)             echo "--optimizer adamw --lr $LR_BASE" ;;
    adam8bit)          echo "--optimizer adamw --8bit --lr $LR_BASE" ;;
    adafactor)         echo "--optimizer adafactor --lr $LR_BASE" ;;
    galore_adamw-r*)   echo "--optimizer galore_adamw --rank ${1#*-r} --gap 200 --scale 0.25 --lr $LR_GALORE" ;;
    galore_adam8bit-r*) echo "--optimizer galore_adamw --8bit --rank ${1#*-r} --gap 200 --scale 0.25 --lr $LR_GALORE" ;;
    galore_adafactor-r*) echo "--optimizer galore_adafactor --rank ${1#*-r} --gap 200 --scale 0.25 --lr $LR_GALORE" ;;
    *)                 echo "unknown optimizer $1" >&2; exit 2 ;;
  esac
}

figure3() {
  local dirs=()
  for base in adamw adam8bit adafactor; do
    for variant in "$base" "galore_$base-r512" "galore_$base-r1024"; do
      local name=figure3-$variant
      note "Figure 3: $name"
      # shellcheck disable=SC2046  # optimizer_flags and steps expand to several flags on purpose
      train "$GPUS" "${COMMON[@]}" $(optimizer_flags "$variant") --batch-size 16 --total-batch-size 512 \
        $(steps 10000 1000) --eval-every 1000 --eval-tokens 10000000 --save-every 10000 \
        --output-dir "$RUNS_DIR/$name" --run-name "$name" --tag figure3
      dirs+=("$RUNS_DIR/$name")
    done
  done
  note "Figure 3 from the runs: validation perplexity over tokens per optimizer"
  run galore-train report "${dirs[@]}" --title "GaLore paper Figure 3 reproduction (1B)" \
    --output "$RUNS_DIR/figure3.md" --csv --plots-dir "$RUNS_DIR/figure3-plots"
}

table8() {
  local dirs=()
  for variant in adamw adafactor adam8bit galore_adam8bit-r512; do
    for mode in plain layerwise; do
      local name=table8-$variant-$mode layerwise=()
      [[ "$mode" == layerwise ]] && layerwise=(--layerwise)
      note "Table 8: $name"
      # shellcheck disable=SC2046  # optimizer_flags and steps expand to several flags on purpose
      train 1 "${COMMON[@]}" $(optimizer_flags "$variant") "${layerwise[@]}" --batch-size 16 --total-batch-size 16 \
        $(steps 300 30) --eval-every 300 --eval-tokens 1000000 --save-every 300 \
        --output-dir "$RUNS_DIR/$name" --run-name "$name" --tag table8
      dirs+=("$RUNS_DIR/$name")
    done
  done
  note "Table 8 from the runs: measured peak memory by component and tokens/s"
  run galore-train report "${dirs[@]}" --title "GaLore paper Table 8 reproduction (1B memory and throughput)" \
    --output "$RUNS_DIR/table8.md" --csv --plots-dir "$RUNS_DIR/table8-plots"
}

for part in $PART; do
  case $part in
    figure3|table8) "$part" ;;
    *) echo "unknown PART $part (known: figure3 table8)" >&2; exit 2 ;;
  esac
done
