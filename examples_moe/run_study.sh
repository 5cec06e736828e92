#!/usr/bin/env bash
# Study v2 (issue 28): does MoE beat dense at equal active parameters and equal tokens by more than seed noise?
# One command, <= STUDY_MINUTES (150) on 2 cores by design:
#   1. a SentencePiece BPE vocabulary of VOCAB_SIZE (8000) trained on the novel corpus, the corpus tokenized with it;
#   2. total and active parameters of every arm (tools/study_params.py; the MoE arms must match dense's active
#      parameters within 2%), then a short calibration run per model kind -> tokens/s -> the token budget per run
#      (tools/study_budget.py), the same for all runs, so that everything (evaluation included) fits the budget;
#   3. an LR range test on the dense model -> OneCycle flags (tools/lr_range_test.py); the MoE arms run at
#      MOE_LR_SCALE (0.5) x its min and max LR, the best of the peak LRs measured for each arm;
#   4. dense and MoE in the modern recipe (SEEDS: 3 each), the DeepSpeed top-1 MoE of study v1 (1 seed), PR-MoE,
#      the MoS student distilled from PR-MoE with staged KD and the same student without KD; every run is
#      validated on the same held-out batches at the same iterations (EVAL_POINTS per run), so that the tokens at
#      which a MoE seed reaches dense's final loss can be read off its curve (the token-efficiency ratio);
#   5. zero-shot LAMBADA and PIQA of each run; 6. docs/study.md, docs/study.json and a PNG (tools/study_report.py);
#      tools/study_claims.py prints the claims from the JSON.
# Equal active parameters: dense has an MLP of FFN = 4 x HIDDEN on each layer. The modern MoE routes each token to
# MOE_TOPK (2) of MOE_EXPERTS (16) fine-grained experts of FFN / MOE_TOPK (256) on every other layer, so a token
# meets 2 x 256 = 512 MLP units there, as in dense (the router adds 16 x 128 weights per MoE layer). PR-MoE and the
# student use a residual MLP of FFN/2 plus top-1 of FFN/2 experts (again 512 units). The DeepSpeed arm is v1's
# top-1 of 16 full-size experts (FFN each), capacity factor 1.25, aux loss 0.01.
# Resumable: every step skips when its result exists; a training run that was interrupted resumes from its last
# checkpoint (Ctrl-C / SIGTERM save and exit). Delete OUT to start over. STUDY_TOKENS=N skips the calibration and
# trains N tokens per run, e.g. a quick end-to-end check (writes nothing under docs/):
#   OUT=outputs/study_smoke DOCS=outputs/study_smoke/docs STUDY_TOKENS=65536 LRRT_STEPS=6 EVAL_LIMIT=8 \
#       EVAL_ITERS=2 SEEDS="1 2 3" bash examples_moe/run_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{  # bash reads this whole block before running it, so editing the script during a study (hours) is safe

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
CORPUS=${CORPUS:-$DATA_DIR/corpus/gutenberg_novels.jsonl}
OUT=${OUT:-outputs/study}
DOCS=${DOCS:-docs}
STUDY_MINUTES=${STUDY_MINUTES:-150}
STUDY_TOKENS=${STUDY_TOKENS:-}           # tokens per run; empty = computed from the calibration
VOCAB_SIZE=${VOCAB_SIZE:-8000}
WORKERS=${WORKERS:-2}
# every model: hidden 128, 4 heads, sequence 256, 6 layers (the students 5)
HIDDEN=${HIDDEN:-128}
HEADS=${HEADS:-4}
SEQ=${SEQ:-256}
LAYERS=${LAYERS:-6}
STUDENT_LAYERS=${STUDENT_LAYERS:-5}
FFN=$((4 * HIDDEN))                      # dense MLP width (Megatron's default)
MOE_EXPERTS=${MOE_EXPERTS:-16}
MOE_TOPK=${MOE_TOPK:-2}
MOE_FFN=${MOE_FFN:-$((FFN / MOE_TOPK))}  # fine-grained experts: top-k x MOE_FFN = FFN active units
# The modern MoE's routing recipe (megatron-core router flags; no top-k or expert width here, those are above).
# The demo's routing recipe (docs/routing_health.md): causally centred, whitened router inputs, sigmoid + expert
# bias 1e-2, and --moe-router-input-whitening-refresh, which keeps the study configs' routing in bound through the
# warmup's fast loss drop (docs/routing_health.md, third pass). The published study (docs/study.md) ran this recipe;
# the run before it (docs/study_v2_no_refresh.md) ran it without the refresh.
MOE_RECIPE_FLAGS=${MOE_RECIPE_FLAGS:-"--moe-router-center-input causal --moe-router-input-whitening-momentum 0.3 --moe-router-input-whitening-refresh --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-2 --moe-aux-loss-coeff 1e-3"}
DS_ARM=${DS_ARM:-1}                      # 0 leaves out the DeepSpeed top-1 arm (e.g. a rerun of the modern-recipe arms)
DS_RECIPE_FLAGS=${DS_RECIPE_FLAGS:-"--topk 1 --moe-train-capacity-factor 1.25 --moe-eval-capacity-factor 2.0 --moe-min-capacity 4 --moe-loss-coeff 0.01"}
PR_EXPERTS=${PR_EXPERTS:-"4 4 16"}       # two-level pyramid (DeepSpeed-MoE's PR-MoE) + residual MLP: ~28% fewer params
STUDENT_EXPERTS=${STUDENT_EXPERTS:-"4 16"}  # the PR-MoE teacher without one of its 4-expert MoE layers
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}         # 8192 tokens per iteration
KD_FRACTION=${KD_FRACTION:-0.6}          # staged KD: the teacher runs for this share of the student's tokens
SEEDS=${SEEDS:-"1234 1235 1236"}         # dense and modern MoE are trained once per seed (seed noise)
LRRT_STEPS=${LRRT_STEPS:-60}
CALIB_ITERS=${CALIB_ITERS:-12}           # iterations of each calibration run (>= 3)
EVAL_LIMIT=${EVAL_LIMIT:-}               # examples per zero-shot task; empty = the full sets
EVAL_TASKS=${EVAL_TASKS:-lambada,piqa}   # zero-shot tasks
EVAL_ITERS=${EVAL_ITERS:-25}             # validation micro-batches (25 x 16 x 256 = 102k held-out tokens)
EVAL_POINTS=${EVAL_POINTS:-16}           # validations per run (same iterations for every run)
# LR warmup in front of the range test's OneCycle (which starts at its min LR): without it, the study of 2026-12-06
# blew up 4 of 6 dense/MoE runs at steps 9-19 (gradient norm 9-242 x the clip, in the first layers), and 3 of them
# lagged ~300 iterations to the end; with 100 steps no run spiked (largest gradient norm 3.3-12.4; docs/study_notes.md)
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-100}
# The MoE arms (modern, DeepSpeed, PR-MoE, students) train at MOE_LR_SCALE x the range test's OneCycle LRs (min and
# max). The range test (dense) cannot pick an LR at this scale: its loss is lowest at the end of any sweep (docs/study.md,
# "Each arm at its own LR"). Full runs at three peak LRs each (seed 1234): dense best at 0.015 (1x), MoE best at 0.0075.
MOE_LR_SCALE=${MOE_LR_SCALE:-0.5}
if ! [[ "$MOE_LR_SCALE" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || ! awk -v x="$MOE_LR_SCALE" 'BEGIN { exit !(x > 0) }'; then
  echo "error: MOE_LR_SCALE=$MOE_LR_SCALE: expected a positive number (0.5 = half the range test's LR; 1 = the same as dense)" >&2
  exit 2
fi

TOK="$OUT/tokenizer/novels_sp$VOCAB_SIZE"
PREFIX="$OUT/data/novels_sp${VOCAB_SIZE}_text_document"
TOKENS_PER_ITER=$((GLOBAL_BATCH * SEQ))
SEED0=${SEEDS%% *}
N_SEEDS=$(wc -w <<< "$SEEDS")
mkdir -p "$OUT"
[ -f "$OUT/start_time" ] || date +%s > "$OUT/start_time"
# a resumed study must keep the settings its finished runs used
SETTINGS="hidden=$HIDDEN heads=$HEADS seq=$SEQ layers=$LAYERS/$STUDENT_LAYERS experts=$MOE_EXPERTS top$MOE_TOPK ffn=$MOE_FFN
moe=$MOE_RECIPE_FLAGS
ds=$DS_RECIPE_FLAGS
pr=$PR_EXPERTS student=$STUDENT_EXPERTS batch=$MICRO_BATCH/$GLOBAL_BATCH kd=$KD_FRACTION seeds=$SEEDS
tokens=$STUDY_TOKENS eval=$EVAL_POINTS x $EVAL_ITERS vocab=$VOCAB_SIZE warmup=$LR_WARMUP_ITERS"
[ "$MOE_LR_SCALE" = 1 ] || SETTINGS+=" moe_lr=x$MOE_LR_SCALE"  # 1: the line studies before the flag wrote
[ -f "$OUT/settings.txt" ] || echo "$SETTINGS" > "$OUT/settings.txt"
if [ "$(cat "$OUT/settings.txt")" != "$SETTINGS" ]; then
  echo "error: the settings differ from those $OUT was started with ($OUT/settings.txt):" >&2
  diff <(cat "$OUT/settings.txt") <(echo "$SETTINGS") >&2 || true
  echo "restore them, or delete $OUT (or set OUT=...) to start a new study" >&2
  exit 2
fi

read -r -a MOE_RECIPE <<< "$MOE_RECIPE_FLAGS"
read -r -a DS_RECIPE <<< "$DS_RECIPE_FLAGS"
MODEL=(--hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --seq-length "$SEQ" --max-position-embeddings "$SEQ"
       --hidden-dropout 0.0 --attention-dropout 0.0 --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
       --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --expert-interval 2
       --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" --data-path "$PREFIX"
       --split 969,30,1 --num-workers 1 --eval-iters "$EVAL_ITERS")
DENSE=(--num-layers "$LAYERS")
MOE=(--num-layers "$LAYERS" --num-experts "$MOE_EXPERTS" --moe-router-topk "$MOE_TOPK" --moe-ffn-hidden-size "$MOE_FFN"
     "${MOE_RECIPE[@]}")
DS_MOE=(--num-layers "$LAYERS" --num-experts "$MOE_EXPERTS" "${DS_RECIPE[@]}")
PR_MOE=(--num-layers "$LAYERS" --num-experts $PR_EXPERTS --mlp-type residual --moe-router-topk 1
        --moe-ffn-hidden-size $((FFN / 2)) "${MOE_RECIPE[@]}")
STUDENT=(--num-layers "$STUDENT_LAYERS" --num-experts $STUDENT_EXPERTS --mlp-type residual --moe-router-topk 1
         --moe-ffn-hidden-size $((FFN / 2)) "${MOE_RECIPE[@]}")

echo "== 1/6 tokenizer and data"
if [ ! -f "$TOK.model" ]; then
  mkdir -p "$OUT/tokenizer"
  "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --vocab-size "$VOCAB_SIZE" --output-prefix "$TOK" \
      --num-threads "$WORKERS"
fi
if [ ! -f "$PREFIX.idx" ]; then
  mkdir -p "$OUT/data"
  "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --json-keys text --output-prefix "${PREFIX%_text_document}" \
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" --workers "$WORKERS" --append-eod
fi

echo "== 2/6 parameters per arm, calibration and token budget"
params() {  # params ARM FLAGS...: total and active parameters; the 6-layer MoE arms must match dense's active ones
  local arm=$1; shift
  local match=()
  case $arm in dense|student) ;; *) match=(--match "$OUT/params/dense.json") ;; esac
  "$PYTHON" tools/study_params.py --arm "$arm" --output "$OUT/params/$arm.json" "${match[@]}" -- "${MODEL[@]}" "$@"
}
params dense "${DENSE[@]}"
params moe "${MOE[@]}"
params ds_moe "${DS_MOE[@]}"
params pr_moe "${PR_MOE[@]}"
params student "${STUDENT[@]}"
if [ -n "$STUDY_TOKENS" ]; then
  TOKENS=$STUDY_TOKENS
