#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go (< 8 minutes on one H100): every gpu-marked test (fused losses without
# host syncs, TF32 / --deterministic, a 1-rank NCCL group, the aio CUDA round trip, the offloaded optimizer on CUDA,
# --bf16 MoE training, MoS from an MoE teacher under --bf16, offloaded training) and the CUDA tests of the MoE layer
# and offload cache; then --bf16 training steps of the 8-layer h512 MoE config and of a ~350M-dense + 16-expert config
# (tokens/s, TFLOP/s, MFU against PEAK_FLOPS, peak memory, host syncs per step from torch.cuda.set_sync_debug_mode),
# the aio GB/s, offloaded inference and the MoE-layer GEMM comparison. Every step runs; the script exits non-zero if
# any failed, naming them.
#   examples_moe/gpu_check.sh            # on the GPU machine
#   examples_moe/gpu_check.sh --dry-run  # print the commands only (any machine)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK_DIR=${WORK_DIR:-outputs/gpu_check}
PEAK_FLOPS=${PEAK_FLOPS:-989e12}       # MFU denominator: H100/H200 SXM dense bf16
STEPS=${STEPS:-10}                     # timed training steps per config
MOE_ROUNDS=${MOE_ROUNDS:-5}            # rounds of the MoE-layer benchmark
OFFLOAD_EXPERTS=${OFFLOAD_EXPERTS:-32} # experts per layer of the offloaded-inference benchmark
AIO_MIB=${AIO_MIB:-512}                # tensor size of the aio benchmark
DRY_RUN=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1

FAILED=()
step() {  # step NAME CMD...: runs CMD (prints it), records NAME when it fails, goes on
    local name=$1
    shift
    echo "=== $name: $*"
    [ "$DRY_RUN" = 1 ] && return 0
    local t0=$SECONDS
    if "$@"; then echo "=== $name: ok ($((SECONDS - t0)) s)"; else echo "=== $name: FAILED ($((SECONDS - t0)) s)"; FAILED+=("$name"); fi
}

mkdir -p "$WORK_DIR"
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export MEGATRON_REQUIRE_GPU=1          # tests/gpu fail (never skip) without CUDA

step gpu-tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu tests/csrc/test_aio.py
step cuda-unit-tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/unit/test_offload.py \
    tests/integration/test_optimizer_offload.py tests/unit/test_moe_layer.py -k "cuda or grouped_mm_path"
step train-moe-h512-bf16 "$PYTHON" tools/bench_gpu_step.py --config moe-h512 --bf16 --steps "$STEPS" \
    --peak-flops "$PEAK_FLOPS"
step train-moe-h512-bf16-dropless "$PYTHON" tools/bench_gpu_step.py --config moe-h512 --bf16 --steps "$STEPS" \
    --peak-flops "$PEAK_FLOPS" --disable-moe-token-dropping
step train-350m-moe16-bf16 "$PYTHON" tools/bench_gpu_step.py --config dense350m-moe16 --bf16 --steps "$STEPS" \
    --peak-flops "$PEAK_FLOPS"
step aio-bandwidth "$PYTHON" tools/bench_aio.py --dir "$WORK_DIR" --size_mib "$AIO_MIB" --reps 3 --no_deepspeed
step offload-inference "$PYTHON" tools/bench_offload.py --device cuda --skip-scoring --work-dir "$WORK_DIR/offload" \
    --num-experts "$OFFLOAD_EXPERTS" --repeats 3 --output "$WORK_DIR/offload/results.json"
step moe-layer-gemm "$PYTHON" tools/bench_moe_layer.py --device cuda --dtype bf16 --rounds "$MOE_ROUNDS" --skip-ep \
    --impls moe,moe_loop,deepspeed

if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
