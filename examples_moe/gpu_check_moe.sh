#!/usr/bin/env bash
# The MoE-layer checks that need a CUDA GPU, in one go: torch._grouped_mm experts equal the per-expert loop on CUDA
# (fp32, bf16), then E=8/64/128 bf16 forward+backward for grouped GEMM vs the loop vs DeepSpeed's MoE.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-10}
DTYPE=${DTYPE:-bf16}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PYTHON" -m pytest -q tests/unit/test_moe_layer.py -k "grouped_mm_path" -p no:cacheprovider
"$PYTHON" tools/bench_moe_layer.py --device cuda --dtype "$DTYPE" --rounds "$ROUNDS" --skip-ep \
    --impls moe,moe_loop,deepspeed
