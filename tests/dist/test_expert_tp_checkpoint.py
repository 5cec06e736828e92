"""Expert files per ETP rank and resharding at load (issue 27): a checkpoint saved at --expert-tensor-parallel-size
2 resumes at ETP 1 and the reverse (weights and Adam state merged / cut along each tensor's split dim), continuing
as the run at the saved ETP does; a TP=2 x EP=2 checkpoint (EP folded over TP) loads at TP=1 x EP=1 and back
with equal validation loss; and the shard/merge helpers invert each other."""
import os

import pytest
import torch

from megatron.checkpointing.experts import reshard_etp
from megatron.training import pretrain
from moe.experts import etp_merge, etp_shard
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed_jobs

# dropless top-2 (no capacity: the kept tokens do not depend on how they are split), no dropout, clipping active
MOE = ["--num-experts", "4", "--expert-interval", "2", "--topk", "2", "--disable-moe-token-dropping",
       "--disable-moe-top2-2nd-expert-sampling", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
       "--clip-grad", "0.05", "--global-batch-size", "8", "--micro-batch-size", "2", "--eval-iters", "3",
       "--lr-decay-iters", "6"]


def _run(rank, world_size, argv):
    r = pretrain(argv)
    return {"losses": r["losses"], "val": r["val_loss"]}


