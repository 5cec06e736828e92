#!/usr/bin/env bash
# PR-MoE: pyramid (more experts in the last MoE layers) + residual (a dense MLP beside each MoE, mixed per
# token). examples_moe/pretrain_gpt_moe.sh with these defaults; every knob there can be set here too.
# Megatron-DeepSpeed's 350M PR-MoE-32/64 recipe on GPUs (ds_pretrain_gpt_350M_PR-MoE32or64.sh):
#   NUM_LAYERS=24 HIDDEN=1024 HEADS=16 SEQ=2048 MLP_TYPE=residual
#   NUM_EXPERTS="32 32 32 32 32 32 32 32 32 32 64 64" EP_SIZE="32 32 32 32 32 32 32 32 32 32 64 64" (per-layer EP)
#   TRAIN_CF=1.0 EVAL_CF=1.0 MIN_CF=4 MLC=0.01 GLOBAL_BATCH=256 LR=3.0e-4 MIN_LR=1.0e-6 PRECISION=--bf16
set -euo pipefail
export NUM_LAYERS=${NUM_LAYERS:-8}
export NUM_EXPERTS=${NUM_EXPERTS:-"4 4 4 8"}   # one per MoE layer: NUM_LAYERS / EXPERT_INTERVAL entries
export MLP_TYPE=${MLP_TYPE:-residual}
export SAVE=${SAVE:-outputs/pr_moe/checkpoints}
export TENSORBOARD=${TENSORBOARD:-outputs/pr_moe/tensorboard}
exec "$(dirname "$0")/pretrain_gpt_moe.sh" "$@"
