#!/usr/bin/env bash
# Mini Table 2: the paper's Table 2 comparison at a scale that runs on this project's 2-core CPU machine,
# on the shared real C4 documents (../shared/data). Full-Rank AdamW, GaLore-AdamW, Low-Rank, LoRA and
# ReLoRA train llama_9m at the same token budget; each method picks its lr from a small sweep (seed 0),
# then the best lr runs again with seed 1 to show the spread. Writes results/mini_table2.md (+ .csv and
# plots) and results/mini_table2_sweep.md (the sweep) through `galore-train report`.
#
# Hardware: CPU, 2 cores, no GPU (no other GPUs needed). Budget: 15 runs (5 methods x 2 lrs, + 5 seed-1
# runs) of 100 steps x 4 sequences x 256 tokens = 102K tokens each. Estimated from CPU time measured here
# (llama_9m trains at ~1,100 tokens/s on 2 free cores): ~95 s of training, ~25 s for the 3 evaluations and
# ~12 s of start-up per run, so ~35 minutes in all. The script prints the elapsed and projected time after
# every run; if the projection passes 60 minutes (a busy machine), rerun with STEPS=80.
#
# Scaled from the paper (Section 5.1): rank = d_model / 2 (the paper's 60M ratio, 128 / 256), warm-up
# 10% of the steps, cosine to 10%, GaLore scale 0.25; GaLore's gap 200 of 10K steps becomes 10 of 100
# (gap / steps = 1/50 would refresh every 2 steps, too often for Adam's moments to settle in a subspace);
# ReLoRA restarts every 25 steps with a 5-step warm-up (4 cycles). The lr grid {0.01, 0.003} spans the top of the
# paper's {0.01, 0.005, 0.001, 0.0005, 0.0001}: tiny models on short runs favour large lrs.
# Deviation, forced by the data: training sequences are packed (--pack) instead of one truncated document
# each, because the shared data holds only 1,820 documents (943K tokens); truncation to 256 would leave
# 358K distinct tokens. 102K tokens per run is ~11% of the data: no run repeats a document. Validation
# scores all 100 held-out documents, each truncated to 256 tokens (19.2K tokens), as the paper does.
# Expected (paper Table 2, 60M): GaLore within ~2-3% of Full-Rank, LoRA close, ReLoRA a little behind,
# Low-Rank far behind. At this size 90% of the weights are the embedding and output layers, which every
# method trains in full, so the methods differ only in the remaining 10% and GaLore's optimizer-memory
# saving is small here (it grows with depth and width; see `galore-train memory --compare`).
#
# Usage: scripts/mini_table2.sh          DRY_RUN=1 scripts/mini_table2.sh
#        (runs go to runs/mini_table2/: remove it to start over, galore-train never overwrites a run)
#        MAX_STEPS=2 METHODS="full galore" LR_GRID=0.01 RESULTS=/tmp/mini scripts/mini_table2.sh  (smoke test)

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh

DATA=${GALORE_TRAIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
RESULTS=${RESULTS:-results}
MODEL=llama_9m
RANK=64
STEPS=${STEPS:-100}
RUN_STEPS=${MAX_STEPS:-$STEPS}  # what a run really does
LR_GRID=${LR_GRID:-"0.01 0.003"}
METHODS=${METHODS:-"full galore low_rank lora relora"}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# method_flags METHOD: the optimizer/method and its own settings.
method_flags() {
  case $1 in
    full)     echo "--optimizer adamw" ;;
    galore)   echo "--optimizer galore_adamw --rank $RANK --gap 10 --scale 0.25" ;;
    low_rank) echo "--optimizer low_rank --rank $RANK" ;;
    lora)     echo "--optimizer lora --rank $RANK --lora-alpha 32 --lora-dropout 0.1" ;;
    relora)   echo "--optimizer relora --rank $RANK --lora-alpha 32 --lora-dropout 0.1 --relora-reset 25 --restart-warmup-steps 5 --optimizer-reset-ratio 0.999" ;;
  esac
}

total_runs=$(( $(wc -w <<< "$METHODS") * ($(wc -w <<< "$LR_GRID") + 1) ))
done_runs=0

