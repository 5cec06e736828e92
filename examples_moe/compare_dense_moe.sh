#!/usr/bin/env bash
# Quality check: a dense GPT and a MoE GPT with the same active parameters per token (top-1 experts of the
# dense FFN's size), trained on the same tokens of the shared corpus; prints both validation losses.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/compare}
TRAIN_TOKENS=${TRAIN_TOKENS:-1228800}
NUM_EXPERTS=${NUM_EXPERTS:-8}
COMMON=(--eval-iters 20 --log-interval 50)

mkdir -p "$OUT"
SAVE="$OUT/dense" TENSORBOARD="$OUT/dense_tb" TRAIN_TOKENS=$TRAIN_TOKENS \
    examples_moe/pretrain_gpt_dense.sh "${COMMON[@]}" 2>&1 | tee "$OUT/dense.log"
SAVE="$OUT/moe" TENSORBOARD="$OUT/moe_tb" TRAIN_TOKENS=$TRAIN_TOKENS NUM_EXPERTS=$NUM_EXPERTS \
    examples_moe/pretrain_gpt_moe.sh "${COMMON[@]}" 2>&1 | tee "$OUT/moe.log"

val() { grep "at the end of training (validation set)" "$1" | sed 's/.*lm loss value: \([^ ]*\).*PPL: \([^ ]*\).*/\1 \2/'; }
read -r dl dp <<<"$(val "$OUT/dense.log")"
read -r ml mp <<<"$(val "$OUT/moe.log")"
echo
echo "| model | train tokens | validation loss | validation ppl |"
echo "|---|---|---|---|"
echo "| dense | $TRAIN_TOKENS | $dl | $dp |"
echo "| MoE ($NUM_EXPERTS experts, top-1, every 2nd layer) | $TRAIN_TOKENS | $ml | $mp |"
