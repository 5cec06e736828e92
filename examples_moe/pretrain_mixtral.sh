#!/usr/bin/env bash
# Mixtral-style MoE GPT at CPU size: Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh flag set
# (RMSNorm, SwiGLU, GQA 32/8, RoPE base 1e6, untied head, no biases, 8 experts top-2 on every layer, grouped GEMM,
# all-to-all dispatch) with the sizes shrunk; runs a few iterations.
# Mixtral 8x7B itself: NUM_LAYERS=32 HIDDEN=4096 FFN=14336 HEADS=32 QUERY_GROUPS=8 SEQ=4096 NUM_EXPERTS=8 TOPK=2
# EP_SIZE=8 PRECISION=--bf16. Routing with Megatron-LM's router flags, as its script: softmax top-2 over the
# chosen logits, dropless, aux_loss.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
DATA_PATH=${DATA_PATH:-outputs/demo/data/novels_text_document}   # made by `make demo` / tools/preprocess_data.py
VOCAB=${VOCAB:-$DATA_DIR/gpt2/gpt2-vocab.json}
MERGES=${MERGES:-$DATA_DIR/gpt2/gpt2-merges.txt}
SAVE=${SAVE:-outputs/mixtral/checkpoints}
# model
NUM_LAYERS=${NUM_LAYERS:-4}
HIDDEN=${HIDDEN:-128}
FFN=${FFN:-448}                        # Mixtral's 3.5 x hidden
HEADS=${HEADS:-8}
QUERY_GROUPS=${QUERY_GROUPS:-2}            # key/value heads (GQA)
SEQ=${SEQ:-128}
ROPE_BASE=${ROPE_BASE:-1000000}
# MoE
NUM_EXPERTS=${NUM_EXPERTS:-8}
TOPK=${TOPK:-2}
EP_SIZE=${EP_SIZE:-1}
MLC=${MLC:-0.01}
# optimisation and run length
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
TRAIN_ITERS=${TRAIN_ITERS:-10}
LR=${LR:-1e-3}
PRECISION=${PRECISION:-}               # --bf16 on GPUs
NPROC=${NPROC:-1}

exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29511}" \
    pretrain_gpt.py \
    --use-mcore-models --disable-bias-linear --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" --num-attention-heads "$HEADS" \
    --init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm \
    --position-embedding-type rope --swiglu --untie-embeddings-and-output-weights --group-query-attention \
    --num-query-groups "$QUERY_GROUPS" --no-masked-softmax-fusion --no-position-embedding --rotary-base "$ROPE_BASE" \
    --num-experts "$NUM_EXPERTS" --moe-layer-freq 1 --moe-router-topk "$TOPK" --moe-router-load-balancing-type aux_loss \
    --moe-aux-loss-coeff "$MLC" --moe-grouped-gemm --moe-token-dispatcher-type alltoall \
    --expert-model-parallel-size "$EP_SIZE" \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --lr "$LR" --train-iters "$TRAIN_ITERS" \
    --lr-decay-style cosine --min-lr 1e-4 --weight-decay 0.1 --lr-warmup-iters 2 --clip-grad 1.0 $PRECISION \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path $DATA_PATH --split 99,1,0 --num-workers 0 \
    --log-interval 1 --eval-interval 1000 --eval-iters 1 --save "$SAVE" --save-interval 1000 "$@"
