#!/usr/bin/env bash
# Past GaLore at mini scale (issue 18): Fira, APOLLO, APOLLO-Mini and Muon next to Full-Rank AdamW and
# GaLore-AdamW in the mini Table 2 setting (scripts/mini_table2.sh, on the shared real C4 documents in
# ../shared/data). Each new optimizer sweeps 3 lrs at seed 0 on llama_9m, then its best lr runs again with
# seed 1; then all six meet on llama_20m (seeds H2H_SEEDS, default 0 and 1, each at its llama_9m lr), where the
# embedding and output layers are 84% of the weights instead of 91%. Writes results/mini_beyond.md (+ .csv) and
# results/mini_beyond_sweep.md through `galore-train report`; the hand-written comparison with the papers
# is appended to results/mini_beyond.md after the run (a rerun rewrites the file: keep that section).
#
# Hardware: CPU, 2 cores, no GPU (no other GPUs needed). Budget: 16 llama_9m runs of 200 steps x 4 x 256
# tokens (~150-200 s each on 2 free cores), 12 llama_20m runs of H2H_STEPS (default 100) steps (~2.3x the
# compute per step); plus the 4 AdamW / GaLore llama_9m runs when mini Table 2's are not on disk (below).
# About 2 hours on 2 free cores. Interrupted, it can be rerun: finished runs are reused.
#
# AdamW and GaLore-AdamW on llama_9m are mini Table 2's best-lr runs (lr 0.003, seeds 0 and 1), command for
# command; CPU runs are deterministic (results/mini_optimizers.md reproduced them to the last digit), so
# they are taken from BASELINE_RUNS (default runs/mini_table2) when finished there, else trained here, last.
# Settings: as mini Table 2 (rank d_model / 2, gap STEPS / 10); Fira with GaLore's scale 0.25 and the
# authors' residual; APOLLO channel-wise, random projection, scale 1; APOLLO-Mini rank 1, tensor-wise,
# scale sqrt(128); Fira / APOLLO / APOLLO-Mini with the norm-growth limiter 1.01 (their default); Muon with
# torch's defaults and AdamW-matched update RMS, so all four share GaLore's / AdamW's lr grid {0.003, 0.01,
# 0.001} (LR_GRID=... changes it; runs go lr by lr, so an interrupted invocation still covers every method).
# See docs/beyond_galore.md.
# Expected (Fira arXiv 2410.01623, APOLLO arXiv 2412.05270; C4 ppl at 60M/130M/350M/1B): GaLore 34.88/
# 25.36/18.95/15.64, Fira 31.06/22.73/17.03/14.31, APOLLO-Mini 31.93/23.84/17.18/14.17, Full-Rank AdamW
# 34.06/25.08/18.80/15.56: Fira and APOLLO(-Mini) ahead of AdamW and GaLore by ~10%. At this size every
# method trains the embedding and output layers (90% of the weights) with plain AdamW, so the optimizers
# differ in the remaining 10% only, and GaLore's scale 0.25 already beats AdamW here (mini Table 2).
#
# Usage: scripts/mini_beyond.sh          DRY_RUN=1 scripts/mini_beyond.sh
#        H2H_STEPS=200 H2H_SEEDS=0 scripts/mini_beyond.sh   (another llama_20m head-to-head)
#        (runs go to runs/mini_beyond/; a rerun reuses the finished ones: remove it to start over)

cd "$(dirname "$0")/.."  # the project root: results/ and runs/ are relative to it
source scripts/_common.sh
source scripts/_mini.sh

METHODS=${METHODS:-"fira apollo apollo_mini muon"}
BASELINE_LR=0.003  # mini Table 2's best lr for Full-Rank and GaLore
BASELINE_RUNS=${BASELINE_RUNS:-runs/mini_table2}
H2H_MODEL=${H2H_MODEL:-llama_20m}
H2H_RANK=${H2H_RANK:-128}  # d_model / 2 of llama_20m
H2H_STEPS=${H2H_STEPS:-100}  # half the llama_9m budget: a llama_20m step costs ~2.3x
H2H_SEEDS=${H2H_SEEDS:-0 1}
LR_GRID=${LR_GRID:-0.003 0.01 0.001}  # the centre first: mini Table 2's best lr for AdamW and GaLore

# baseline_dir METHOD SEED: mini Table 2's run of METHOD at its best lr if it finished there, else ours.
baseline_dir() {
  local name=$1-lr$BASELINE_LR-s$2
  if [[ "$DRY_RUN" != 1 ]] && finished_run "$BASELINE_RUNS/$name"; then
    echo "$BASELINE_RUNS/$name"
  else
    echo "$RUNS_DIR/$name"
  fi
}

