#!/usr/bin/env bash
# `make demo`: verify data -> train a SentencePiece BPE vocabulary (8000) on the novel corpus and tokenize it ->
# train a small MoE GPT (6 layers, hidden 128, 16 experts on every other layer) in the modern recipe (RMSNorm, SwiGLU,
# RoPE; routers on causally centred and whitened inputs, sigmoid routing with aux-loss-free expert bias, dropless,
# top-2 of fine-grained experts + a shared expert)
# -> validation perplexity and expert load -> a generated sample -> zero-shot LAMBADA (EVAL_TASKS=lambada,piqa adds
# PIQA) -> one line with validation ppl, load balance and the sample; the loss curve goes beside the checkpoint.
# Every knob below can be overridden from the environment (NUM_EXPERTS=1 trains the dense GPT; ROUTER=deepspeed the
# old DeepSpeed top-1 recipe at capacity factor 1.25, whose early routing collapse docs/routing_health.md measures).
set -euo pipefail
export PYTHONUNBUFFERED=1  # the training log reaches the terminal (and train.log) as it is written
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
OUT=${OUT:-outputs/demo}
WORKERS=${WORKERS:-2}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
# model (the study's)
NUM_LAYERS=${NUM_LAYERS:-6}
HIDDEN=${HIDDEN:-128}
HEADS=${HEADS:-4}
SEQ=${SEQ:-256}
FFN=${FFN:-344}                       # SwiGLU width of the dense MLPs (2/3 of 4 x hidden: a GELU MLP's FLOPs)
NUM_EXPERTS=${NUM_EXPERTS:-16}
ROUTER=${ROUTER:-modern}              # modern | deepspeed
TOPK=${TOPK:-2}                       # modern: experts per token (deepspeed: top-1)
MOE_FFN=${MOE_FFN:-128}               # modern: each routed expert's width (fine-grained: a quarter of 4 x hidden)
SHARED_FFN=${SHARED_FFN:-128}         # modern: the shared expert's width
CENTER=${CENTER:-causal}              # router input centring (docs/routing_health.md): causal | batch | off
BIAS_RATE=${BIAS_RATE:-1e-2}          # modern: expert-bias update per step (10x megatron-core's 1e-3: docs/routing_health.md)
WHITEN=${WHITEN:-0.3}                 # modern + causal: router-input whitening momentum (docs/routing_health.md); off = none
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}
TRAIN_ITERS=${TRAIN_ITERS:-120}       # 120 x 32 x 256 = 983k tokens (a third of the old demo's FLOPs per token)
LR=${LR:-2e-3}
EVAL_TASKS=${EVAL_TASKS:-lambada}     # lambada,piqa adds PIQA (continuations past the window are scored on their last tokens, as lm-eval)
EVAL_LIMIT=${EVAL_LIMIT:-}            # e.g. 500 for a quicker look; empty = the full sets
PROMPT=${PROMPT:-"It was a dark and stormy night, and"}

CORPUS="$DATA_DIR/corpus/gutenberg_novels.jsonl"
TOK="$OUT/data/novels_sp$VOCAB_SIZE"
PREFIX="$OUT/data/novels_sp$VOCAB_SIZE"

echo "== 1/5 data: checking sha256 of the corpus in $DATA_DIR"
"$PYTHON" -c "import sys; from megatron.data.data_files import resolve, DataFileError
try: resolve('corpus', sys.argv[1])
except DataFileError as e: sys.exit(f'error: {e} (the demo needs a jsonl corpus; set CORPUS=... to use another)')" "$DATA_DIR"

if [ ! -f "${PREFIX}_text_document.idx" ]; then
  echo "== 2/5 a SentencePiece BPE vocabulary of $VOCAB_SIZE on $CORPUS, then tokenizing it ($WORKERS workers)"
  mkdir -p "$OUT/data"
  [ -f "$TOK.model" ] || "$PYTHON" tools/train_tokenizer.py --input "$CORPUS" --vocab-size "$VOCAB_SIZE" \
      --output-prefix "$TOK" --num-threads "$WORKERS"
  "$PYTHON" tools/preprocess_data.py --input "$CORPUS" --json-keys text --output-prefix "$PREFIX" \
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" --workers "$WORKERS" --append-eod
else
  echo "== 2/5 reusing $TOK.model and ${PREFIX}_text_document.{bin,idx}"