def test_shard_merge_round_trip_and_payload_reshard():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(2 * 6, 4, generator=g)  # swiglu fc1 [gate; up] of F = 6
    for q in (2, 3):
        pieces = [etp_shard(w1, 0, q, r, gated=True) for r in range(q)]
        assert all(torch.equal(p[:6 // q], w1[r * (6 // q):(r + 1) * (6 // q)]) for r, p in enumerate(pieces))
        assert torch.equal(etp_merge(pieces, 0, gated=True), w1)
    w2 = torch.randn(4, 6, generator=g)
    dims = {"w1_eFD": (0, True), "w2_eDF": (1, False)}
    whole = {"model": {"w1_eFD": w1, "w2_eDF": w2},
             "optimizer": {"w1_eFD": {"step": torch.tensor(3.0), "exp_avg": w1 * 2, "exp_avg_sq": w1 ** 2}}}
    shards = [reshard_etp([whole], dims, 2, r) for r in range(2)]  # ETP 1 -> 2
    back = reshard_etp(shards, dims, 1, 0)  # ETP 2 -> 1
    assert torch.equal(back["model"]["w1_eFD"], w1) and torch.equal(back["model"]["w2_eDF"], w2)
    assert torch.equal(back["optimizer"]["w1_eFD"]["exp_avg"], w1 * 2)
    assert back["optimizer"]["w1_eFD"]["step"] == 3.0 and back["etp_size"] == 1
    assert shards[1]["model"]["w2_eDF"].shape == (4, 3)


@pytest.mark.slow  # seven 2-process CLI runs in one spawn: ~40 s on the shared cores
def test_etp2_checkpoint_resumes_at_etp1_and_back(tiny_corpus, tmp_path):
    """DP=2 on 2 ranks: ETP 2 (experts split over the two DP ranks) and ETP 1 each train 3 steps and save; each
    checkpoint resumes at the other ETP size to step 6 (and an ETP 2 checkpoint written under ZeRO-1, whose expert
    Adam state is gathered over the grid's expert-DP group, resumes at ETP 1 without ZeRO). Every continuation equals ETP 2 resuming its own checkpoint
    (losses of steps 4-6 and the validation loss, 1e-5: fp32 sums in another order), which needs the Adam moments
    resharded exactly as the weights."""
    base = tiny_train_argv(tiny_corpus, tmp_path, *MOE)
    s2, s1 = str(tmp_path / "etp2"), str(tmp_path / "etp1")
    etp2 = ["--expert-tensor-parallel-size", "2"]
    runs = run_distributed_jobs([
        (_run, (base + etp2 + ["--train-iters", "3", "--save", s2],)),
        (_run, (base + ["--train-iters", "3", "--save", s1],)),
        (_run, (base + etp2 + ["--train-iters", "6", "--load", s2],)),  # the reference continuation
        (_run, (base + ["--train-iters", "6", "--load", s2],)),  # ETP 2 -> 1
        (_run, (base + etp2 + ["--train-iters", "6", "--load", s1],)),  # ETP 1 -> 2
        (_run, (base + etp2 + ["--zero-stage", "1", "--train-iters", "3", "--save", s2 + "z"],)),
        (_run, (base + ["--train-iters", "6", "--load", s2 + "z"],)),  # ETP 2 under ZeRO-1 -> ETP 1 without
    ], world_size=2)
    assert sorted(f for f in os.listdir(os.path.join(s2, "iter_0000003")) if "expert_0_" in f) == [
        "layer_0_expert_0_mp_rank_00_model_states.pt", "layer_0_expert_0_mp_rank_01_model_states.pt"]
    torch.testing.assert_close(torch.tensor(runs[0][0]["losses"]), torch.tensor(runs[1][0]["losses"]),
                               rtol=1e-5, atol=1e-5)
    # one-process readers merge the ETP shards: the whole-model loader and read_whole_expert (HF export, offload)
    from megatron.checkpointing import build_model_from_checkpoint, read_whole_expert
    whole2, whole1 = (build_model_from_checkpoint(s).model.state_dict() for s in (s2, s1))
    for k in whole1:
        torch.testing.assert_close(whole2[k], whole1[k], rtol=1e-5, atol=1e-5, msg=k)
    it2, it1 = os.path.join(s2, "iter_0000003"), os.path.join(s1, "iter_0000003")
    one2, one1 = read_whole_expert(it2, 0, 3)["model"], read_whole_expert(it1, 0, 3)["model"]
    assert one2.keys() == one1.keys()
    for k in one1:
        torch.testing.assert_close(one2[k], one1[k], rtol=1e-5, atol=1e-5, msg=k)
    ref = runs[2][0]
    for got in (runs[3][0], runs[4][0], runs[6][0]):
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
        assert abs(got["val"] - ref["val"]) < 1e-5, (got["val"], ref["val"])


@pytest.mark.slow  # 2-process and 1-process CLI runs plus two conversions: ~40 s
def test_tp2_ep2_checkpoint_loads_at_tp1_ep1_and_back(tiny_corpus, tmp_path):
    """TP=2 x EP=2 on 2 ranks (EP folded over the TP ranks, tokens de-duplicated) trains 3 steps and saves;
    tools/checkpoint_tp.py makes the dense part TP=1 (expert files carry over), and one process at TP=1 x EP=1
    loads it: equal validation loss. The reverse from a one-process checkpoint likewise (1e-5, fp32)."""
    from tools.checkpoint_tp import convert
    base = tiny_train_argv(tiny_corpus, tmp_path, *MOE)
    par = ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2", "--global-batch-size", "2",
           "--micro-batch-size", "2"]
    one = ["--global-batch-size", "2", "--micro-batch-size", "2"]
    a, b = str(tmp_path / "tp2ep2"), str(tmp_path / "tp1ep1")
    saved_par = run_distributed_jobs([(_run, (base + par + ["--train-iters", "3", "--save", a],))], 2)[0][0]
    saved_one = pretrain(base + one + ["--train-iters", "3", "--save", b])
    convert(a, a + "_tp1", 1)
    convert(b, b + "_tp2", 2)
    loaded_one = pretrain(base + one + ["--train-iters", "3", "--load", a + "_tp1"])
    loaded_par = run_distributed_jobs([(_run, (base + par + ["--train-iters", "3", "--load", b + "_tp2"],))], 2)
    assert abs(loaded_one["val_loss"] - saved_par["val"]) < 1e-5, (loaded_one["val_loss"], saved_par["val"])
    assert abs(loaded_par[0][0]["val"] - saved_one["val_loss"]) < 1e-5