n_grid=$(wc -w <<< "$LR_GRID")
n_methods=$(wc -w <<< "$METHODS")
missing_baselines=0
for method in full galore; do
  for seed in 0 1; do
    [[ "$(baseline_dir $method $seed)" == "$BASELINE_RUNS"/* ]] || missing_baselines=$((missing_baselines + 1))
  done
done
total_runs=$((n_methods * (n_grid + 1) + (n_methods + 2) * $(wc -w <<< "$H2H_SEEDS") + missing_baselines))

sweep_dirs=()
final_dirs=()
declare -A BEST=([full]=$BASELINE_LR [galore]=$BASELINE_LR)
for lr in $LR_GRID; do  # lr by lr, then the seed-1 runs: an interrupted run leaves every method at the first lrs
  for method in $METHODS; do
    mini_method_run "$method" "$lr" 0
  done
done
for method in $METHODS; do
  dirs=()
  for lr in $LR_GRID; do
    dirs+=("$RUNS_DIR/$method-lr$lr-s0")
  done
  sweep_dirs+=("${dirs[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    BEST[$method]=${LR_GRID%% *}
    note "dry run: the sweep's best lr of $method goes here (showing the first of $LR_GRID)"
  else
    BEST[$method]=$(best_lr "${dirs[@]}")
  fi
done
for method in $METHODS; do
  if [[ -z "${BEST[$method]}" ]]; then
    echo "warning: no $method run finished; no seed-1 or $H2H_MODEL run" >&2
    continue
  fi
  mini_method_run "$method" "${BEST[$method]}" 1
  final_dirs+=("$RUNS_DIR/$method-lr${BEST[$method]}-s0" "$RUNS_DIR/$method-lr${BEST[$method]}-s1")
done

note "head-to-head on $H2H_MODEL: seeds $H2H_SEEDS, $H2H_STEPS steps, each method at its $MODEL lr"
saved=("$MODEL" "$RANK" "$STEPS" "$GAP" "$RUN_STEPS")
prefix=$H2H_MODEL-$([[ "$H2H_STEPS" == "$STEPS" ]] || echo "steps$H2H_STEPS-")  # never mix run lengths
MODEL=$H2H_MODEL RANK=$H2H_RANK STEPS=$H2H_STEPS GAP=$((H2H_STEPS / 10)) RUN_STEPS=${MAX_STEPS:-$H2H_STEPS}
h2h_dirs=()
for seed in $H2H_SEEDS; do  # seed by seed: an interrupted invocation still has every method at the first seed
  for method in full galore $METHODS; do
    [[ -n "${BEST[$method]}" ]] || continue
    mini_method_run "$method" "${BEST[$method]}" "$seed" "$prefix"
    h2h_dirs+=("$RUNS_DIR/$prefix$method-lr${BEST[$method]}-s$seed")
  done
done
h2h_run_steps=$RUN_STEPS
MODEL=${saved[0]} RANK=${saved[1]} STEPS=${saved[2]} GAP=${saved[3]} RUN_STEPS=${saved[4]}

note "AdamW and GaLore on $MODEL: mini Table 2's runs if $BASELINE_RUNS has them, else trained here"
baseline_dirs=()
for method in full galore; do
  for seed in 0 1; do
    dir=$(baseline_dir "$method" "$seed")
    [[ "$dir" == "$BASELINE_RUNS"/* ]] || mini_method_run "$method" "$BASELINE_LR" "$seed"
    baseline_dirs+=("$dir")
  done
done

note "the sweep, and the table at each method's best lr (seeds 0 and 1) with the $H2H_MODEL head-to-head"
run galore-train report "${sweep_dirs[@]}" --title "Past GaLore, mini: learning-rate sweep ($MODEL, seed 0)" \
  --output "$RESULTS/mini_beyond_sweep.md"
run galore-train report "${baseline_dirs[@]}" "${final_dirs[@]}" "${h2h_dirs[@]}" \
  --title "Past GaLore, mini: Fira, APOLLO, APOLLO-Mini, Muon on real C4, CPU" --output "$RESULTS/mini_beyond.md" --csv

if [[ "$DRY_RUN" != 1 ]]; then
  chosen=$(for m in $METHODS; do printf '%s %s, ' "$m" "${BEST[$m]:-none}"; done | sed 's/, $//')
  {
    mini_setup_notes
    cat <<EOF
- $H2H_MODEL head-to-head: $h2h_run_steps steps ($((h2h_run_steps * 1024)) tokens), seeds $H2H_SEEDS, rank $H2H_RANK,
  gap $((h2h_run_steps / 10)), else as above.
- Rank $RANK on $MODEL (d_model / 2), gap $GAP; GaLore and Fira scale 0.25, Fira's residual as the authors' code;
  APOLLO channel-wise, random projection, scale 1; APOLLO-Mini rank 1, tensor-wise, scale sqrt(128); norm-growth
  limit 1.01 for Fira, APOLLO, APOLLO-Mini; Muon: torch.optim.Muon (AdamW-matched RMS) on the attention/MLP matrices.
- lr grid (seed 0, see mini_beyond_sweep.md): {$(sed 's/ /, /g' <<< "$LR_GRID")}; chosen: $chosen.
  AdamW and GaLore at mini Table 2's best lr $BASELINE_LR (its sweep: results/mini_table2_sweep.md), from:
  ${baseline_dirs[*]}.
EOF
  } >> "$RESULTS/mini_beyond.md"
fi
