#!/usr/bin/env bash
# Qwen3-MoE-style GPT at CPU size: the flag set of Megatron-LM's
# examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh (RMSNorm, SwiGLU, GQA with --kv-channels, QK-norm,
# RoPE base 1e6, untied head, no biases, fine-grained experts: many small experts, top-8, on every layer) with the
# sizes shrunk; runs a few iterations.
# Qwen3-30B-A3B itself: NUM_LAYERS=48 HIDDEN=2048 FFN=6144 HEADS=32 QUERY_GROUPS=4 KV_CHANNELS=128 NUM_EXPERTS=128
# MOE_FFN=768 TOPK=8 MLC=1e-3 SEQ=4096 (routed with Megatron-LM's router flags, as its config).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
DATA_PATH=${DATA_PATH:-outputs/demo/data/novels_text_document}   # made by `make demo` / tools/preprocess_data.py
VOCAB=${VOCAB:-$DATA_DIR/gpt2/gpt2-vocab.json}
MERGES=${MERGES:-$DATA_DIR/gpt2/gpt2-merges.txt}
SAVE=${SAVE:-outputs/qwen3_moe/checkpoints}
# model
NUM_LAYERS=${NUM_LAYERS:-4}
HIDDEN=${HIDDEN:-128}
FFN=${FFN:-384}
HEADS=${HEADS:-8}
QUERY_GROUPS=${QUERY_GROUPS:-2}
KV_CHANNELS=${KV_CHANNELS:-32}         # head dim independent of hidden / heads, as Qwen3
SEQ=${SEQ:-128}
# MoE: fine-grained experts
NUM_EXPERTS=${NUM_EXPERTS:-16}
MOE_FFN=${MOE_FFN:-48}
TOPK=${TOPK:-4}
EP_SIZE=${EP_SIZE:-1}
MLC=${MLC:-1e-3}
# optimisation and run length
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
TRAIN_ITERS=${TRAIN_ITERS:-10}
LR=${LR:-1e-3}
PRECISION=${PRECISION:-}               # --bf16 on GPUs
NPROC=${NPROC:-1}

exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29512}" \
    pretrain_gpt.py \
    --no-masked-softmax-fusion --disable-bias-linear --untie-embeddings-and-output-weights \
    --position-embedding-type rope --no-rope-fusion --normalization RMSNorm --swiglu \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" --num-attention-heads "$HEADS" \
    --group-query-attention --num-query-groups "$QUERY_GROUPS" --kv-channels "$KV_CHANNELS" --qk-layernorm \
    --num-experts "$NUM_EXPERTS" --moe-ffn-hidden-size "$MOE_FFN" --moe-layer-freq 1 --moe-router-topk "$TOPK" \
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff "$MLC" --moe-token-dispatcher-type alltoall \
    --expert-model-parallel-size "$EP_SIZE" \
    --seq-length "$SEQ" --max-position-embeddings "$SEQ" --use-mcore-models --rotary-percent 1.0 \
    --rotary-base 1000000 --no-bias-swiglu-fusion --attention-dropout 0.0 --hidden-dropout 0.0 \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --lr "$LR" --train-iters "$TRAIN_ITERS" \
    --lr-decay-style cosine --min-lr 1e-4 --weight-decay 0.1 --lr-warmup-iters 2 --clip-grad 1.0 $PRECISION \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path $DATA_PATH --split 99,1,0 --num-workers 0 \
    --log-interval 1 --eval-interval 1000 --eval-iters 1 --save "$SAVE" --save-interval 1000 "$@"
