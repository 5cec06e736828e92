#!/usr/bin/env bash
# Mixture-of-Students: distil a PR-MoE teacher into a student with 12.5% fewer layers, with staged KD (the
# teacher stops after KD_STOP_ITERS and the student continues on LM loss alone). Knobs of
# examples_moe/pretrain_gpt_moe.sh apply to the student.
# Megatron-DeepSpeed's 350M MoS recipe on GPUs: teacher 24 layers PR-MoE-32/64, student NUM_LAYERS=21
#   NUM_EXPERTS="32 32 32 32 32 32 32 32 32 64" KD_TEMP=1.0 KD_ALPHA=1.0 KD_BETA=1.0, staged KD stopping at
#   ~400K steps of the 300B-token run (KD_STOP_ITERS).
set -euo pipefail
TEACHER=${TEACHER:-outputs/pr_moe/checkpoints}
TEACHER_LAYERS=${TEACHER_LAYERS:-8}
TEACHER_EXPERTS=${TEACHER_EXPERTS:-"4 4 4 8"}
KD_TEMP=${KD_TEMP:-1.0}
KD_ALPHA=${KD_ALPHA:-1.0}
KD_BETA=${KD_BETA:-1.0}
KD_STOP_ITERS=${KD_STOP_ITERS:-60}
export NUM_LAYERS=${NUM_LAYERS:-7}              # 12.5% fewer than the teacher
export NUM_EXPERTS=${NUM_EXPERTS:-"4 4 8"}      # the teacher's pyramid minus one MoE layer
export MLP_TYPE=${MLP_TYPE:-residual}
export SAVE=${SAVE:-outputs/mos/checkpoints}
export TENSORBOARD=${TENSORBOARD:-outputs/mos/tensorboard}
exec "$(dirname "$0")/pretrain_gpt_moe.sh" --mos --load-teacher "$TEACHER" \
    --num-layers-teacher "$TEACHER_LAYERS" --num-experts-teacher $TEACHER_EXPERTS \
    --kd-temp "$KD_TEMP" --kd-alpha-ce "$KD_ALPHA" --kd-beta-ce "$KD_BETA" --mos-kd-stop-iters "$KD_STOP_ITERS" "$@"
