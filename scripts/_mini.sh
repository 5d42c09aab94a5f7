# Shared by the CPU-scale comparisons on the shared real C4 documents (scripts/mini_*.sh): source it after
# scripts/_common.sh, set `total_runs`, then call `mini_run` per run.
#
# Every mini run trains llama_9m in fp32 for STEPS steps x 4 sequences x 256 packed tokens (205K tokens at
# the default 200 steps), warm-up 10% of the steps, cosine to 10%, no weight decay, and evaluates three
# times on the same held-out tokens: all 100 documents of ../shared/data/c4/eval, each truncated to 256
# tokens (19.1K tokens). Sequences are packed because the shared data holds only 1,820 documents (943K
# tokens); truncating each to 256 would leave 358K distinct tokens. 205K tokens is ~22% of the data, so
# no run repeats a document.

DATA=${GALORE_TRAIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
RESULTS=${RESULTS:-results}
MODEL=llama_9m
RANK=64  # d_model / 2, the paper's 60M ratio (128 / 256)
STEPS=${STEPS:-200}
GAP=$((STEPS / 10))  # GaLore: 10 projection refreshes per run
RUN_STEPS=${MAX_STEPS:-$STEPS}  # what a run really does
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ "$RUNS_DIR" == "runs/$(basename "$0" .sh)" && "$STEPS" != 200 ]]; then
  RUNS_DIR+="-steps$STEPS"  # never mix runs of another length into a table
fi

done_runs=0
reused_runs=0

# mini_run NAME LR SEED FLAGS...: one run into $RUNS_DIR/NAME-lrLR-sSEED (FLAGS pick the optimizer or
# method); prints where it is in the budget of $total_runs runs. A failed run is reported, not fatal. A run
# that an earlier invocation finished is reused, an interrupted one resumes from its checkpoint (--resume:
# bit-exact); delete a run's directory to run it again.
mini_run() {
  local name=$1-lr$2-s$3 lr=$2 seed=$3 start=$SECONDS
  shift 3
  done_runs=$((done_runs + 1))
  if [[ "$DRY_RUN" != 1 ]] && finished_run "$RUNS_DIR/$name"; then
    reused_runs=$((reused_runs + 1))
    note "$name: finished by an earlier invocation, reused"
    return
  fi
  note "$(basename "$0" .sh): $name"
  # shellcheck disable=SC2046  # steps expands to several flags on purpose
  train 1 --model "$MODEL" "$@" --lr "$lr" --seed "$seed" \
    --batch-size "${MICRO_BATCH:-4}" --total-batch-size 4 --max-length 256 --pack $(steps "$STEPS" $((STEPS / 10))) \
    --scheduler cosine --min-lr-ratio 0.1 --weight-decay 0 --dtype fp32 \
    --eval-every $(((RUN_STEPS + 1) / 2)) --eval-tokens 20000 --eval-batch-size 16 --save-every "$RUN_STEPS" \
    --data-files "$DATA/c4/train/*.json.gz" --eval-data-files "$DATA/c4/eval/*.json.gz" --tokenizer "$DATA/t5-tokenizer" \
    --output-dir "$RUNS_DIR/$name" --run-name "$name" --wandb-mode disabled --resume \
    || echo "warning: run $name failed; the report marks it" >&2
  local ran=$((done_runs - reused_runs))  # the remaining runs are projected at the mean time of those trained
  [[ "$DRY_RUN" == 1 ]] || note "$name: $((SECONDS - start)) s; $done_runs/$total_runs runs in $((SECONDS / 60)) min," \
    "projected $(((SECONDS + (total_runs - done_runs) * SECONDS / ran) / 60)) min in all"
}

# method_flags METHOD: the optimizer and its own settings at the current RANK and GAP (scripts/mini_beyond.sh,
# scripts/mini_tuned.sh): GaLore and Fira with scale 0.25 (Fira's residual as the authors' code), APOLLO
# channel-wise with a random projection and scale 1, APOLLO-Mini rank 1 tensor-wise scale sqrt(128), the
# limiter 1.01 for all three (their default), Muon with torch's defaults and AdamW-matched RMS, SWAN and SinkGD
# stateless on the attention/MLP matrices; AdamW on everything else in every method.
method_flags() {
  case $1 in
    full)        echo "--optimizer adamw" ;;
    galore)      echo "--optimizer galore_adamw --rank $RANK --gap $GAP --scale 0.25" ;;
    fira)        echo "--optimizer fira_adamw --rank $RANK --gap $GAP --scale 0.25" ;;
    apollo)      echo "--optimizer apollo_adamw --rank $RANK --gap $GAP" ;;
    apollo_mini) echo "--optimizer apollo_mini --gap $GAP" ;;
    muon)        echo "--optimizer muon" ;;
    swan)        echo "--optimizer swan" ;;
    sinkgd)      echo "--optimizer sinkgd" ;;
    *)           echo "error: unknown method $1" >&2; return 1 ;;
  esac
}

# mini_method_run METHOD LR SEED [PREFIX]: one run of a method, named PREFIXMETHOD-lrLR-sSEED.
mini_method_run() {
  # shellcheck disable=SC2046  # method_flags expands to several flags on purpose
  mini_run "${4:-}$1" "$2" "$3" $(method_flags "$1")
}

# finished_run DIR: whether DIR holds a finished run.
finished_run() {
  python -c 'import sys; from pathlib import Path; from galore_train.reporting.runs import load_run
sys.exit(load_run(Path(sys.argv[1])).status != "finished")' "$1"
}

# best_lr DIR...: the lr (as spelled in the run's directory name, NAME-lrLR-sSEED) of the finished run
# with the lowest validation perplexity; empty if none finished.
best_lr() {
  python - "$@" <<'EOF'
import re
import sys
from pathlib import Path
from galore_train.reporting.runs import load_run
runs = [(r, p) for p in sys.argv[1:] if (r := load_run(Path(p))).status == "finished" and r.val_perplexity]
print(re.fullmatch(r".*-lr(.+)-s\d+", Path(min(runs, key=lambda rp: rp[0].val_perplexity)[1]).name)[1] if runs else "")
EOF
}

# mini_setup_notes: the "## Setup" lines every mini results file ends with.
mini_setup_notes() {
  cat <<EOF

## Setup

Written by \`scripts/$(basename "$0")\` in $((SECONDS / 60)) min ($SECONDS s) on $(nproc) CPU cores, $(date -u +%Y-%m-%d),
torch $("${PYTHON:-python3}" -c 'import torch; print(torch.__version__)')$( ((reused_runs == 0)) || echo ", reusing $reused_runs runs finished by an earlier invocation").

- Model $MODEL, fp32; $RUN_STEPS steps x 4 sequences x 256 tokens (packed) = $((RUN_STEPS * 1024)) tokens per run;
  warm-up 10% of the steps, cosine to 10%, no weight decay; validation on the same held-out C4 tokens (all 100
  documents of ../shared/data/c4/eval, each truncated to 256 tokens) every $(((RUN_STEPS + 1) / 2)) steps.
EOF
}