elif [ -f "$OUT/budget.json" ]; then
  TOKENS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['tokens_per_run'])" "$OUT/budget.json")
else
  mkdir -p "$OUT/calibration"
  calibrate() {  # calibrate KIND FLAGS...: CALIB_ITERS iterations, tokens/s of the last third
    local kind=$1; shift
    [ -f "$OUT/calibration/$kind.done" ] && return
    "$PYTHON" pretrain_gpt.py "${MODEL[@]}" "$@" --train-iters "$CALIB_ITERS" --log-interval $((CALIB_ITERS / 3)) \
        --eval-interval 1000 --eval-iters 0 --lr 1e-3 > "$OUT/calibration/$kind.log" 2>&1 \
        || { tail -n 5 "$OUT/calibration/$kind.log"; exit 1; }
    touch "$OUT/calibration/$kind.done"
  }
  calibrate dense "${DENSE[@]}"
  calibrate moe "${MOE[@]}"
  calibrate ds_moe "${DS_MOE[@]}"
  calibrate pr_moe "${PR_MOE[@]}"
  calibrate student "${STUDENT[@]}"
  # +240 s: the LR range test that follows; validation: EVAL_POINTS + 1 passes of EVAL_ITERS micro-batches per run
  "$PYTHON" tools/study_budget.py --minutes "$STUDY_MINUTES" \
      --elapsed-seconds $(( $(date +%s) - $(cat "$OUT/start_time") + 240 )) \
      --runs dense="$N_SEEDS" moe="$N_SEEDS" ds_moe=1 pr_moe=1 student=2 --kd-fraction "$KD_FRACTION" \
      --calibration dense="$OUT/calibration/dense.log" moe="$OUT/calibration/moe.log" \
      ds_moe="$OUT/calibration/ds_moe.log" pr_moe="$OUT/calibration/pr_moe.log" \
      student="$OUT/calibration/student.log" --val-tokens-per-run $(( (EVAL_POINTS + 1) * EVAL_ITERS * MICRO_BATCH * SEQ )) \
      --tokens-per-iter "$TOKENS_PER_ITER" --output "$OUT/budget.json"
  TOKENS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['tokens_per_run'])" "$OUT/budget.json")
