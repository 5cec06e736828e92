#!/usr/bin/env bash
# CPU-scale study of the DeepSpeed-MoE claims, one command, <= STUDY_MINUTES (100) on 2 cores by design:
#   1. a SentencePiece BPE vocabulary of VOCAB_SIZE (8000) trained on the novel corpus, the corpus tokenized with it;
#   2. an LR range test on the dense model -> OneCycle flags used by every run (tools/lr_range_test.py);
#   3. a short calibration run per model kind -> tokens/s -> the token budget per run (tools/study_budget.py),
#      the same for all runs, so that everything (evaluation included) fits the wall-clock budget;
#   4. dense and MoE (2 seeds each), PR-MoE, the MoS student distilled from PR-MoE with staged KD, the same student
#      without KD; 5. zero-shot LAMBADA and PIQA (full sets) of each; 6. docs/study.md, docs/study.json and a plot.
# Resumable: every step skips when its result exists; a training run that was interrupted resumes from its last
# checkpoint (Ctrl-C / SIGTERM save and exit). Delete OUT to start over. STUDY_TOKENS=N skips the calibration and
# trains N tokens per run (e.g. STUDY_TOKENS=32768 LRRT_STEPS=8 EVAL_LIMIT=20 for a quick end-to-end check).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
CORPUS=${CORPUS:-$DATA_DIR/corpus/gutenberg_novels.jsonl}
OUT=${OUT:-outputs/study}
DOCS=${DOCS:-docs}
STUDY_MINUTES=${STUDY_MINUTES:-100}
STUDY_TOKENS=${STUDY_TOKENS:-}           # tokens per run; empty = computed from the calibration
VOCAB_SIZE=${VOCAB_SIZE:-8000}
WORKERS=${WORKERS:-2}
# every model: hidden 128, 4 heads, sequence 256; the transformer holds ~60% of the FLOPs (6 layers x 2 x 12 h^2 +
# attention vs the 8064 x 128 head), the embedding most of a dense model's parameters
HIDDEN=${HIDDEN:-128}
HEADS=${HEADS:-4}
SEQ=${SEQ:-256}
LAYERS=${LAYERS:-6}                      # dense, MoE, PR-MoE; the students have STUDENT_LAYERS
STUDENT_LAYERS=${STUDENT_LAYERS:-5}
MOE_EXPERTS=${MOE_EXPERTS:-16}           # top-1 on every other layer (3 MoE layers): the active params of dense
PR_EXPERTS=${PR_EXPERTS:-"4 8 16"}       # pyramid, + a residual MLP per MoE layer: ~27% fewer params than MoE-16
STUDENT_EXPERTS=${STUDENT_EXPERTS:-"4 16"}  # the PR-MoE teacher without its middle MoE layer
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}         # 8192 tokens per iteration
KD_FRACTION=${KD_FRACTION:-0.6}          # staged KD: the teacher runs for this share of the student's tokens
SEEDS=${SEEDS:-"1234 1235"}              # dense and MoE are trained once per seed (seed noise)
LRRT_STEPS=${LRRT_STEPS:-60}
CALIB_ITERS=${CALIB_ITERS:-12}            # iterations of each calibration run (>= 3)
EVAL_LIMIT=${EVAL_LIMIT:-}               # examples per zero-shot task; empty = the full sets
EVAL_TASKS=${EVAL_TASKS:-lambada,piqa}   # zero-shot tasks (PIQA has a 303-token solution with the 8k vocabulary: it
                                         # needs SEQ >= 303, else eval_zeroshot.py refuses it; EVAL_TASKS=lambada)
EVAL_ITERS=${EVAL_ITERS:-25}             # validation micro-batches (25 x 16 x 256 = 102k held-out tokens)

TOK="$OUT/tokenizer/novels_sp$VOCAB_SIZE"
PREFIX="$OUT/data/novels_sp${VOCAB_SIZE}_text_document"
TOKENS_PER_ITER=$((GLOBAL_BATCH * SEQ))
START=$(date +%s)
SEED0=${SEEDS%% *}
[ -f "$OUT/start_time" ] || { mkdir -p "$OUT"; echo "$START" > "$OUT/start_time"; }

