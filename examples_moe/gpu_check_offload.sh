#!/usr/bin/env bash
# The NVMe-offload checks that need a CUDA GPU, in one go (the cache in GPU memory, reads staged through pinned
# host buffers and copied on a side stream): the CUDA equality test, then the decode rows of the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK_DIR=${WORK_DIR:-outputs/bench_offload_gpu}
NUM_EXPERTS=${NUM_EXPERTS:-32}
REPEATS=${REPEATS:-3}

"$PYTHON" -m pytest -q tests/unit/test_offload.py -k "cuda or equal_resident" -p no:cacheprovider
"$PYTHON" tools/bench_offload.py --device cuda --skip-scoring --work-dir "$WORK_DIR" --num-experts "$NUM_EXPERTS" \
    --repeats "$REPEATS" --output "$WORK_DIR/results.json"