fi
ITERS=$(( (TOKENS + TOKENS_PER_ITER - 1) / TOKENS_PER_ITER ))
KD_TOKENS=$("$PYTHON" -c "import sys; print(max(1, int(float(sys.argv[1]) * int(sys.argv[2]))))" "$KD_FRACTION" "$TOKENS")
WARMUP=$(( LR_WARMUP_ITERS < ITERS / 4 ? LR_WARMUP_ITERS : ITERS / 4 ))  # a tiny smoke budget: a quarter of it
CADENCE=$(( ITERS / EVAL_POINTS > 0 ? ITERS / EVAL_POINTS : 1 ))   # validate and checkpoint EVAL_POINTS times
# every iteration is logged: its MoE lines give each layer's tokens/expert and drops (the balance bound, issue 28)
echo "   $TOKENS tokens per run ($ITERS iterations of $TOKENS_PER_ITER tokens; validation every $CADENCE; LR warmup $WARMUP)"

# the OneCycle of the dense range test; the MoE arms run at MOE_LR_SCALE x its LRs (above)
echo "== 3/6 LR range test (dense, seed $SEED0)"
if [ ! -f "$OUT/lr_range_test/one_cycle.flags" ]; then
  mkdir -p "$OUT/lr_range_test"
  "$PYTHON" tools/lr_range_test.py --steps "$LRRT_STEPS" --min-lr 1e-5 --max-lr 3e-2 --planned-iters "$ITERS" \
      --output-dir "$OUT/lr_range_test" -- "${MODEL[@]}" "${DENSE[@]}" --seed "$SEED0" --eval-iters 0 \
      | tee "$OUT/lr_range_test/output.txt"
  sed -n 's/^OneCycle flags: //p' "$OUT/lr_range_test/output.txt" > "$OUT/lr_range_test/one_cycle.flags.tmp"
  mv "$OUT/lr_range_test/one_cycle.flags.tmp" "$OUT/lr_range_test/one_cycle.flags"
