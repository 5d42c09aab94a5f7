#!/usr/bin/env bash
# The tuned comparison (issue 26): every method gets the same tuning budget, by one rule for all, on the shared
# real C4 documents (../shared/data) in the mini setting of scripts/mini_table2.sh, on llama_9m and llama_20m.
#
# The rule, per model and method: seed 0 at the lrs START_GRID (default 0.001 0.003 0.01, half-decade steps);
# while the best lr is the lowest (highest) of those tried, add the next lower (higher) one of the ladder
# 0.0001 0.0003 0.001 ... 0.1 (at most MAX_EXTEND times, default 3), so every best lr ends strictly inside
# its grid or the table says it did not; then seed 1 at the best lr. Methods (METHODS): AdamW, GaLore-AdamW,
# Fira, APOLLO, APOLLO-Mini, Muon, SWAN, SinkGD, each with its own settings (scripts/_mini.sh, method_flags);
# rank d_model / 2 (64, 128), gap STEPS / 10, STEPS (default 200) on both models.
#
# Hardware: CPU, 2 cores, no GPU (no GPUs needed). Budget: 8 methods x 2 models x (3 lrs + extensions + 1
# seed) = at least 64 runs. Measured (results/mini_tuned.md): 66 runs, 10.1 h of one-thread training, ~5 h on
# 2 cores: ~6 min a llama_9m run, ~8 min a llama_20m run, ~40 min a llama_20m Muon run (torch.optim.Muon's
# bfloat16 Newton-Schulz is slow on CPUs without bf16 units). Interrupted, it can be rerun: finished runs are
# reused, stopped ones resume from their checkpoint (delete a run's directory to run it again).
#
# Writes results/mini_tuned.md (+ .csv, the runs at each best lr, through `galore-train report`) with the
# table of grids, best lrs, seeds and optimizer-state bytes appended by scripts/tuned_summary.py,
# results/mini_tuned_sweep.md (every sweep run) and results/mini_tuned_plots/ (perplexity curves, memory,
# and ppl_vs_state.png: perplexity against optimizer-state memory).
#
# Expected: untuned, AdamW trails (results/mini_beyond.md: every method at lr 0.003); the papers claim
# Fira / APOLLO ~10% ahead of AdamW and GaLore at 60M-1B (C4), SWAN and SinkGD AdamW's perplexity with no
# state on the hidden matrices, and the tuned AdamW baseline literature (Glentis et al. 2025) says much of
# such gaps closes when AdamW is tuned as carefully. Here every method gets the same budget; at 9M-20M the
# embedding and output layers (84-91% of the weights) run AdamW in every method.
#
# Usage: scripts/mini_tuned.sh         DRY_RUN=1 scripts/mini_tuned.sh
#        METHODS="swan sinkgd" MODELS=llama_9m scripts/mini_tuned.sh   (a subset; same folders, reused later)
#        PYTHON=/path/to/python scripts/mini_tuned.sh   (the one with galore-train's requirements; default python3)

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh
source scripts/_mini.sh

METHODS=${METHODS:-"full galore fira apollo apollo_mini muon swan sinkgd"}
MODELS=${MODELS:-"llama_9m llama_20m"}
START_GRID=${START_GRID:-"0.001 0.003 0.01"}
LADDER="0.0001 0.0003 0.001 0.003 0.01 0.03 0.1"
MAX_EXTEND=${MAX_EXTEND:-3}
declare -A RANKS=([llama_9m]=64 [llama_20m]=128)  # d_model / 2, as mini Table 2

n_start=$(wc -w <<< "$START_GRID")
total_runs=$(($(wc -w <<< "$METHODS") * $(wc -w <<< "$MODELS") * (n_start + 1)))  # before any extension

# neighbour LR DIRECTION: the ladder's next lr below (-1) or above (+1) LR, empty past its ends.
neighbour() {
  local -a ladder
  read -r -a ladder <<< "$LADDER"
  for i in "${!ladder[@]}"; do
    if [[ "${ladder[$i]}" == "$1" ]]; then
      local j=$((i + $2))
      ((j >= 0 && j < ${#ladder[@]})) && echo "${ladder[$j]}"
      return 0
    fi
  done
}

sweep_dirs=()
final_dirs=()
for model in $MODELS; do
  MODEL=$model RANK=${RANKS[$model]}
  note "$MODEL: rank $RANK, gap $GAP, $RUN_STEPS steps; lr grid from {$START_GRID}, extended at an edge"
  for method in $METHODS; do
    grid=($START_GRID)
    for lr in "${grid[@]}"; do
      mini_method_run "$method" "$lr" 0 "$MODEL-"
    done
    best=""
    for ((extension = 0; extension <= MAX_EXTEND; extension++)); do
      dirs=()
      for lr in "${grid[@]}"; do
        dirs+=("$RUNS_DIR/$MODEL-$method-lr$lr-s0")
      done
      if [[ "$DRY_RUN" == 1 ]]; then
        best=${grid[1]}
        note "dry run: $method's best lr goes here (showing ${grid[1]}); at an edge the grid grows by one ladder step"
        break
      fi
      best=$(best_lr "${dirs[@]}")
      [[ -n "$best" ]] || break
      sorted=($(printf '%s\n' "${grid[@]}" | sort -g))
      if [[ "$best" == "${sorted[0]}" ]]; then
        next=$(neighbour "$best" -1)
      elif [[ "$best" == "${sorted[-1]}" ]]; then
        next=$(neighbour "$best" 1)
      else
        break  # strictly inside
      fi
      ((extension < MAX_EXTEND)) && [[ -n "$next" ]] || break
      total_runs=$((total_runs + 1))
      grid+=("$next")
      mini_method_run "$method" "$next" 0 "$MODEL-"
    done
    sweep_dirs+=("${dirs[@]}")
    if [[ -z "$best" ]]; then
      echo "warning: no $MODEL $method run finished; no seed-1 run" >&2
      continue
    fi
    mini_method_run "$method" "$best" 1 "$MODEL-"
    final_dirs+=("$RUNS_DIR/$MODEL-$method-lr$best-s0" "$RUNS_DIR/$MODEL-$method-lr$best-s1")
  done
done

note "the sweeps, and the table at each method's best lr (seeds 0 and 1), with plots"
run galore-train report "${sweep_dirs[@]}" --title "Tuned comparison, mini: every lr tried (seed 0)" \
  --output "$RESULTS/mini_tuned_sweep.md"
run galore-train report "${final_dirs[@]}" --title "Tuned comparison, mini: each method at its best lr" \
  --output "$RESULTS/mini_tuned.md" --csv --plots-dir "$RESULTS/mini_tuned_plots"
if [[ "$DRY_RUN" == 1 ]]; then
  note "then: python3 scripts/tuned_summary.py (grids, best lrs, state bytes; ppl_vs_state.png)"
else
  "${PYTHON:-python3}" scripts/tuned_summary.py "$RESULTS/mini_tuned.md" "$RESULTS/mini_tuned_plots/ppl_vs_state.png" \
    "${sweep_dirs[@]}" -- "${final_dirs[@]}"
  MODEL=${MODELS// /, } mini_setup_notes >> "$RESULTS/mini_tuned.md"
  cat >> "$RESULTS/mini_tuned.md" <<EOF
- Rank d_model / 2 (llama_9m 64, llama_20m 128), gap $GAP; method settings as
  scripts/_mini.sh's method_flags. lr rule: start {$START_GRID}, extend by the ladder {$LADDER} while the best
  is at an edge (at most $MAX_EXTEND times), seed 1 at the best. Runs: $done_runs ($reused_runs reused).
EOF
fi
