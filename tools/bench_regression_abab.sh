#!/usr/bin/env bash
# Issue 23 "no CPU regression": the old commit's tools vs the new commit's, interleaved A B A B in one run.
# usage: tools/bench_regression_abab.sh OLD_WORKTREE NEW_WORKTREE [ROUNDS]
# Each worktree runs its own tools/bench_moe_layer.py and tools/bench_train.py with PYTHONPATH at that worktree.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-2}
PY=${PY:-/work/main/.venv/bin/python}
MOE_ARGS=${MOE_ARGS:-"--cases 2,4 --rounds 3 --impls moe --skip-ep"}
TRAIN_ARGS=${TRAIN_ARGS:-"--num-layers 2 --hidden-size 256 --num-attention-heads 4 --seq-length 256 --micro-batch-size 2 --vocab-size 8192 --num-experts 8 --topk 2 --expert-interval 2 --variants plain,fused --rounds 2 --steps 2 --warmup 1 --threads 2"}
for r in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    dir=$OLD; [ "$side" = new ] && dir=$NEW
    echo "=== round $r $side ($dir @ $(git -C "$dir" rev-parse --short HEAD)) bench_moe_layer $MOE_ARGS"
    (cd "$dir" && PYTHONPATH=$dir "$PY" tools/bench_moe_layer.py $MOE_ARGS)
  done
  for side in old new; do
    dir=$OLD; [ "$side" = new ] && dir=$NEW
    echo "=== round $r $side ($dir @ $(git -C "$dir" rev-parse --short HEAD)) bench_train $TRAIN_ARGS"
    (cd "$dir" && PYTHONPATH=$dir "$PY" tools/bench_train.py $TRAIN_ARGS)
  done
done