fi
read -r -a LR_FLAGS < "$OUT/lr_range_test/one_cycle.flags"
echo "   ${LR_FLAGS[*]}"
# the MoE arms' OneCycle bounds (appended after LR_FLAGS: the last value of a flag wins)
MOE_LR_LINE=$("$PYTHON" -c "
import sys
f, k = sys.argv[2:], float(sys.argv[1])
print(' '.join(f'{n} {float(f[f.index(n) + 1]) * k:.6g}' for n in ('--cycle-min-lr', '--cycle-max-lr')))" \
    "$MOE_LR_SCALE" "${LR_FLAGS[@]}")  # an assignment: a failure stops the script (set -e)
read -r -a MOE_LR <<< "$MOE_LR_LINE"
echo "   MoE arms (MOE_LR_SCALE=$MOE_LR_SCALE): ${MOE_LR[*]}"

train() {  # train NAME FLAGS...: skip when done, resume from the last checkpoint when interrupted
  local name=$1; shift
  local dir="$OUT/$name" load=() t0 rc=0
  if [ -f "$dir/train.done" ]; then echo "== $name: trained, skipping"; return; fi
  mkdir -p "$dir"
  [ -f "$dir/checkpoints/latest_checkpointed_iteration.txt" ] && load=(--load "$dir/checkpoints")
  echo "== $name: training $TOKENS tokens${load:+ (resuming from $dir/checkpoints)}"
  t0=$(date +%s)
  "$PYTHON" pretrain_gpt.py "${MODEL[@]}" "${LR_FLAGS[@]}" --lr-warmup-iters "$WARMUP" "$@" \
      --train-tokens "$TOKENS" \
      --log-interval 1 --eval-interval "$CADENCE" --save-interval "$CADENCE" --exit-signal-handler \
      --save "$dir/checkpoints" --tensorboard-dir "$dir/tb" "${load[@]}" >> "$dir/train.log" 2>&1 || rc=$?
  echo $(( $(date +%s) - t0 )) >> "$dir/wall_seconds"   # one line per invocation (resumes add lines)
  if [ "$rc" != 0 ]; then tail -n 5 "$dir/train.log" >&2; exit 1; fi
  grep -q "exiting at iteration" <(tail -n 3 "$dir/train.log") && { echo "   stopped early: rerun to resume"; exit 0; }
  touch "$dir/train.done"
  grep "validation loss at the end of training (validation set)" "$dir/train.log" | tail -n 1
}
evaluate() {  # evaluate NAME: zero-shot tasks, skipped when done
  local dir="$OUT/$1"
  [ -f "$dir/eval_zeroshot.json" ] && return
  echo "== $1: zero-shot $EVAL_TASKS"
  "$PYTHON" tools/eval_zeroshot.py --load "$dir/checkpoints" --tasks "$EVAL_TASKS" --data-dir "$DATA_DIR" \
      --micro-batch-size 16 --output "$dir/eval_zeroshot.json.tmp" --no-progress --disable-moe-token-dropping \
      ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} > "$dir/eval.log" 2>&1 || { tail -n 5 "$dir/eval.log" >&2; exit 1; }
  mv "$dir/eval_zeroshot.json.tmp" "$dir/eval_zeroshot.json"
}

