#!/usr/bin/env bash
# GaLore paper (Zhao et al. 2024, arXiv 2403.03507), Table 2: pre-training LLaMA 60M / 130M / 350M / 1B
# on C4 with Full-Rank (AdamW), GaLore, Low-Rank, LoRA and ReLoRA.
#
# GPUs (as the reference scripts): 60M and 130M on 1 A100-80GB, 350M on 4, 1B on 8 (one node each).
# Micro-batches are sized for 80 GB; the total batch stays 512 x 256 tokens on any GPU count
# (accumulation is derived), e.g. GPUS_1B=4 MICRO_1B=16 runs 1B on 4 GPUs.
#
# Expected result (paper, Table 2: validation perplexity, and weights + optimizer-state memory in BF16):
#                  60M            130M           350M           1B
#   Full-Rank      34.06 (0.36G)  25.08 (0.76G)  18.80 (2.06G)  15.56 (7.80G)
#   GaLore         34.88 (0.24G)  25.36 (0.52G)  18.95 (1.22G)  15.64 (4.38G)
#   Low-Rank       78.18 (0.26G)  45.51 (0.54G)  37.41 (1.08G)  142.53 (3.57G)
#   LoRA           34.99 (0.36G)  33.92 (0.80G)  25.58 (1.76G)  19.21 (6.17G)
#   ReLoRA         37.04 (0.36G)  29.37 (0.80G)  29.08 (1.76G)  18.33 (6.17G)
#   r / d_model    128 / 256      256 / 768      256 / 1024     512 / 2048
#   tokens         1.1B           2.2B           6.4B           13.1B
#
# Settings, from the paper (Section 5.1, Appendix C.1, Tables 2 and 5) and the reference scripts
# (github.com/jiaweizzhao/GaLore, scripts/benchmark_c4): total batch 512 sequences of 256 tokens, BF16,
# cosine schedule with 10% linear warm-up down to 10% of the peak lr, no weight decay, evaluation on
# 10M held-out tokens every 1000 steps; GaLore lr 0.01, scale 0.25, gap 200, rank as above.
# Steps 10K / 20K / 60K / 100K (Table 5 and the reference scripts: 1.3B / 2.6B / 7.9B / 13.1B token
# positions; Table 2's header gives 1.1B / 2.2B / 6.4B / 13.1B tokens). Every run uses `--recipe paper`
# (galore_train/recipes.py, listed by `galore-train recipes`), the one copy of the rank, steps, lr,
# batch and schedule above; this script adds the GPUs, micro-batches and the methods' own flags.
#
# ASSUMPTIONS (not published): the paper tunes every baseline's lr over {0.01, 0.005, 0.001, 0.0005,
# 0.0001} and keeps the best by validation perplexity, but does not list the winners
# (github.com/jiaweizzhao/GaLore/issues/68). Here each baseline runs at 0.001 (override with LR_FULL,
# LR_LOW_RANK, LR_LORA, LR_RELORA), or LR_SWEEP=1 runs every method over the paper's whole grid (5x the
# GPU time); run names carry the lr only when it is not the recipe's. LoRA/ReLoRA use alpha 32 and
# dropout 0.1, ReLoRA restarts every 5000 steps with a 100-step warm-up, prunes 99.9% of the adapter
# optimizer state and has no full-rank warm start (the ReLoRA code's defaults). The 1B rank is Table 2's 512 (the reference 1B script uses 1024).
#
# Usage: scripts/paper_table2.sh            # everything (weeks of A100 time)
#        SIZES="60m" METHODS="full galore" scripts/paper_table2.sh
#        DRY_RUN=1 scripts/paper_table2.sh  # print the commands;  MAX_STEPS=20 ...  # smoke test
# Then:  galore-train report runs/paper_table2/* (the script does this at the end).

source "$(dirname "$0")/_common.sh"

SIZES=${SIZES:-"60m 130m 350m 1b"}
METHODS=${METHODS:-"full galore low_rank lora relora"}
LR_SWEEP=${LR_SWEEP:-0}
PAPER_LR_GRID="0.01 0.005 0.001 0.0005 0.0001"

declare -A GPUS=([60m]=${GPUS_60M:-1} [130m]=${GPUS_130M:-1} [350m]=${GPUS_350M:-4} [1b]=${GPUS_1B:-8})
declare -A MICRO=([60m]=${MICRO_60M:-256} [130m]=${MICRO_130M:-256} [350m]=${MICRO_350M:-128} [1b]=${MICRO_1B:-16})
# The lr of each method: empty for the recipe's (GaLore 0.01, the others 0.001).
declare -A LR=([full]=${LR_FULL:-} [galore]=${LR_GALORE:-} [low_rank]=${LR_LOW_RANK:-}
               [lora]=${LR_LORA:-} [relora]=${LR_RELORA:-})

# method_flags METHOD: the optimizer/method and its own settings (rank, gap, scale: the recipe's).
method_flags() {
  case $1 in
    full)     echo "--optimizer adamw" ;;
    galore)   echo "--optimizer galore_adamw" ;;
    low_rank) echo "--optimizer low_rank" ;;
    lora)     echo "--optimizer lora --lora-alpha 32 --lora-dropout 0.1" ;;
    relora)   echo "--optimizer relora --lora-alpha 32 --lora-dropout 0.1 --relora-reset 5000 --restart-warmup-steps 100 --optimizer-reset-ratio 0.999" ;;
    *)        echo "unknown method $1 (known: full galore low_rank lora relora)" >&2; exit 2 ;;
  esac
}

for method in $METHODS; do method_flags "$method" > /dev/null; done  # stop at once on a typo
for size in $SIZES; do [[ -n "${GPUS[$size]:-}" ]] || { echo "unknown size $size (known: ${!GPUS[*]})" >&2; exit 2; }; done

run_dirs=()
for size in $SIZES; do
  for method in $METHODS; do
    lrs=${LR[$method]:-recipe}
    [[ "$LR_SWEEP" == 1 ]] && lrs=$PAPER_LR_GRID
    for lr in $lrs; do
      lr_flags=()
      name=llama_${size}-${method}
      [[ "$lr" != recipe ]] && lr_flags=(--lr "$lr") && name=$name-lr$lr
      note "Table 2: $name"
      # shellcheck disable=SC2046  # method_flags and steps expand to several flags on purpose
      train "${GPUS[$size]}" --model "llama_$size" --recipe paper $(method_flags "$method") "${lr_flags[@]}" \
        --batch-size "${MICRO[$size]}" $(steps) --weight-decay 0 --dtype bf16 \
        --eval-every 1000 --eval-tokens 10000000 --save-every 10000 \
        --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-project galore-paper --tag table2 --tag "llama_$size"
      run_dirs+=("$RUNS_DIR/$name")
    done
  done
done

note "Table 2 from the runs (missing or unfinished runs are marked)"
run galore-train report "${run_dirs[@]}" --title "GaLore paper Table 2 reproduction" \
  --output "$RUNS_DIR/table2.md" --csv --plots-dir "$RUNS_DIR/plots"
