#!/usr/bin/env bash
# Dense GPT pretraining: examples_moe/pretrain_gpt_moe.sh with one expert (= the dense MLP everywhere).
# Megatron-DeepSpeed's 350M dense recipe on GPUs: NUM_LAYERS=24 HIDDEN=1024 HEADS=16 SEQ=2048 GLOBAL_BATCH=256
#   LR=3.0e-4 MIN_LR=3.0e-5 TRAIN_TOKENS=300000000000 WARMUP_TOKENS=375000000 PRECISION=--bf16
set -euo pipefail
export NUM_EXPERTS=1
export SAVE=${SAVE:-outputs/dense/checkpoints}
export TENSORBOARD=${TENSORBOARD:-outputs/dense/tensorboard}
exec "$(dirname "$0")/pretrain_gpt_moe.sh" "$@"
