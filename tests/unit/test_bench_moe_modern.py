"""tools/bench_moe_layer.py --modern: the timed MoELayer and transformers' own sparse MoE blocks are the same
function on the copied weights (the benchmark asserts it in its warm-up round), at a toy size."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

from tests.conftest import ROOT  # noqa: E402

spec = importlib.util.spec_from_file_location("bench_moe_layer", os.path.join(ROOT, "tools", "bench_moe_layer.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("case", [("fine-grained", 8, 48, 32, 16, 4, 16, "qwen3_moe"),
                                  ("mixtral", 4, 48, 32, 56, 2, None, "mixtral")])
def test_modern_rows_check_parity_and_report(case):
    res, speedup = bench.bench_modern(case, rounds=1, names=["moe", "hf", "hf_eager"])
    assert set(res) == {"ideal", "moe", "hf", "hf_eager"} and set(speedup) == {"hf", "hf_eager"}
    assert res["ideal"][0] == 1.0


def test_modern_parity_check_fails_on_different_weights(monkeypatch):
    """The warm-up assertion is live: perturbed expert weights make it fail."""
    copy_from = bench.ModernMoE.copy_from

    def wrong_copy(self, hf):
        copy_from(self, hf)
        with torch.no_grad():
            self.layer.experts.w2_eDF.mul_(1.01)

    monkeypatch.setattr(bench.ModernMoE, "copy_from", wrong_copy)
    with pytest.raises(AssertionError):
        bench.bench_modern(("mixtral", 4, 48, 32, 56, 2, None, "mixtral"), rounds=1, names=["moe", "hf"])
