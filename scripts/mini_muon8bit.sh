#!/usr/bin/env bash
# 8-bit Muon momentum at CPU scale (issue 25): Muon on llama_20m, 200 steps, seeds 0 and 1, fp32 compute, on the
# shared real C4 documents in ../shared/data, at mini_beyond.sh's Muon lr (0.003: AdamW-matched update RMS, so the
# AdamW lr applies). Per seed, two runs that differ in --8bit only:
#   muon       the momentum in fp32 (torch.optim.Muon's)
#   muon8bit   --8bit: the momentum as block-wise 8-bit codes (bitsandbytes' signed dynamic map, blocks of 256,
#              one fp32 absmax each: the 8-bit GaLore's code), fp32 below 4096 values
# Writes results/mini_muon8bit.md through `galore-train report`; the comparison is appended by hand.
#
# Hardware: CPU, 2 cores, no GPU. Budget: 4 llama_20m runs of 200 steps x 4 x 256 tokens, ~10 CPU-min each.
# Expected (issue 25): 8-bit Muon's held-out perplexity within 2% of 32-bit Muon's, at 1/4 of the momentum bytes.
# Interrupted, it can be rerun: finished runs are reused, an interrupted one resumes.
#
# Usage: scripts/mini_muon8bit.sh      DRY_RUN=1 scripts/mini_muon8bit.sh      SEEDS="0" scripts/mini_muon8bit.sh

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh
source scripts/_mini.sh

MODEL=llama_20m
LR=${LR:-0.003}
read -r -a SEEDS <<< "${SEEDS:-0 1}"
total_runs=$((2 * ${#SEEDS[@]}))

dirs=()
for seed in "${SEEDS[@]}"; do  # seed by seed: an interrupted invocation leaves complete comparisons
  mini_run muon "$LR" "$seed" --optimizer muon
  mini_run muon8bit "$LR" "$seed" --optimizer muon --8bit
  dirs+=("$RUNS_DIR/muon-lr$LR-s$seed" "$RUNS_DIR/muon8bit-lr$LR-s$seed")
done

run galore-train report "${dirs[@]}" --title "8-bit Muon momentum ($MODEL, real C4, CPU)" \
  --output "$RESULTS/mini_muon8bit.md"

if [[ "$DRY_RUN" != 1 ]]; then
  {
    mini_setup_notes
    echo "- Muon at lr $LR (AdamW-matched update RMS), seeds ${SEEDS[*]}: momentum in fp32 and in 8 bits (--8bit)."
  } >> "$RESULTS/mini_muon8bit.md"
fi
