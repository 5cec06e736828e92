"""GPU behaviour of the dense GPT training step, proven on the CPU (megatron/audit.py): under --bf16 with CUDA's
autocast rules every GEMM runs in bf16 (the loss statistics are not GEMMs: fp32 softmax passes); the model's forward
and backward, the fused loss and the optimizer step issue no host sync; the step's remaining syncs are the two
documented below; and the model runs forward and backward on the `meta` device (a tensor made on the wrong device,
or a `.item()`, fails there)."""
import collections

import pytest
import torch
import torch.nn.functional as F

from megatron import parallel_state
from megatron.arguments import parse_args, train_config_from_args
from megatron.audit import DispatchAudit, cuda_autocast_rules
from megatron.model import GPTModel
from megatron.training import setup_train_state, train_step

ARGV = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--peak-flops", "1e11"]

# The step's host syncs today, by (file, function), each with why it is there. Both are the training loop's
# (megatron/training.py is being restructured; they move to logging steps there):
# - clip_grad_norm returns the norm as a Python float: the per-step non-finite check (--check-for-nan-in-loss-and-
#   grad, on by default) reads it on the host before the optimizer step;
# - train_step returns the LM loss as a float every step (the loop keeps a list of losses).
KNOWN_STEP_SYNCS = {("megatron/optimizer/base.py", "clip_grad_norm"), ("megatron/training.py", "train_step")}


def _state(*extra):
    cfg = train_config_from_args(parse_args(ARGV + list(extra)), 128)
    return setup_train_state(cfg, parallel_state.initialize(1, (1,)), torch.device("cpu"))


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"text": torch.randint(0, 128, (2, 33), generator=g)}


def _where(site: str):
    path, _, rest = site.partition(":")
    return path, rest.split(" in ")[-1]


def test_bf16_step_every_gemm_in_bf16_and_syncs_only_at_known_sites():
    # attention dropout 0: CPU's SDPA then takes its bf16 flash kernel; with dropout it falls back to the math
    # kernel, which upcasts to fp32 inside (a CPU-only detail: CUDA's kernels take bf16 with dropout; the next test
    # checks what the attention receives)
    st = _state("--bf16", "--attention-dropout", "0")
    it = _batches()
    train_step(st, it)  # the first step creates the optimizer state
    with cuda_autocast_rules(torch.bfloat16), DispatchAudit() as audit:
        train_step(st, it)
    dtypes = collections.Counter(g.dtypes[0] for g in audit.gemms)
    assert set(dtypes) == {torch.bfloat16}, audit.gemm_dtypes()
    assert dtypes[torch.bfloat16] >= 2 * 3 * 4  # 2 layers x (qkv, proj, fc1, fc2) x fwd + 2 bwd, at least
    sites = {_where(s.site) for s in audit.syncs}
    assert sites <= KNOWN_STEP_SYNCS, audit.report()
    assert len(audit.syncs) <= len(KNOWN_STEP_SYNCS), audit.report()


def test_attention_receives_the_compute_dtype_with_dropout(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    st = _state("--bf16", "--attention-dropout", "0.1")
    with cuda_autocast_rules(torch.bfloat16):
        train_step(st, _batches())
    assert seen and set(seen) == {(torch.bfloat16,) * 3}


def test_model_forward_backward_loss_and_optimizer_step_have_no_host_sync():
    st = _state("--bf16")
    tokens = next(_batches())["text"]
    st.model(tokens[:, :-1], tokens[:, 1:], parallel_output=True).loss.sum().backward()
    st.optimizer.step_with_ready_grads()  # creates the state: the audited step is a steady-state one
    with cuda_autocast_rules(torch.bfloat16), DispatchAudit() as audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = st.model(tokens[:, :-1], tokens[:, 1:], parallel_output=True)
        out.loss.mean().backward()
        st.optimizer.step_with_ready_grads()  # the update alone (the full step's clip is audited above)
    assert audit.syncs == [], audit.report()


@pytest.mark.parametrize("recompute", [False, True])
def test_meta_device_forward_and_backward(recompute):
    extra = ["--checkpoint-activations"] if recompute else []
    cfg = train_config_from_args(parse_args(ARGV + extra), 128)
    with torch.device("meta"):
        model = GPTModel(cfg.model, None, parallel_state.initialize(1, (1,)))
    tokens = torch.zeros(2, 32, dtype=torch.long, device="meta")
    with DispatchAudit() as audit:
        out = model(tokens, tokens, parallel_output=True)
        out.loss.sum().backward()
    assert out.loss.device.type == "meta" and out.loss.shape == (2, 32)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    assert audit.syncs == [], audit.report()
