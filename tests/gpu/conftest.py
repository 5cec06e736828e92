"""tests/gpu: every test here is `gpu`-marked and needs CUDA. Without CUDA they skip, saying so; with
MEGATRON_REQUIRE_GPU=1 (examples_moe/gpu_check.sh) a missing GPU is a failure, never a silent green.
MEGATRON_GPU_TESTS_ON_CPU=1 runs them anyway (the device-independent flows run on the CPU; a check of the scripts'
flags without a GPU)."""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available() and os.environ.get("MEGATRON_GPU_TESTS_ON_CPU") != "1":
        if os.environ.get("MEGATRON_REQUIRE_GPU") == "1":
            pytest.fail("MEGATRON_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("needs a CUDA GPU (tests/gpu)")
