#!/usr/bin/env bash
# Mini optimizer table: every full-rank optimizer and its GaLore version (AdamW, Adam, Adafactor, 8-bit
# Adam; GaLore-AdamW, GaLore-Adafactor, 8-bit GaLore) trains llama_9m on the shared real C4 documents
# (../shared/data) with the same steps, tokens, lr and schedule, and `galore-train report` writes
# results/mini_optimizers.md (+ .csv). The GaLore-vs-AdamW comparison with tuned lrs and two seeds is
# scripts/mini_table2.sh; this one puts all optimizers side by side at one lr.
#
# Hardware: CPU, 2 cores, no GPU (no other GPUs needed). Budget: 7 runs of 200 steps x 4 sequences x 256
# tokens = 205K tokens each (scripts/_mini.sh), ~2.4 min each, ~17 minutes in all.
#
# Settings: lr 0.01 for all (the paper's GaLore lr and the top of mini Table 2's sweep; LR=... changes it);
# GaLore rank 64 (d_model / 2), gap STEPS / 10, scale 0.25 as in mini Table 2; Adafactor with the paper's
# settings (no relative step, no parameter scaling, no first moment).
# Expected (paper Sections 5.1, 5.3): each GaLore optimizer within a few percent of its full-rank base;
# 8-bit Adam close to AdamW. At this size 90% of the weights are the embedding and output layers, which
# stay full-rank, so the GaLore versions differ from their bases only in the remaining 10%.
#
# Usage: scripts/mini_optimizers.sh      DRY_RUN=1 scripts/mini_optimizers.sh
#        (runs go to runs/mini_optimizers/: remove it to start over, galore-train never overwrites a run)

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh
source scripts/_mini.sh

LR=${LR:-0.01}
OPTIMIZERS=${OPTIMIZERS:-"adamw adam adafactor adam8bit galore_adamw galore_adafactor galore_adamw8bit"}
GALORE="--rank $RANK --gap $((STEPS / 10)) --scale 0.25"

total_runs=$(wc -w <<< "$OPTIMIZERS")
dirs=()
for optimizer in $OPTIMIZERS; do
  # shellcheck disable=SC2086  # GALORE is several flags
  case $optimizer in
    galore_*) mini_run "$optimizer" "$LR" 0 --optimizer "$optimizer" $GALORE ;;
    *)        mini_run "$optimizer" "$LR" 0 --optimizer "$optimizer" ;;
  esac
  dirs+=("$RUNS_DIR/$optimizer-lr$LR-s0")
done

run galore-train report "${dirs[@]}" --title "Mini optimizer table: llama_9m on real C4, CPU" \
  --output "$RESULTS/mini_optimizers.md" --csv

if [[ "$DRY_RUN" != 1 ]]; then
  {
    mini_setup_notes
    echo "- lr $LR for every optimizer, seed 0; GaLore rank $RANK, gap $((STEPS / 10)), scale 0.25 (every attention and MLP matrix)."
  } >> "$RESULTS/mini_optimizers.md"
fi
