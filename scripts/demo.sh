#!/usr/bin/env bash
# A short real pretraining run: LLaMA-9M with GaLore-AdamW on real C4 documents, on CPU, in minutes.
#   bash scripts/demo.sh                 (DATA=/path/to/data to use another copy of the shared data)
# Installs galore-train first if it is missing (CPU build of torch: the "cpu" extra).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
OUT="${OUT:-runs/demo-llama_9m-galore}"
if ! python -c "import galore_train" 2>/dev/null; then
  python -m pip install -e ".[dev,cpu]"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT"
# 200 steps x 8 sequences x 256 tokens (one C4 document per sequence, padding not counted);
# validation on all ~19k tokens of the 100 held-out documents, before training and every 50 steps.
python -m galore_train pretrain \
  --model llama_9m --optimizer galore_adamw --rank 64 --gap 50 --scale 0.25 --lr 0.01 \
  --data-files "$DATA/c4/train/*.json.gz" --eval-data-files "$DATA/c4/eval/*.json.gz" \
  --tokenizer "$DATA/t5-tokenizer" \
  --num-training-steps 200 --batch-size 8 --max-length 256 --eval-tokens 20000 --eval-every 50 \
  --save-every 200 --dtype fp32 --wandb-mode "${WANDB_MODE:-disabled}" --output-dir "$OUT"
echo "metrics: $OUT/metrics.jsonl, summary: $OUT/summary.json, checkpoint: $OUT/checkpoints/"