fi

BLOCKS="--normalization RMSNorm --swiglu --position-embedding-type rope --ffn-hidden-size $FFN"
CENTER_FLAG=""
[ "$CENTER" = off ] || CENTER_FLAG="--moe-router-center-input $CENTER"
[ "$CENTER" != causal ] || [ "$WHITEN" = off ] || CENTER_FLAG="$CENTER_FLAG --moe-router-input-whitening-momentum $WHITEN"
case "$ROUTER" in
  modern)    # megatron-core routing, dropless, on causally centred router inputs (without centring every router collapses
             # onto one expert by iteration 5-7) that are whitened (without it one expert per layer takes 30-50% of the
             # tokens at iterations 20-43: docs/routing_health.md); the expert bias and a small aux loss keep the rest
             # even
    MOE="$CENTER_FLAG --moe-router-score-function sigmoid --moe-router-enable-expert-bias
         --moe-router-bias-update-rate $BIAS_RATE --moe-aux-loss-coeff 1e-3 --moe-router-topk $TOPK
         --moe-ffn-hidden-size $MOE_FFN --moe-shared-expert-intermediate-size $SHARED_FFN"
    MEAN_PAIRS=$TOPK ;;
  deepspeed) # the old demo: DeepSpeed top-1, capacity 1.25, aux 0.01, GELU/LayerNorm/learned positions, no centring
    BLOCKS=""
    MOE="--topk 1 --moe-train-capacity-factor 1.25 --moe-eval-capacity-factor 2.0 --moe-min-capacity 4 --moe-loss-coeff 0.01"
    MEAN_PAIRS=1 ;;
  *) echo "error: ROUTER=$ROUTER: expected modern or deepspeed" >&2; exit 2 ;;
esac
[ "$NUM_EXPERTS" -gt 1 ] || MOE=""

echo "== 3/5 training a ${NUM_LAYERS}-layer GPT (hidden $HIDDEN, $NUM_EXPERTS experts on every 2nd layer, $ROUTER routing) for $TRAIN_ITERS iterations"
rm -rf "$OUT/checkpoints"
# shellcheck disable=SC2086
"$PYTHON" pretrain_gpt.py \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
    --seq-length "$SEQ" --max-position-embeddings "$SEQ" $BLOCKS \
    --num-experts "$NUM_EXPERTS" --expert-interval 2 $MOE \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
    --lr "$LR" --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 8 --weight-decay 0.1 \
    --adam-beta2 0.95 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK.model" \
    --data-path "${PREFIX}_text_document" --split 969,30,1 --num-workers 1 \
    --log-interval 10 --eval-interval 40 --eval-iters 8 \
    --save "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard" "$@" | tee "$OUT/train.log"

echo "== 4/5 sample (temperature 0.7, top-k 40)"
"$PYTHON" tools/generate.py --load "$OUT/checkpoints" --prompt "$PROMPT" --max-new-tokens 40 \
    --temperature 0.7 --top-k 40 --seed 1 | tee "$OUT/sample.txt"

echo "== 5/5 zero-shot $EVAL_TASKS (lm-evaluation-harness scoring)"
"$PYTHON" tools/eval_zeroshot.py --load "$OUT/checkpoints" --tasks "$EVAL_TASKS" --data-dir "$DATA_DIR" \
    --micro-batch-size 16 --output "$OUT/eval_zeroshot.json" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

# one line: validation ppl, the last logged iteration's expert load (mean = global batch x seq x top-k / experts), sample
"$PYTHON" tools/demo_summary.py --log "$OUT/train.log" --png "$OUT/checkpoints/loss_curve.png" \
    --sample-file "$OUT/sample.txt" \
    $([ "$NUM_EXPERTS" -gt 1 ] && echo --tokens-per-expert-mean $((GLOBAL_BATCH * SEQ * MEAN_PAIRS / NUM_EXPERTS)))
