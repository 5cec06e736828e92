"""Pipeline-parallel checkpoints (issue 27): a dense file per (TP, PP) rank (mp_rank_00_000, mp_rank_00_001), expert
files under global ids; exact resume at PP=2 (2 steps, save, 2 more = 4 straight: the same losses and weights, bit
for bit); and the reshard round trip PP=2 -> PP=1 -> PP=2 with the same validation loss, both through
tools/checkpoint_reshard.py and by loading the PP=2 checkpoint directly at PP=1 (loading merges the stages' files).
Validation-loss tolerance rel 1e-6 (fp32): the same weights, evaluated by the same ops with and without stages."""
import os

import pytest
import torch

from megatron.training import evaluate, pretrain, setup_from_argv
from tests.dist.launcher import run_distributed_jobs
from tests.dist.test_pipeline import PR_MOE, argv_for

PP2 = ["--pipeline-model-parallel-size", "2"]


def _train(rank, world_size, argv):
    r = pretrain(argv)
    st = r["state"]
    st.resources.close()
    return {"losses": r["losses"], "val": r["val_loss"],
            "weights": {k: v.detach().clone() for k, v in st.model.state_dict().items()}}


def _val(rank, world_size, argv):
    st, _, make_valid, _ = setup_from_argv(argv)
    try:
        return evaluate(st, make_valid, 2)
    finally:
        st.resources.close()


@pytest.mark.slow
def test_pp2_exact_resume_and_reshard_round_trip(tiny_corpus, tmp_path):
    from tools.checkpoint_reshard import convert

    base = argv_for(tiny_corpus, tmp_path, *PR_MOE)
    s1, s2 = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight, first_half, resumed = run_distributed_jobs([
        (_train, (base + PP2 + ["--save", s1, "--save-interval", "2"],)),
        (_train, (base + PP2 + ["--exit-interval", "2", "--save", s2],)),
        (_train, (base + PP2 + ["--load", s2, "--save", s2],)),
    ], 2)
    it4 = os.path.join(s1, "iter_0000004")
    assert sorted(d for d in os.listdir(it4) if d.startswith("mp_rank")) == ["mp_rank_00_000", "mp_rank_00_001"]
    assert any(f.startswith("layer_1_expert_3_") for f in os.listdir(it4))  # PR-MoE's second MoE layer, stage 1
    for rank in range(2):  # exact resume: steps 3-4 after the load are steps 3-4 of the straight run
        assert first_half[rank]["losses"] + resumed[rank]["losses"] == straight[rank]["losses"]
        for k, v in straight[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][k], v), k
    val = straight[0]["val"]
    assert straight[1]["val"] == val

    pp1 = convert(s1, str(tmp_path / "pp1"), 1, target_pp=1)
    assert sorted(d for d in os.listdir(pp1) if d.startswith("mp_rank")) == ["mp_rank_00"]
    back = convert(str(tmp_path / "pp1"), str(tmp_path / "pp2"), 1, target_pp=2)
    assert sorted(d for d in os.listdir(back) if d.startswith("mp_rank")) == ["mp_rank_00_000", "mp_rank_00_001"]
    # PP=1 from the resharded checkpoint and straight from the PP=2 one (merged at load), in this process
    for load in (pp1, it4):
        assert _val(0, 1, base + ["--load", load]) == pytest.approx(val, rel=1e-6)
    # and back at PP=2, from the PP=1 -> PP=2 reshard and from the PP=1 checkpoint directly (split at load)
    for ranks in run_distributed_jobs([(_val, (base + PP2 + ["--load", back],)),
                                       (_val, (base + PP2 + ["--load", pp1],))], 2):
        for got in ranks:
            assert got == pytest.approx(val, rel=1e-6)


@pytest.mark.slow
def test_pp2_tp2_reshards_to_one_process_and_back(tiny_corpus, tmp_path):
    """PP=2 x TP=2 (four ranks, MoE) -> tools/checkpoint_reshard.py --target-tp 1 --target-pp 1 -> one process, and
    that checkpoint -> --target-tp 2 --target-pp 2 -> four ranks again: the validation loss is the same throughout
    (rel 1e-5: TP's vocab-parallel loss and row-parallel sums add in another order than one process)."""
    from tools.checkpoint_reshard import convert

    base = argv_for(tiny_corpus, tmp_path, *PR_MOE, "--train-iters", "2")
    par = PP2 + ["--tensor-model-parallel-size", "2"]
    save = str(tmp_path / "pp2tp2")
    trained = run_distributed_jobs([(_train, (base + par + ["--save", save],))], 4)[0]
    val = trained[0]["val"]
    one = convert(save, str(tmp_path / "one"), 1, target_pp=1)
    assert _val(0, 1, base + ["--load", one]) == pytest.approx(val, rel=1e-5)
    back = convert(str(tmp_path / "one"), str(tmp_path / "back"), 2, target_pp=2)
    assert sorted(d for d in os.listdir(back) if d.startswith("mp_rank")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for got in run_distributed_jobs([(_val, (base + par + ["--load", back],))], 4)[0]:
        assert got == pytest.approx(val, rel=1e-5)
