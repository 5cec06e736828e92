"""Expert Adam state on NVMe at EP=2 (2 gloo ranks, each holding 2 of 4 experts and its own store): 10 steps with
offload equal 10 steps in memory bit for bit (weights, dense and expert Adam state, every logged loss), with
clipping active and one expert that receives no token."""
import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed_jobs
from tests.integration.test_optimizer_offload import MOE, STARVED, expert_adam_state, starve_expert


def _run(rank, world_size, argv):
    with starve_expert():
        r = pretrain(argv)
    st = r["state"]
    dense = {n: {k: v.clone() for k, v in st.optimizer.state[p].items()} for n, p in st.model.named_parameters()
             if p in st.optimizer.state and not getattr(p, "expert_parallel", False)}
    starved_rows = [torch.count_nonzero(st.model.layers[i].mlp.experts.w1_eFD.grad[STARVED % 2]).item()
                    for i in range(2)] if st.groups.rank == STARVED // 2 else None
    return {"params": {n: p.detach().clone() for n, p in st.model.named_parameters()},
            "experts": expert_adam_state(st), "dense": dense, "losses": r["losses"], "starved_rows": starved_rows}


def test_ep2_offload_equals_in_memory(tiny_corpus, tmp_path):
    argv = tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "10", "--moe-expert-parallel-size", "2",
                           "--global-batch-size", "8")
    ref, off = run_distributed_jobs([(_run, (argv,)), (_run, (argv + ["--moe-offload-optimizer", "nvme",
                                                                      "--moe-offload-dir", str(tmp_path / "off")],))],
                                    2)  # one spawn for both
    assert ref[1]["starved_rows"] == [0, 0]  # rank 1 holds experts 2 and 3; 3 got no token in either MoE layer
    for a, b in zip(ref, off):
        assert a["losses"] == b["losses"] and len(a["losses"]) == 10
        for n, v in a["params"].items():
            assert torch.equal(v, b["params"][n]), n
        assert sorted(a["experts"]) == sorted(b["experts"]) and a["experts"]
        for n, st in a["experts"].items():
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], b["experts"][n][k]), (n, k)
        assert sorted(a["dense"]) == sorted(b["dense"]) and a["dense"]
        for n, st in a["dense"].items():
            for k, v in st.items():
                assert torch.equal(v, b["dense"][n][k]), (n, k)
    assert not torch.equal(ref[0]["params"]["layers.0.mlp.experts.w1_eFD"], ref[1]["params"]["layers.0.mlp.experts.w1_eFD"])
