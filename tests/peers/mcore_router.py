"""megatron-core's own TopKRouter on CPU, for tests/unit/test_router_mcore.py (run with the .venv-mcore python).

Usage: python tests/peers/mcore_router.py CASES.pt RESULTS.pt. CASES is a torch.save'd list of dicts: `config`
(TransformerConfig moe_* fields), `weight` [E, D], optional `expert_bias` [E], `x` [B, S, D] (batch-first, as this
project's tokens), `grad` [B*S, E] (the upstream gradient of the probs), `bias_update_rate` and `seed` (of the
input jitter's draws). Each result holds, in this project's batch-first token order: probs [B*S, E], routing_map,
the tracked aux/seq/global/z losses (divided by their coefficients, as megatron-core logs them), the router weight's
gradient, the kept-token counts and the updated expert bias. Runs megatron-core 0.16.1 on CPU: torch.cuda.current_device returns "cpu", TransformerEngine's GEMM is
off, and one single-rank gloo group stands in for every process group.
"""
import os
import sys

import torch
import torch.distributed as dist

torch.cuda.current_device = lambda: "cpu"

from megatron.core.transformer.moe import moe_utils  # noqa: E402

moe_utils.te_general_gemm = None
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
              "global_aux_loss": "global_load_balancing_loss"}


def run_case(case, group):
    x_BSD = case["x"]
    B, S, D = x_BSD.shape
    E = case["weight"].shape[0]
    cfg = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1, num_moe_experts=E,
                            add_bias_linear=False, params_dtype=torch.float32, **case["config"])
    pgs = ProcessGroupCollection(tp=group, cp=group, tp_cp=group, tp_dp_cp=group)
    router = TopKRouter(cfg, pg_collection=pgs)
    router.set_layer_number(1)
    with torch.no_grad():
        router.weight.copy_(case["weight"])
        if case.get("expert_bias") is not None:
            router.expert_bias.copy_(case["expert_bias"])
    router.train()
    moe_utils.clear_aux_losses_tracker()
    x_SBD = x_BSD.transpose(0, 1).contiguous().requires_grad_(False)
    torch.manual_seed(case.get("seed", 0))  # input jitter draws from the default generator
    probs, routing_map = router(x_SBD)
    probs_BSE = probs.view(S, B, E).transpose(0, 1).reshape(B * S, E)  # megatron-core orders tokens [S, B]
    map_BSE = routing_map.view(S, B, E).transpose(0, 1).reshape(B * S, E)
    probs_BSE.backward(case["grad"].to(probs.dtype))
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    losses = {k: float(tracker[v]["values"][0]) for k, v in LOSS_NAMES.items() if v in tracker}
    if "z_loss" in tracker:
        losses["z_loss"] = float(tracker["z_loss"]["values"][0])
    out = {"probs": probs_BSE.detach(), "routing_map": map_BSE, "losses": losses,
           "weight_grad": router.weight.grad.clone()}
    if router.expert_bias is not None:
        out["tokens"] = router.local_tokens_per_expert.clone()
        out["expert_bias"] = moe_utils.get_updated_expert_bias(router.local_tokens_per_expert.clone(),
                                                               router.expert_bias, case["bias_update_rate"])
    for name in list(tracker):
        del tracker[name]
    return out


def main(cases_path, results_path):
    dist.init_process_group("gloo", init_method=f"file://{results_path}.rendezvous", rank=0, world_size=1)
    group = dist.group.WORLD
    moe_utils.parallel_state.get_tensor_and_data_parallel_group = lambda **kw: group
    try:
        results = [run_case(case, group) for case in torch.load(cases_path, weights_only=False)]
    finally:
        dist.destroy_process_group()
        if os.path.exists(f"{results_path}.rendezvous"):
            os.remove(f"{results_path}.rendezvous")
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
