#!/usr/bin/env bash
# DeepSeek-V3-style MoE GPT at CPU size: the model flags of Megatron-LM's
# examples/megatron_fsdp/sbatch_mfsdp_deepseek_v3.sh (MLA with q/kv LoRA ranks and a decoupled RoPE head dim,
# RMSNorm eps 1e-6, SwiGLU, untied head, no biases, dense first layers then MoE via --moe-layer-freq, fine-grained
# experts plus a shared expert) with the sizes shrunk; runs a few iterations.
# Not here (yet): YaRN RoPE scaling (--rotary-scaling-factor 40 is refused in one line) and multi-token prediction.
# Routing as DeepSeek-V3 (Megatron-LM's flags): sigmoid scores, aux-loss-free expert bias, group-limited top-k,
# scaled combine weights, a small sequence-level aux loss, dropless.
# DeepSeek-V3 itself: NUM_LAYERS=61 HIDDEN=7168 FFN=18432 HEADS=128 LAYER_FREQ='[0]*3+[1]*58' NUM_EXPERTS=256
# MOE_FFN=2048 SHARED_FFN=2048 TOPK=8 Q_LORA=1536 KV_LORA=512 QK_DIM=128 ROPE_DIM=64 V_DIM=128 SEQ=4096.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
DATA_PATH=${DATA_PATH:-outputs/demo/data/novels_text_document}   # made by `make demo` / tools/preprocess_data.py
VOCAB=${VOCAB:-$DATA_DIR/gpt2/gpt2-vocab.json}
MERGES=${MERGES:-$DATA_DIR/gpt2/gpt2-merges.txt}
SAVE=${SAVE:-outputs/deepseek_v3/checkpoints}
# model
NUM_LAYERS=${NUM_LAYERS:-4}
HIDDEN=${HIDDEN:-128}
FFN=${FFN:-320}                        # the dense first layers' MLP
HEADS=${HEADS:-4}
LAYER_FREQ=${LAYER_FREQ:-'[0]*1+[1]*3'}  # one dense layer, then MoE layers
Q_LORA=${Q_LORA:-48}
KV_LORA=${KV_LORA:-32}
QK_DIM=${QK_DIM:-32}
ROPE_DIM=${ROPE_DIM:-16}
V_DIM=${V_DIM:-32}
SEQ=${SEQ:-128}
# MoE: fine-grained routed experts and one shared expert
NUM_EXPERTS=${NUM_EXPERTS:-16}
MOE_FFN=${MOE_FFN:-32}
SHARED_FFN=${SHARED_FFN:-32}
TOPK=${TOPK:-4}
EP_SIZE=${EP_SIZE:-1}
MLC=${MLC:-1e-4}
ROUTER_GROUPS=${ROUTER_GROUPS:-4}          # DeepSeek-V3: 8 groups, 4 used per token, weights x 2.5
ROUTER_GROUP_TOPK=${ROUTER_GROUP_TOPK:-2}
ROUTER_SCALE=${ROUTER_SCALE:-2.5}
# optimisation and run length
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
TRAIN_ITERS=${TRAIN_ITERS:-10}
LR=${LR:-1e-3}
PRECISION=${PRECISION:-}               # --bf16 on GPUs
NPROC=${NPROC:-1}

exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29513}" \
    pretrain_gpt.py \
    --expert-model-parallel-size "$EP_SIZE" --use-mcore-models --use-flash-attn --disable-bias-linear \
    --transformer-impl transformer_engine --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN" --num-attention-heads "$HEADS" \
    --position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu \
    --untie-embeddings-and-output-weights --multi-latent-attention --attention-dropout 0.0 --hidden-dropout 0.0 \
    --qk-layernorm --q-lora-rank "$Q_LORA" --kv-lora-rank "$KV_LORA" --qk-head-dim "$QK_DIM" \
    --qk-pos-emb-head-dim "$ROPE_DIM" --v-head-dim "$V_DIM" \
    --num-experts "$NUM_EXPERTS" --moe-layer-freq "$LAYER_FREQ" --moe-ffn-hidden-size "$MOE_FFN" \
    --moe-shared-expert-intermediate-size "$SHARED_FFN" --moe-router-topk "$TOPK" --moe-router-score-function sigmoid \
    --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 --moe-router-num-groups "$ROUTER_GROUPS" \
    --moe-router-group-topk "$ROUTER_GROUP_TOPK" --moe-router-topk-scaling-factor "$ROUTER_SCALE" \
    --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff "$MLC" --moe-grouped-gemm --init-method-std 0.02 \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --lr "$LR" --train-iters "$TRAIN_ITERS" \
    --lr-decay-style cosine --min-lr 1e-4 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
    --lr-warmup-iters 2 --clip-grad 1.0 $PRECISION \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path $DATA_PATH --split 99,1,0 --num-workers 0 \
    --log-interval 1 --eval-interval 1000 --eval-iters 1 --save "$SAVE" --save-interval 1000 "$@"