echo "== 4/6 training (equal tokens for all)"
RUNS=()
for seed in $SEEDS; do
  train "dense_s$seed" "${DENSE[@]}" --seed "$seed"; RUNS+=("dense:$seed=$OUT/dense_s$seed")
  train "moe_s$seed" "${MOE[@]}" "${MOE_LR[@]}" --seed "$seed"; RUNS+=("moe:$seed=$OUT/moe_s$seed")
done
[ "$DS_ARM" = 0 ] || { train ds_moe "${DS_MOE[@]}" "${MOE_LR[@]}" --seed "$SEED0"; RUNS+=("ds_moe:$SEED0=$OUT/ds_moe"); }
train pr_moe "${PR_MOE[@]}" "${MOE_LR[@]}" --seed "$SEED0"
train mos "${STUDENT[@]}" "${MOE_LR[@]}" --seed "$SEED0" --mos --load-teacher "$OUT/pr_moe/checkpoints" \
    --num-layers-teacher "$LAYERS" --num-experts-teacher $PR_EXPERTS --kd-temp 1.0 --kd-alpha-ce 1.0 \
    --kd-beta-ce 1.0 --mos-kd-stop-tokens "$KD_TOKENS"
train student_no_kd "${STUDENT[@]}" "${MOE_LR[@]}" --seed "$SEED0"
RUNS+=("pr_moe:$SEED0=$OUT/pr_moe" "mos:$SEED0=$OUT/mos" "student_no_kd:$SEED0=$OUT/student_no_kd")

echo "== 5/6 zero-shot evaluation"
for spec in "${RUNS[@]}"; do evaluate "$(basename "${spec#*=}")"; done

echo "== 6/6 report"
mkdir -p "$DOCS"
"$PYTHON" tools/study_report.py --output "$DOCS/study.md" --json "$DOCS/study.json" --plot "$DOCS/study_val_loss.png" \
    --budget "$OUT/budget.json" --lr-range-test "$OUT/lr_range_test" --wall-seconds $(( $(date +%s) - $(cat "$OUT/start_time") )) \
    --recipe "modern MoE: top-$MOE_TOPK of $MOE_EXPERTS experts of FFN $MOE_FFN, $MOE_RECIPE_FLAGS; DeepSpeed arm: $DS_RECIPE_FLAGS; MoE arms at $MOE_LR_SCALE x the range test's LRs (${MOE_LR[*]})" \
    $([ -f "$DOCS/study_notes.md" ] && echo --notes "$DOCS/study_notes.md") --runs "${RUNS[@]}"
"$PYTHON" tools/study_claims.py "$DOCS/study.json"
exit
}