# mini_run METHOD LR SEED: one run; prints where it is in the budget.
mini_run() {
  local name=$1-lr$2-s$3 start=$SECONDS
  note "mini Table 2: $name"
  # shellcheck disable=SC2046  # method_flags and steps expand to several flags on purpose
  train 1 --model "$MODEL" $(method_flags "$1") --lr "$2" --seed "$3" \
    --batch-size 4 --total-batch-size 4 --max-length 256 --pack $(steps "$STEPS" $((STEPS / 10))) \
    --scheduler cosine --min-lr-ratio 0.1 --weight-decay 0 --dtype fp32 \
    --eval-every $(((RUN_STEPS + 1) / 2)) --eval-tokens 20000 --eval-batch-size 16 --save-every "$RUN_STEPS" \
    --data-files "$DATA/c4/train/*.json.gz" --eval-data-files "$DATA/c4/eval/*.json.gz" --tokenizer "$DATA/t5-tokenizer" \
    --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-mode disabled \
    || echo "warning: run $name failed; the report marks it" >&2
  done_runs=$((done_runs + 1))
  [[ "$DRY_RUN" == 1 ]] || note "$name: $((SECONDS - start)) s; $done_runs/$total_runs runs in $((SECONDS / 60)) min," \
    "projected $((SECONDS * total_runs / done_runs / 60)) min in all"
}

# best_lr DIR...: the lr of the finished run with the lowest validation perplexity (empty if none).
best_lr() {
  python - "$@" <<'EOF'
import sys
from pathlib import Path
from galore_train.report import load_run
runs = [r for r in (load_run(Path(p)) for p in sys.argv[1:]) if r.status == "finished" and r.val_perplexity]
print(min(runs, key=lambda r: r.val_perplexity).config["lr"] if runs else "")
EOF
}

sweep_dirs=()
final_dirs=()
declare -A BEST
for method in $METHODS; do
  dirs=()
  for lr in $LR_GRID; do
    mini_run "$method" "$lr" 0
    dirs+=("$RUNS_DIR/$method-lr$lr-s0")
  done
  sweep_dirs+=("${dirs[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    BEST[$method]=${LR_GRID%% *}
    note "dry run: the sweep's best lr goes here (showing the first of $LR_GRID)"
  else
    BEST[$method]=$(best_lr "${dirs[@]}")
  fi
  if [[ -z "${BEST[$method]}" ]]; then
    echo "warning: no $method run finished; no seed-1 run" >&2
    continue
  fi
  mini_run "$method" "${BEST[$method]}" 1
  final_dirs+=("$RUNS_DIR/$method-lr${BEST[$method]}-s0" "$RUNS_DIR/$method-lr${BEST[$method]}-s1")
done

note "the sweep, and the table at each method's best lr (seeds 0 and 1)"
run galore-train report "${sweep_dirs[@]}" --title "Mini Table 2: learning-rate sweep (seed 0)" \
  --output "$RESULTS/mini_table2_sweep.md"
run galore-train report "${final_dirs[@]}" --title "Mini Table 2: llama_9m on real C4, CPU" \
  --output "$RESULTS/mini_table2.md" --csv --plots-dir "$RESULTS/mini_table2_plots"

if [[ "$DRY_RUN" != 1 ]]; then
  cat >> "$RESULTS/mini_table2.md" <<EOF

## Setup

Written by \`scripts/mini_table2.sh\` in $((SECONDS / 60)) min ($SECONDS s) on $(nproc) CPU cores, $(date -u +%Y-%m-%d),
torch $(python -c 'import torch; print(torch.__version__)').

- Model $MODEL, fp32; $RUN_STEPS steps x 4 sequences x 256 tokens (packed) = $((RUN_STEPS * 1024)) tokens per run;
  warm-up 10% of the steps, cosine to 10%; validation on the same held-out C4 tokens (all 100 documents of
  ../shared/data/c4/eval, each truncated to 256 tokens) every $(((RUN_STEPS + 1) / 2)) steps.
- Rank $RANK (d_model 128, r / d_model as the paper's 60M); GaLore gap 10, scale 0.25; LoRA/ReLoRA alpha 32, dropout 0.1; ReLoRA reset every 25
  steps, 5-step restart warm-up, 99.9% of the adapter optimizer state pruned at each restart.
- lr grid $LR_GRID (seed 0, see mini_table2_sweep.md); chosen: $(for m in $METHODS; do printf '%s %s, ' "$m" "${BEST[$m]:-none}"; done | sed 's/, $//').
- Seeds 0 and 1 at the chosen lr (a seed sets the initialisation and the data order).
EOF
fi
