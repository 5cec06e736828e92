#!/usr/bin/env bash
# Standard MoE GPT pretraining (Megatron-DeepSpeed flag names), launched with torchrun so the same script runs
# on one CPU process, many GPUs, or many nodes. Defaults are sized for a 2-core CPU; every knob can be set
# from the environment.
#
# The Megatron-DeepSpeed 350M+MoE-128 recipe on GPUs (ds_pretrain_gpt_350M_MoE128.sh):
#   NUM_LAYERS=24 HIDDEN=1024 HEADS=16 SEQ=2048 NUM_EXPERTS=128 EP_SIZE=<GPUs, up to 128> TOPK=1
#   TRAIN_CF=1.0 EVAL_CF=1.0 MIN_CF=4 MLC=0.01 MICRO_BATCH=4 GLOBAL_BATCH=256 LR=2.0e-4 MIN_LR=2.0e-6
#   TRAIN_TOKENS=300000000000 WARMUP_TOKENS=375000000 DECAY_TOKENS=300000000000 PRECISION=--bf16 (or --fp16)
#   GPUS_PER_NODE=8 NNODES=... NODE_RANK=... MASTER_ADDR=... DATA_PATH=<your pile/openwebtext prefix>
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-$([ -d ../shared/data ] && echo ../shared/data || echo ./data)}
DATA_PATH=${DATA_PATH:-outputs/demo/data/novels_text_document}   # made by `make demo` / tools/preprocess_data.py
VOCAB=${VOCAB:-$DATA_DIR/gpt2/gpt2-vocab.json}
MERGES=${MERGES:-$DATA_DIR/gpt2/gpt2-merges.txt}
SAVE=${SAVE:-outputs/moe/checkpoints}
TENSORBOARD=${TENSORBOARD:-outputs/moe/tensorboard}
# model
TP_SIZE=${TP_SIZE:-1}                  # tensor parallelism; GPUS_PER_NODE x NNODES = TP_SIZE x data-parallel size
NUM_LAYERS=${NUM_LAYERS:-4}
HIDDEN=${HIDDEN:-128}
HEADS=${HEADS:-4}
SEQ=${SEQ:-256}
# MoE
NUM_EXPERTS=${NUM_EXPERTS:-8}          # one value, or a quoted list with one per MoE layer (pyramid)
EXPERT_INTERVAL=${EXPERT_INTERVAL:-2}
EP_SIZE=${EP_SIZE:-1}                  # one value, or a quoted list with one per MoE layer
TOPK=${TOPK:-1}
TRAIN_CF=${TRAIN_CF:-1.0}
EVAL_CF=${EVAL_CF:-1.0}
MIN_CF=${MIN_CF:-4}
MLC=${MLC:-0.01}
DROPLESS=${DROPLESS:-}                 # set to --disable-moe-token-dropping for dropless routing
MLP_TYPE=${MLP_TYPE:-standard}         # residual = Residual-MoE (with a NUM_EXPERTS list: PR-MoE)
# optimisation
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
LR=${LR:-1e-3}
MIN_LR=${MIN_LR:-1e-4}
TRAIN_TOKENS=${TRAIN_TOKENS:-1228800}
WARMUP_TOKENS=${WARMUP_TOKENS:-40960}
DECAY_TOKENS=${DECAY_TOKENS:-$TRAIN_TOKENS}
PRECISION=${PRECISION:-}               # --bf16 or --fp16 on GPUs
# launch
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    pretrain_gpt.py \
    --tensor-model-parallel-size "$TP_SIZE" \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
    --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
    --num-experts $NUM_EXPERTS --expert-interval "$EXPERT_INTERVAL" --moe-expert-parallel-size $EP_SIZE \
    --topk "$TOPK" --moe-train-capacity-factor "$TRAIN_CF" --moe-eval-capacity-factor "$EVAL_CF" \
    --moe-min-capacity "$MIN_CF" --moe-loss-coeff "$MLC" --mlp-type "$MLP_TYPE" $DROPLESS \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
    --train-tokens "$TRAIN_TOKENS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
    --lr-warmup-tokens "$WARMUP_TOKENS" --lr-decay-tokens "$DECAY_TOKENS" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02 \
    --hidden-dropout 0.0 --attention-dropout 0.0 $PRECISION \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path $DATA_PATH --split 969,30,1 --num-workers 1 \
    --log-interval 10 --eval-interval 100 --eval-iters 10 \
    --save "$SAVE" --save-interval 1000 --tensorboard-dir "$TENSORBOARD" "$@"