MODEL=(--hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --seq-length "$SEQ" --max-position-embeddings "$SEQ"
       --hidden-dropout 0.0 --attention-dropout 0.0 --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
       --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --moe-train-capacity-factor 1.25
       --moe-eval-capacity-factor 2.0 --moe-min-capacity 4 --moe-loss-coeff 0.01 --expert-interval 2 --topk 1
       --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" --data-path "$PREFIX"
       --split 969,30,1 --num-workers 1 --eval-iters "$EVAL_ITERS" --peak-flops 1e11)
DENSE=(--num-layers "$LAYERS")
MOE=(--num-layers "$LAYERS" --num-experts "$MOE_EXPERTS")
PR_MOE=(--num-layers "$LAYERS" --num-experts $PR_EXPERTS --mlp-type residual)
STUDENT=(--num-layers "$STUDENT_LAYERS" --num-experts $STUDENT_EXPERTS --mlp-type residual)

echo "== 1/6 tokenizer and data"
if [ ! -f "$TOK.model" ]; then
  "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --vocab-size "$VOCAB_SIZE" --output-prefix "$TOK" \
      --num-threads "$WORKERS"
fi
if [ ! -f "$PREFIX.idx" ]; then
  mkdir -p "$OUT/data"
  "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --json-keys text --output-prefix "${PREFIX%_text_document}" \
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" --workers "$WORKERS" --append-eod
fi

echo "== 2/6 calibration and token budget"
if [ -n "$STUDY_TOKENS" ]; then
  TOKENS=$STUDY_TOKENS
elif [ -f "$OUT/budget.json" ]; then
  TOKENS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['tokens_per_run'])" "$OUT/budget.json")
else
  mkdir -p "$OUT/calibration"
  calibrate() {  # calibrate KIND FLAGS...: CALIB_ITERS iterations, tokens/s of the last third
    local kind=$1; shift
    "$PYTHON" pretrain_gpt.py "${MODEL[@]}" "$@" --train-iters "$CALIB_ITERS" --log-interval $((CALIB_ITERS / 3)) --eval-interval 1000 \
        --eval-iters 0 --lr 1e-3 > "$OUT/calibration/$kind.log" 2>&1 || { tail -n 5 "$OUT/calibration/$kind.log"; exit 1; }
  }
  calibrate dense "${DENSE[@]}"
  calibrate moe "${MOE[@]}"
  calibrate pr_moe "${PR_MOE[@]}"
  calibrate student "${STUDENT[@]}"
  n_seeds=$(wc -w <<< "$SEEDS")
  "$PYTHON" tools/study_budget.py --minutes "$STUDY_MINUTES" --elapsed-seconds $(( $(date +%s) - $(cat "$OUT/start_time") + 240 )) \
      --runs dense="$n_seeds" moe="$n_seeds" pr_moe=1 student=2 --kd-fraction "$KD_FRACTION" \
      --calibration dense="$OUT/calibration/dense.log" moe="$OUT/calibration/moe.log" \
      pr_moe="$OUT/calibration/pr_moe.log" student="$OUT/calibration/student.log" \
      --tokens-per-iter "$TOKENS_PER_ITER" --output "$OUT/budget.json"   # (+240 s: the LR range test next)
  TOKENS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['tokens_per_run'])" "$OUT/budget.json")
fi
ITERS=$(( (TOKENS + TOKENS_PER_ITER - 1) / TOKENS_PER_ITER ))
KD_TOKENS=$("$PYTHON" -c "import sys; print(max(1, int(float(sys.argv[1]) * int(sys.argv[2]))))" "$KD_FRACTION" "$TOKENS")
CADENCE=$(( ITERS / 10 > 0 ? ITERS / 10 : 1 ))   # log, validate and checkpoint ~10 times per run
echo "   $TOKENS tokens per run ($ITERS iterations of $TOKENS_PER_ITER tokens)"

echo "== 3/6 LR range test (dense, seed $SEED0)"
if [ ! -f "$OUT/lr_range_test/one_cycle.flags" ]; then
  mkdir -p "$OUT/lr_range_test"
  "$PYTHON" tools/lr_range_test.py --steps "$LRRT_STEPS" --min-lr 1e-5 --max-lr 3e-2 --planned-iters "$ITERS" \
      --output-dir "$OUT/lr_range_test" -- "${MODEL[@]}" "${DENSE[@]}" --seed "$SEED0" --eval-iters 0 \
      | tee "$OUT/lr_range_test/output.txt"
  sed -n 's/^OneCycle flags: //p' "$OUT/lr_range_test/output.txt" > "$OUT/lr_range_test/one_cycle.flags"
