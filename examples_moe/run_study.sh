#!/usr/bin/env bash
# CPU-scale replication of the DeepSpeed-MoE paper's model-size claims on the shared novel corpus: dense,
# standard MoE, PR-MoE, a MoS student (staged KD from the PR-MoE teacher) and the same student without KD, all
# on the same token budget; then zero-shot LAMBADA/PIQA for each, a markdown table and a validation-loss plot.
# Needs the tokenized corpus from `make demo` (DATA_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
OUT=${OUT:-outputs/study}
DOCS=${DOCS:-docs}
export TRAIN_TOKENS=${TRAIN_TOKENS:-819200}       # 200 iterations of 16 x 256 tokens
export WARMUP_TOKENS=${WARMUP_TOKENS:-40960}
EVAL_LIMIT=${EVAL_LIMIT:-1000}                    # examples per task (empty = the full sets)
KD_STOP_ITERS=${KD_STOP_ITERS:-150}
COMMON=(--eval-interval 40 --eval-iters 10 --log-interval 20 --seed 1234)

train() {  # train NAME SCRIPT [env...] -- [flags...]
  local name=$1 script=$2; shift 2
  mkdir -p "$OUT/$name"
  echo "== $name ($script $*)"
  rm -rf "$OUT/$name/checkpoints"
  if ! env "$@" SAVE="$OUT/$name/checkpoints" TENSORBOARD="$OUT/$name/tb" \
      "examples_moe/$script" "${COMMON[@]}" > "$OUT/$name/train.log" 2>&1; then
    tail -n 3 "$OUT/$name/train.log" >&2
    exit 1
  fi
  grep -E "validation loss at the end" "$OUT/$name/train.log" || true
}
evaluate() {
  "$PYTHON" tools/eval_zeroshot.py --load "$OUT/$1/checkpoints" --tasks lambada,piqa --data-dir "$DATA_DIR" \
      --micro-batch-size 16 --output "$OUT/$1/eval_zeroshot.json" --no-progress ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}
}

train dense pretrain_gpt_dense.sh NUM_LAYERS=8
train moe pretrain_gpt_moe.sh NUM_LAYERS=8 NUM_EXPERTS=8
train pr_moe pretrain_gpt_pr_moe.sh NUM_LAYERS=8 NUM_EXPERTS="4 4 4 8"
train mos_student mos_distill.sh TEACHER="$OUT/pr_moe/checkpoints" KD_STOP_ITERS=$KD_STOP_ITERS
train student_no_kd pretrain_gpt_pr_moe.sh NUM_LAYERS=7 NUM_EXPERTS="4 4 8"
for run in dense moe pr_moe mos_student student_no_kd; do evaluate "$run"; done

mkdir -p "$DOCS"
"$PYTHON" tools/study_report.py --output "$DOCS/study.md" --plot "$DOCS/study_val_loss.png" --runs \
    dense="$OUT/dense" "MoE-8"="$OUT/moe" "PR-MoE 4/4/4/8 residual"="$OUT/pr_moe" \
    "MoS student 7L (staged KD)"="$OUT/mos_student" "student 7L, no KD"="$OUT/student_no_kd"
