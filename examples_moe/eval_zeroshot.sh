#!/bin/bash
# Zero-shot LAMBADA + PIQA of a checkpoint, lm-evaluation-harness scoring: examples_moe/eval_zeroshot.sh CKPT [extra flags]
# MoE checkpoints are evaluated dropless by default; add --moe-eval-token-dropping for capacity routing.
set -euo pipefail

CKPT=${1:?usage: examples_moe/eval_zeroshot.sh CKPT [extra tools/eval_zeroshot.py flags]}
shift
TASKS=${TASKS:-lambada,piqa}
DATA_DIR=${DATA_DIR:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
OUTPUT=${OUTPUT:-${CKPT%/}/eval_zeroshot.json}
PYTHON=${PYTHON:-python}

exec "$PYTHON" "$(dirname "$0")/../tools/eval_zeroshot.py" \
    --load "$CKPT" \
    --tasks "$TASKS" \
    --data-dir "$DATA_DIR" \
    --micro-batch-size "$MICRO_BATCH_SIZE" \
    --output "$OUTPUT" \
    "$@"
