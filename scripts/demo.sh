#!/usr/bin/env bash
# A short real pretraining run: LLaMA-9M with GaLore-AdamW on real C4 documents, on CPU, in minutes.
#   bash scripts/demo.sh                 (DATA=/path/to/data to use another copy of the shared data,
#                                         STEPS=N for a shorter or longer run than the default 200 steps)
# Needs only python3: runs in the project's .venv, made and filled on first use unless a Python at hand already has
# galore-train and its requirements (scripts/_python.sh; CPU build of torch on a CPU machine: the "cpu" extra).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
OUT="${OUT:-runs/demo-llama_9m-galore}"
STEPS="${STEPS:-200}"
source scripts/_python.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT"
# 200 steps x 8 sequences x 256 tokens (one C4 document per sequence, padding not counted);
# validation on all ~19k tokens of the 100 held-out documents, before training, every 50 steps and at the end.
"$PY" -m galore_train pretrain \
  --model llama_9m --optimizer galore_adamw --rank 64 --gap 50 --scale 0.25 --lr 0.01 \
  --data-files "$DATA/c4/train/*.json.gz" --eval-data-files "$DATA/c4/eval/*.json.gz" \
  --tokenizer "$DATA/t5-tokenizer" \
  --num-training-steps "$STEPS" --batch-size 8 --max-length 256 --eval-tokens 20000 --eval-every 50 \
  --save-every 200 --dtype fp32 --wandb-mode "${WANDB_MODE:-disabled}" --output-dir "$OUT"
echo "metrics: $OUT/metrics.jsonl, summary: $OUT/summary.json, checkpoint: $OUT/checkpoints/"
