# Shared by the scripts/paper_*.sh and scripts/mini_table2.sh: source it, then call `train` / `run`.
#
# Environment:
#   DRY_RUN=1      print every command (one line each, ready to copy) instead of running it
#   MAX_STEPS=N    cut every run to N optimizer steps (a smoke test of the whole script on real GPUs);
#                  the warm-up then defaults to 10% of N
#   RUNS_DIR=DIR   where the run directories go (default: runs/<script name>, or
#                  runs/<script name>-smoke<N> under MAX_STEPS, so a smoke test never blocks a real run)
#   NNODES, NODE_RANK, RDZV_ENDPOINT   multi-node torchrun (default: one node, --standalone)
#   EXTRA_ARGS     appended to every `galore-train pretrain` command (e.g. "--wandb-mode offline")

set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
MAX_STEPS=${MAX_STEPS:-}
NNODES=${NNODES:-1}
RUNS_DIR=${RUNS_DIR:-runs/$(basename "$0" .sh)${MAX_STEPS:+-smoke$MAX_STEPS}}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# run CMD...: execute, or print under DRY_RUN=1 (shell-quoted, so the line can be pasted back).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# note TEXT: a comment line in the output (dry runs show the plan with its headings).
note() {
  printf '# %s\n' "$*"
}

# steps [N WARMUP]: the step flags for a run of N steps with WARMUP warm-up steps (none: those of
# `--recipe paper`), or MAX_STEPS.
steps() {
  if [[ -n "$MAX_STEPS" ]]; then
    echo "--num-training-steps $MAX_STEPS"
  elif [[ $# -gt 0 ]]; then
    echo "--num-training-steps $1 --warmup-steps $2"
  fi
}

# train GPUS ARGS...: one `galore-train pretrain` run on GPUS processes of this node (torchrun when
# more than one process or node); ARGS are pretrain's flags.
train() {
  local gpus=$1
  shift
  if [[ "$gpus" == 1 && "$NNODES" == 1 ]]; then
    run galore-train pretrain "$@" "${EXTRA[@]}"
  elif [[ "$NNODES" == 1 ]]; then
    run torchrun --standalone --nproc_per_node "$gpus" -m galore_train pretrain "$@" "${EXTRA[@]}"
  else
    run torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK on each node}" \
      --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" \
      --nproc_per_node "$gpus" -m galore_train pretrain "$@" "${EXTRA[@]}"
  fi
}
