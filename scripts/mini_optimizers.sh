#!/usr/bin/env bash
# Mini optimizer table: every full-rank optimizer and its GaLore version (AdamW, Adam, Adafactor, 8-bit
# Adam; GaLore-AdamW, GaLore-Adafactor, 8-bit GaLore) trains llama_9m on the shared real C4 documents
# (../shared/data) with the same steps, tokens and schedule, and `galore-train report` writes
# results/mini_optimizers.md (+ .csv). The GaLore-vs-AdamW comparison with an lr sweep and two seeds is
# scripts/mini_table2.sh; this one puts all optimizers side by side, seed 0. Its AdamW and GaLore-AdamW
# runs repeat mini Table 2's seed-0 runs command for command: they must score the same (determinism).
#
# Hardware: CPU, 2 cores, no GPU (no other GPUs needed). Budget: 7 runs of 200 steps x 4 sequences x 256
# tokens = 205K tokens each (scripts/_mini.sh), 150-193 s each, 20 minutes in all here.
#
# Settings: as in the paper, the full-rank optimizers share one lr and the GaLore ones another: the best of
# mini Table 2's sweep {0.01, 0.003, 0.001} for Full-Rank AdamW and for GaLore-AdamW, 0.003 for both
# (FULL_LR=..., GALORE_LR=... change them);
# GaLore rank 64 (d_model / 2), gap STEPS / 10, scale 0.25 as in mini Table 2; Adafactor with the paper's
# settings (no relative step, no parameter scaling, no first moment).
# Expected (paper Sections 5.1, 5.3): each GaLore optimizer within a few percent of its full-rank base;
# 8-bit Adam close to AdamW. At this size 90% of the weights are the embedding and output layers, which
# stay full-rank, so the GaLore versions differ from their bases only in the remaining 10%.
#
# Usage: scripts/mini_optimizers.sh      DRY_RUN=1 scripts/mini_optimizers.sh
#        (runs go to runs/mini_optimizers/; a rerun reuses the finished ones: remove it to start over)

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh
source scripts/_mini.sh

FULL_LR=${FULL_LR:-0.003}
GALORE_LR=${GALORE_LR:-0.003}
OPTIMIZERS=${OPTIMIZERS:-"adamw adam adafactor adam8bit galore_adamw galore_adafactor galore_adamw8bit"}
GALORE="--rank $RANK --gap $GAP --scale 0.25"

total_runs=$(wc -w <<< "$OPTIMIZERS")
dirs=()
for optimizer in $OPTIMIZERS; do
  # shellcheck disable=SC2086  # GALORE is several flags
  case $optimizer in
    galore_*) lr=$GALORE_LR; mini_run "$optimizer" "$lr" 0 --optimizer "$optimizer" $GALORE ;;
    *)        lr=$FULL_LR; mini_run "$optimizer" "$lr" 0 --optimizer "$optimizer" ;;
  esac
  dirs+=("$RUNS_DIR/$optimizer-lr$lr-s0")
done

run galore-train report "${dirs[@]}" --title "Mini optimizer table: llama_9m on real C4, CPU" \
  --output "$RESULTS/mini_optimizers.md" --csv

if [[ "$DRY_RUN" != 1 ]]; then
  {
    mini_setup_notes
    echo "- lr $FULL_LR for the full-rank optimizers, $GALORE_LR for the GaLore ones, seed 0; GaLore rank $RANK, gap $GAP, scale 0.25 (every attention and MLP matrix)."
  } >> "$RESULTS/mini_optimizers.md"
fi