fi
read -r -a LR_FLAGS < "$OUT/lr_range_test/one_cycle.flags"
echo "   ${LR_FLAGS[*]}"

train() {  # train NAME FLAGS...: skip when done, resume from the last checkpoint when interrupted
  local name=$1; shift
  local dir="$OUT/$name" load=()
  if [ -f "$dir/train.done" ]; then echo "== $name: trained, skipping"; return; fi
  mkdir -p "$dir"
  [ -f "$dir/checkpoints/latest_checkpointed_iteration.txt" ] && load=(--load "$dir/checkpoints")
  echo "== $name: training $TOKENS tokens${load:+ (resuming from $dir/checkpoints)}"
  if ! "$PYTHON" pretrain_gpt.py "${MODEL[@]}" "${LR_FLAGS[@]}" "$@" --train-tokens "$TOKENS" \
      --log-interval "$CADENCE" --eval-interval "$CADENCE" --save-interval "$CADENCE" --exit-signal-handler \
      --save "$dir/checkpoints" --tensorboard-dir "$dir/tb" "${load[@]}" >> "$dir/train.log" 2>&1; then
    tail -n 5 "$dir/train.log" >&2
    exit 1
  fi
  grep -q "exiting at iteration" <(tail -n 3 "$dir/train.log") && { echo "   stopped early: rerun to resume"; exit 0; }
  touch "$dir/train.done"
  grep "validation loss at the end of training (validation set)" "$dir/train.log" | tail -n 1
}
evaluate() {  # evaluate NAME: zero-shot LAMBADA + PIQA, skipped when done
  local dir="$OUT/$1"
  [ -f "$dir/eval_zeroshot.json" ] && return
  echo "== $1: zero-shot LAMBADA and PIQA"
  "$PYTHON" tools/eval_zeroshot.py --load "$dir/checkpoints" --tasks "$EVAL_TASKS" --data-dir "$DATA_DIR" \
      --micro-batch-size 16 --output "$dir/eval_zeroshot.json.tmp" --no-progress --disable-moe-token-dropping \
      ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} > "$dir/eval.log" 2>&1 || { tail -n 5 "$dir/eval.log" >&2; exit 1; }
  mv "$dir/eval_zeroshot.json.tmp" "$dir/eval_zeroshot.json"
}

echo "== 4/6 training (equal tokens for all)"
RUNS=()
for seed in $SEEDS; do
  train "dense_s$seed" "${DENSE[@]}" --seed "$seed"; RUNS+=("dense:$seed=$OUT/dense_s$seed")
  train "moe_s$seed" "${MOE[@]}" --seed "$seed"; RUNS+=("moe:$seed=$OUT/moe_s$seed")
done
train pr_moe "${PR_MOE[@]}" --seed "$SEED0"
train mos "${STUDENT[@]}" --seed "$SEED0" --mos --load-teacher "$OUT/pr_moe/checkpoints" \
    --num-layers-teacher "$LAYERS" --num-experts-teacher $PR_EXPERTS --kd-temp 1.0 --kd-alpha-ce 1.0 \
    --kd-beta-ce 1.0 --mos-kd-stop-tokens "$KD_TOKENS"
train student_no_kd "${STUDENT[@]}" --seed "$SEED0"
RUNS+=("pr_moe:$SEED0=$OUT/pr_moe" "mos:$SEED0=$OUT/mos" "student_no_kd:$SEED0=$OUT/student_no_kd")

echo "== 5/6 zero-shot evaluation"
for spec in "${RUNS[@]}"; do evaluate "$(basename "${spec#*=}")"; done

echo "== 6/6 report"
"$PYTHON" tools/study_report.py --output "$DOCS/study.md" --json "$DOCS/study.json" --plot "$DOCS/study_val_loss.png" \
    --budget "$OUT/budget.json" --lr-range-test "$OUT/lr_range_test" --wall-seconds $(( $(date +%s) - $(cat "$OUT/start_time") )) \
    --runs "${RUNS[@]}"
