"""NVMe expert offload of Hugging Face MoE models (issue 26, deliverable 4): tools/offload_experts.py --hf-dir writes
the expert store straight from the safetensors; it equals the store written from the imported checkpoint; the
imported model offloaded at 25% resident computes bit for bit what the all-resident model computes (logits,
KV-cached greedy tokens), with fp32 and bf16 records; tools/generate.py and the harness model run it; one-line errors.

Models are random-initialised tiny configs made with transformers' own config classes (tests/unit/test_hf_families.py).
Bitwise equality holds because offloaded and resident experts run the same per-expert function on the same values
(a bf16 record cast to fp32 is exactly the fp32 the importer made of the same bf16 weight), so no tolerance is used.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

from megatron import checkpointing  # noqa: E402
from megatron.checkpointing import load_dense_whole, model_configs_from_checkpoint  # noqa: E402
from megatron.inference import generate  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.offload import build_offloaded_model  # noqa: E402
from moe.offload import ExpertStore, OffloadConfig  # noqa: E402
from moe.ops.op_builder import AsyncIOBuilder  # noqa: E402
from tests.inprocess import run_cli  # noqa: E402
from tests.unit.test_hf_families import V, _configs, _hf_dir, _ids, cli  # noqa: E402

try:
    AsyncIOBuilder().load()
    AIO_ERROR = None
except RuntimeError as e:  # no libaio: offload cannot read
    AIO_ERROR = str(e).splitlines()[0]
pytestmark = pytest.mark.skipif(AIO_ERROR is not None, reason=f"aio op not built: {AIO_ERROR}")

# every MoE family in the fast suite; the second variants of Qwen3-MoE and DeepSeek-V3 with `make test-all`
MOE_FAMILIES = ["qwen3_moe", pytest.param("qwen3_moe-no-renorm-step2", marks=pytest.mark.slow), "mixtral",
                "qwen2_moe", "olmoe", "deepseek_v3", pytest.param("deepseek_v3-q-full", marks=pytest.mark.slow)]
TOOL = os.path.join("tools", "offload_experts.py")


def _offload_tool():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("offload_experts_tool", os.path.join(ROOT, TOOL))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(store_dir):
    return json.load(open(os.path.join(store_dir, "manifest.json")))["records"]


def _resident_and_offloaded(ckpt, store_dir, budget="25%"):
    payload, d = load_dense_whole(ckpt)
    mcfg, mc = model_configs_from_checkpoint(payload["configs"], d)
    ref = GPTModel(mcfg, mc)
    checkpointing.load_model_state(ref, payload, d)
    off, rt = build_offloaded_model(mcfg, mc, payload, d, 0, payload["configs"],
                                    OffloadConfig(mode="nvme", directory=str(store_dir), cache_bytes=budget),
                                    torch.device("cpu"))
    return ref.eval(), off, rt


def _assert_offloaded_equals_resident(ckpt, store_dir):
    """25% of the expert bytes resident, or the minimum (top-k experts) where 25% is fewer records than that."""
    store = ExpertStore.open(str(store_dir))
    topk = load_dense_whole(ckpt)[0]["configs"]["moe"]["topk"]
    budget = str(max(store.total_bytes() // 4, topk * store.record_bytes))
    ref, off, rt = _resident_and_offloaded(ckpt, store_dir, budget)
    try:
        with torch.no_grad():
            ids = _ids()
            assert torch.equal(ref(ids).logits, off(ids).logits)  # bitwise (module docstring)
            prompt = _ids(1)[0, :6].tolist()
            assert generate(ref, prompt, 12, temperature=0.0) == generate(off, prompt, 12, temperature=0.0)
        s = rt.summary()
        assert s["slots"] * s["record_bytes"] <= int(budget) < s["expert_bytes_total"]
        assert s["evictions"] > 0  # the cache did work: 25% cannot hold every expert
    finally:
        rt.close()


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_store_from_safetensors_equals_store_from_checkpoint_and_offload_is_bitwise(tmp_path, capsys, name):
    _, d = _hf_dir(tmp_path, name, shard="20KB" if name == "qwen3_moe" else None)
    ck = str(tmp_path / "ck")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0, capsys.readouterr().err
    tool = _offload_tool()
    assert tool.main(["--hf-dir", d, "--out", str(tmp_path / "from_hf")]) == 0, capsys.readouterr().err
    assert tool.main(["--load", ck, "--out", str(tmp_path / "from_ck")]) == 0, capsys.readouterr().err
    # byte for byte (fp32 weights: the importer's checkpoint holds the same fp32 values, in the same record order)
    assert _records(tmp_path / "from_hf") == _records(tmp_path / "from_ck")
    assert (tmp_path / "from_hf" / "experts.bin").read_bytes() == (tmp_path / "from_ck" / "experts.bin").read_bytes()
    n_moe = sum(1 for r in _records(tmp_path / "from_hf") if r["expert"] == 0)
    cfg = _configs()[name]
    assert n_moe == sum(1 for i in range(cfg.num_hidden_layers) if name.startswith("deepseek") and
                        i >= cfg.first_k_dense_replace or not name.startswith("deepseek") and
                        _is_moe_layer(cfg, i))  # dense layers (DeepSeek-V3's first, Qwen's mlp_only) skipped
    _assert_offloaded_equals_resident(ck, tmp_path / "from_hf")


def _is_moe_layer(cfg, i):
    if hasattr(cfg, "decoder_sparse_step"):
        return i not in (cfg.mlp_only_layers or []) and (i + 1) % cfg.decoder_sparse_step == 0
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_half_precision_records_stay_half_and_offload_is_bitwise(tmp_path, capsys, dtype):
    """A bf16/fp16 Hugging Face model: the store from safetensors keeps the dtype (half the bytes of the fp32 store
    the imported checkpoint gives), its records equal that store's value for value, and the imported (fp32) model
    offloaded from the half store equals the resident one bit for bit (the fp32 -> half -> fp32 round trip of
    weights that were half to begin with is exact)."""
    hf, _ = _hf_dir(tmp_path / "src", "qwen3_moe")
    d = str(tmp_path / "hf")
    hf.to(dtype).save_pretrained(d)
    ck = str(tmp_path / "ck")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0, capsys.readouterr().err
    tool = _offload_tool()
    assert tool.main(["--hf-dir", d, "--out", str(tmp_path / "from_hf")]) == 0, capsys.readouterr().err
    assert tool.main(["--load", ck, "--out", str(tmp_path / "from_ck")]) == 0, capsys.readouterr().err
    half, full = ExpertStore.open(str(tmp_path / "from_hf")), ExpertStore.open(str(tmp_path / "from_ck"))
    name = str(dtype).removeprefix("torch.")
    assert {t["dtype"] for r in _records(tmp_path / "from_hf") for t in r["tensors"]} == {name}
    assert {t["dtype"] for r in _records(tmp_path / "from_ck") for t in r["tensors"]} == {"float32"}
    assert half.keys() == full.keys() and half.total_bytes() < 0.6 * full.total_bytes()
    from megatron.offload import _read_record

    for key in half.keys():
        a, b = _read_record(half, key), _read_record(full, key)
        for t in a:
            assert a[t].dtype == dtype and torch.equal(a[t].float(), b[t]), (key, t)
    _assert_offloaded_equals_resident(ck, tmp_path / "from_hf")


def _tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>"] + [f"w{i}" for i in range(1, V)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)


def test_generate_cli_and_harness_model_offload_an_import(tmp_path, capsys):
    """tools/generate.py --moe-offload nvme --moe-offload-dir STORE (written from --hf-dir) prints the resident
    model's greedy text; the harness model with moe_offload=nvme,moe_offload_dir=STORE gives the resident
    log-likelihoods exactly (same per-expert GEMMs: equal floats)."""
    from lm_eval.api.instance import Instance

    from megatron.eval import harness

    _, d = _hf_dir(tmp_path, "deepseek_v3")
    _tokenizer(d)
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0, capsys.readouterr().err
    assert _offload_tool().main(["--hf-dir", d, "--out", store]) == 0, capsys.readouterr().err
    gen = os.path.join("tools", "generate.py")
    common = ["--load", ck, "--prompt", "w3 w5 w7 w11", "--max-new-tokens", "16", "--temperature", "0",
              "--no-progress"]
    want = run_cli(gen, common)
    assert want.returncode == 0, want.stderr
    got = run_cli(gen, common + ["--moe-offload", "nvme", "--moe-offload-dir", store, "--moe-expert-cache-bytes",
                                 "25%"])
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and "offload: hit rate" in got.stderr
    assert json.load(open(os.path.join(store, "manifest.json")))["source"]["hf_dir"] == os.path.abspath(d)
    reqs = [Instance(request_type="loglikelihood", doc={}, idx=0, arguments=(c, x))
            for c, x in (("w1 w2", " w3 w4"), ("w9 w8 w7", " w6"), ("", "w5 w5"))]
    resident = harness.MegatronMoELM.create_from_arg_string(f"load={ck},device=cpu,batch_size=2")
    offloaded = harness.MegatronMoELM.create_from_arg_string(
        f"load={ck},device=cpu,batch_size=2,moe_offload=nvme,moe_offload_dir={store},moe_expert_cache_bytes=25%")
    try:
        assert offloaded.model.offload is not None
        assert resident.loglikelihood(reqs, True) == offloaded.loglikelihood(reqs, True)
    finally:
        offloaded.model.offload.close()
    from megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="moe_offload=nvme needs moe_offload_dir=DIR"):
        harness.MegatronMoELM.create_from_arg_string(f"load={ck},device=cpu,moe_offload=nvme")
    with pytest.raises(ConfigError, match="names the store itself"):
        harness.MegatronMoELM.create_from_arg_string(f"load={ck},device=cpu,moe_offload={store},moe_offload_dir=x")


def _one_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_one_line_errors(tmp_path, capsys):
    tool = _offload_tool()
    # a missing shard
    _, d = _hf_dir(tmp_path / "a", "qwen3_moe", shard="20KB")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    os.remove(os.path.join(d, sorted(set(index["weight_map"].values()))[-1]))
    capsys.readouterr()
    err = _one_line(capsys, tool.main(["--hf-dir", d, "--out", str(tmp_path / "s1")]))
    assert "shard model-" in err and "is missing" in err
    assert not os.path.exists(tmp_path / "s1")
    # an unknown architecture, and a dense one
    _, d = _hf_dir(tmp_path / "b", "mixtral")
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "architectures": ["GrokForCausalLM"]}, open(os.path.join(d, "config.json"), "w"))
    capsys.readouterr()
    err = _one_line(capsys, tool.main(["--hf-dir", d, "--out", str(tmp_path / "s2")]))
    assert "architecture 'GrokForCausalLM' is not supported" in err
    _, d = _hf_dir(tmp_path / "c", "llama")
    capsys.readouterr()
    assert "dense model" in _one_line(capsys, tool.main(["--hf-dir", d, "--out", str(tmp_path / "s3")]))
    # a dtype the store cannot hold: the tensor and dtype are named, nothing is left behind
    from safetensors.torch import load_file, save_file

    _, d = _hf_dir(tmp_path / "e", "olmoe")
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    bad = "model.layers.1.mlp.experts.2.up_proj.weight"
    sd[bad] = sd[bad].to(torch.float8_e4m3fn)
    save_file(sd, path, metadata={"format": "pt"})
    capsys.readouterr()
    err = _one_line(capsys, tool.main(["--hf-dir", d, "--out", str(tmp_path / "s4")]))
    assert f"tensor {bad} is float8_e4m3fn" in err and "cannot hold" in err
    assert not os.path.exists(tmp_path / "s4" / "manifest.json") and not os.listdir(tmp_path / "s4")
    # the store itself refuses a record dtype it cannot hold (a checkpoint's int8 expert), naming it
    from moe.offload import OffloadError, write_store

    with pytest.raises(OffloadError, match=r"MoE layer 0 expert 1 tensor w1_FD is int8, which the store cannot"):
        write_store(str(tmp_path / "s5"), [(0, 0, {"w1_FD": torch.zeros(4)}),
                                           (0, 1, {"w1_FD": torch.zeros(4, dtype=torch.int8)})], {})
    assert not os.listdir(tmp_path / "s5")


def test_store_from_other_weights_is_stale_for_the_import(tmp_path, capsys):
    """A store written from a Hugging Face directory serves only a checkpoint holding its experts: a checkpoint
    imported from other weights (or trained since) is refused with one line."""
    _, d = _hf_dir(tmp_path / "a", "mixtral")
    ck = str(tmp_path / "ck")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0
    other, d2 = _hf_dir(tmp_path / "b", "mixtral")
    from safetensors.torch import load_file, save_file

    path = os.path.join(d2, "model.safetensors")
    sd = load_file(path)
    sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"] += 1.0  # the last expert of MoE layer 1
    save_file(sd, path, metadata={"format": "pt"})
    assert _offload_tool().main(["--hf-dir", d2, "--out", str(tmp_path / "store")]) == 0
    from megatron.offload import OffloadError

    with pytest.raises(OffloadError, match=r"stale expert store.*MoE layer 1 expert 3 experts.w2_eDF differs"):
        _resident_and_offloaded(ck, tmp_path / "store")


@pytest.mark.parametrize("form", ["fused", "mixed-dtype"])
def test_general_path_fused_experts_and_mixed_dtypes(tmp_path, capsys, form):
    """Safetensors the direct per-expert reads do not cover go through megatron.hf's import_experts: transformers 5's
    fused form (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]), and experts whose gate/up/down differ
    in dtype (each tensor keeps its own; gate and up are concatenated as torch.cat promotes). The store equals the
    one written from the import byte for byte (fused), or value for value (mixed: the import holds fp32 only)."""
    from safetensors.torch import load_file, save_file

    hf, d = _hf_dir(tmp_path, "qwen2_moe")
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    n = hf.config.num_experts
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        if form == "fused":
            sd[p + "gate_up_proj"] = torch.stack([torch.cat((sd.pop(f"{p}{e}.gate_proj.weight"),
                                                             sd.pop(f"{p}{e}.up_proj.weight"))) for e in range(n)])
            sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(n)])
        else:
            sd[f"{p}1.down_proj.weight"] = sd[f"{p}1.down_proj.weight"].to(torch.bfloat16)
    save_file(sd, path, metadata={"format": "pt"})
    ck = str(tmp_path / "ck")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0, capsys.readouterr().err
    tool = _offload_tool()
    assert tool.main(["--hf-dir", d, "--out", str(tmp_path / "from_hf")]) == 0, capsys.readouterr().err
    assert tool.main(["--load", ck, "--out", str(tmp_path / "from_ck")]) == 0, capsys.readouterr().err
    if form == "fused":
        assert _records(tmp_path / "from_hf") == _records(tmp_path / "from_ck")
        assert (tmp_path / "from_hf" / "experts.bin").read_bytes() == \
            (tmp_path / "from_ck" / "experts.bin").read_bytes()
    else:
        from megatron.offload import _read_record

        a, b = ExpertStore.open(str(tmp_path / "from_hf")), ExpertStore.open(str(tmp_path / "from_ck"))
        assert a.keys() == b.keys()
        for key in a.keys():
            ra, rb = _read_record(a, key), _read_record(b, key)
            assert ra["w2_DF"].dtype == (torch.bfloat16 if key[1] == 1 else torch.float32)
            assert all(torch.equal(ra[t].double(), rb[t].double()) for t in ra), key
    _assert_offloaded_equals_resident(ck, tmp_path / "from_hf")


def test_layer_major_scoring_of_an_untied_import(tmp_path, capsys):
    """Imported models have an untied LM head (Qwen3-MoE here): the scorer applies it to the selected rows, so
    layer-major blocks run (each expert read once per block: bytes read <= the store once per block) and the
    answers equal the resident model's one-micro-batch-at-a-time answers exactly."""
    from megatron.eval.scorer import LoglikelihoodScorer, Request

    _, d = _hf_dir(tmp_path, "qwen3_moe")
    ck = str(tmp_path / "ck")
    assert cli.main(["import", "--hf-dir", d, "--save", ck]) == 0, capsys.readouterr().err
    assert _offload_tool().main(["--hf-dir", d, "--out", str(tmp_path / "store")]) == 0
    gen = torch.Generator().manual_seed(3)
    reqs = [Request(tuple(torch.randint(1, V, (int(n),), generator=gen).tolist()), (int(c),))
            for n, c in zip(torch.randint(5, 15, (12,), generator=gen), torch.randint(1, V, (12,), generator=gen))]
    store = ExpertStore.open(str(tmp_path / "store"))
    ref, off, rt = _resident_and_offloaded(ck, tmp_path / "store", str(2 * store.record_bytes))  # k = 2 slots
    try:
        want = LoglikelihoodScorer(ref, 64, 4, 16).score(reqs)
        scorer = LoglikelihoodScorer(off, 64, 4, 16, layer_major_block=3)
        assert len(scorer.micro_batches([list(r.context) for r in reqs])) == 3  # one padded length: one block
        assert scorer.tied_head  # the head-on-rows path, which layer-major needs, is taken for the untied head
        before = rt.summary()["bytes_read"]  # (the scorer's head check ran two forwards)
        assert scorer.score(reqs) == want
        # 3 micro-batches, one block: each expert read at most once (k = 2 slots: nothing stays resident between)
        assert rt.summary()["bytes_read"] - before <= store.total_bytes()
    finally:
        rt.close()
