"""NVMe expert offload (moe/offload, megatron/offload.py): offloaded == resident bitwise (logits, layer-major
scoring, KV-cached decode), the cache against a brute-force LRU model, prefetch recall/precision recomputed
from recorded router choices, and the store's one-line errors."""
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess

import pytest
import torch

from megatron import checkpointing
from megatron.checkpointing import load_dense_whole, model_configs_from_checkpoint
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.offload import build_offloaded_model
from moe.config import MoEConfig
from moe.offload import ExpertCache, ExpertStore, OffloadConfig, OffloadError, write_store
from moe.ops.op_builder import AsyncIOBuilder
from tests.conftest import ROOT
from tests.inprocess import run_cli

try:
    AsyncIOBuilder().load()
    AIO_ERROR = None
except RuntimeError as e:  # no libaio: offload cannot read
    AIO_ERROR = str(e).splitlines()[0]
pytestmark = pytest.mark.skipif(AIO_ERROR is not None, reason=f"aio op not built: {AIO_ERROR}")


def save_moe_checkpoint(root, topk=2, drop_tokens=True, num_experts=8, tokenizer_model=None, layers=4, seq=64):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=seq,
                      max_position_embeddings=seq, padded_vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0)
    # deterministic eval routing (DeepSpeed's defaults draw RTS uniforms / Gumbel noise in eval too, which would make
    # the two runs' routing differ by their RNG use, not by offload)
    moe = MoEConfig(num_experts=num_experts, expert_interval=2, topk=topk, drop_tokens=drop_tokens,
                    eval_capacity_factor=1.0, min_capacity=1, use_rts=False, second_expert_sampling=False)
    model = GPTModel(cfg, moe)
    configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe),
               "tokenizer": {"tokenizer_type": "SentencePieceTokenizer", "vocab_file": None, "merge_file": None,
                             "tokenizer_model": tokenizer_model, "make_vocab_size_divisible_by": 64}}
    checkpointing.save_checkpoint(str(root), 1, model, None, None, None, {}, configs)
    return str(root)


def resident_and_offloaded(ckpt, store_dir, budget, prefetch="gate"):
    payload, d = load_dense_whole(ckpt)
    mcfg, mc = model_configs_from_checkpoint(payload["configs"], d)
    ref = GPTModel(mcfg, mc)
    checkpointing.load_model_state(ref, payload, d)
    ref.eval()
    off, rt = build_offloaded_model(mcfg, mc, payload, d, 1, payload["configs"],
                                    OffloadConfig(mode="nvme", directory=str(store_dir), cache_bytes=budget,
                                                  prefetch=prefetch), torch.device("cpu"))
    return ref, off, rt


def min_budget(store_dir, topk):
    return str(ExpertStore.open(str(store_dir)).record_bytes * topk)


@pytest.mark.parametrize("topk,drop", [(1, True), (2, True), (1, False), (2, False)])
def test_offloaded_logits_equal_resident_bitwise_at_every_budget(tmp_path, topk, drop):
    ckpt = save_moe_checkpoint(tmp_path / "ckpt", topk=topk, drop_tokens=drop)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (3, 40), generator=gen)
    budgets = ["100%", "50%", "25%", None]
    for budget in budgets:
        store = tmp_path / "store"  # written on first use, reused (checked) after
        if budget is None:
            budget = min_budget(store, topk)
        ref, off, rt = resident_and_offloaded(ckpt, store, budget)
        try:
            with torch.no_grad():
                assert torch.equal(ref(tokens).logits, off(tokens).logits), budget
                # layer-major: several micro-batches layer by layer, each expert read once per block
                parts = [tokens[:1], tokens[1:], tokens[2:, :17]]
                hs = off.forward_layer_major(parts)
                for h, t in zip(hs, parts):
                    want = ref.final_layernorm.register_forward_hook(lambda m, i, o: captured.append(o))
                    captured = []
                    ref(t)
                    want.remove()
                    assert torch.equal(h, captured[0]), budget
                # KV-cached decode, one token at a time
                c1, c2 = ref.new_kv_cache(), off.new_kv_cache()
                assert torch.equal(ref(tokens[:1, :5], kv_cache=c1).logits, off(tokens[:1, :5], kv_cache=c2).logits)
                for t in range(5, 12):
                    x = tokens[:1, t:t + 1]
                    assert torch.equal(ref(x, kv_cache=c1).logits, off(x, kv_cache=c2).logits), (budget, t)
            s = rt.summary()
            assert s["accesses"] > 0 and s["peak_resident_bytes"] <= s["slots"] * s["record_bytes"]
            if budget == "100%":
                assert s["evictions"] == 0
        finally:
            rt.close()


class BruteLRU:
    """The cache's contract written out: capacity slots, least recently requested unpinned entry evicted."""

    def __init__(self, capacity):
        self.capacity, self.order, self.pins, self.trace = capacity, [], {}, []

    def request(self, key):
        if key in self.order:
            self.order.remove(key)
            self.order.append(key)
            self.trace.append(("hit", key))
        else:
            self.trace.append(("miss", key))
            if len(self.order) == self.capacity:
                victim = next(k for k in self.order if not self.pins.get(k))
                self.order.remove(victim)
                self.trace.append(("evict", victim))
            self.order.append(key)
        self.pins[key] = self.pins.get(key, 0) + 1

    def release(self, key):
        self.pins[key] -= 1


def _store_of_random_records(directory, layers=3, experts=6):
    gen = torch.Generator().manual_seed(0)
    recs = [(m, e, {"w1_FD": torch.randn(16, 8, generator=gen), "b1_F": torch.randn(16, generator=gen),
                    "w2_DF": torch.randn(8, 16, generator=gen), "b2_D": torch.randn(8, generator=gen)})
            for m in range(layers) for e in range(experts)]
    return write_store(str(directory), recs, {"test": 1}), {(m, e): t for m, e, t in recs}


def test_cache_matches_brute_force_lru_and_never_evicts_pinned(tmp_path):
    store, tensors = _store_of_random_records(tmp_path / "s")
    rng = random.Random(0)
    for capacity in (1, 2, 5, 18):
        cache = ExpertCache(store, capacity * store.record_bytes, record_trace=True, prefetch_slots=0)
        model = BruteLRU(capacity)
        pinned = []
        try:
            for _ in range(300):
                if pinned and (len(pinned) == capacity or rng.random() < 0.5):
                    key, entry = pinned.pop(rng.randrange(len(pinned)))
                    cache.release(entry)
                    model.release(key)
                    continue
                key = (rng.randrange(3), rng.randrange(6))
                entry = cache.request(key)
                model.request(key)
                got = cache.wait(entry)
                for name, t in tensors[key].items():  # the bytes are the record's
                    assert torch.equal(got[name], t)
                pinned.append((key, entry))
                for k, _ in pinned:  # pinned entries are resident
                    assert cache.contains(k)
            assert cache.stats.trace == model.trace
            assert cache.stats.evictions == sum(1 for w, _ in model.trace if w == "evict")
        finally:
            cache.close()


def test_prefetch_never_takes_a_pinned_slot_or_deadlocks_at_the_minimum(tmp_path):
    store, _ = _store_of_random_records(tmp_path / "s")
    cache = ExpertCache(store, 2 * store.record_bytes, min_slots=2, prefetch_slots=1)
    try:
        a, b = cache.request((0, 0)), cache.request((0, 1))
        assert cache.prefetch([(1, 0), (1, 1)]) == 0  # every slot pinned: the prefetch gives way
        cache.wait(a), cache.wait(b)
        cache.release(a)
        assert cache.prefetch([(1, 0), (1, 1)]) == 1  # one reserved slot at most, never (0, 1)'s
        assert cache.contains((0, 1)) and cache.contains((1, 0)) and not cache.contains((1, 1))
        cache.release(b)
        # a demand read may take the prefetched slot (waiting for its read): no deadlock
        for key in [(2, 0), (2, 1), (1, 0), (0, 0)]:
            e = cache.request(key)
            cache.wait(e)
            cache.release(e)
    finally:
        cache.close()
    with pytest.raises(OffloadError, match=r"--moe-expert-cache-bytes .* at least 2 resident at once: use at least "
                                           rf"{2 * store.record_bytes} bytes"):
        ExpertCache(store, store.record_bytes, min_slots=2)


def test_prefetch_recall_and_precision_recomputed_from_router_choices(tmp_path):
    ckpt = save_moe_checkpoint(tmp_path / "ckpt", topk=1, layers=6)
    ref, off, rt = resident_and_offloaded(ckpt, tmp_path / "store", "50%")
    moe_blocks = [i for i, layer in enumerate(off.layers) if hasattr(layer.mlp, "router")]
    chosen, guessed = [], []  # per MoE-layer call: true expert set; per guess: the experts a guess names

    def router_hook(idx):
        def hook(mod, args, out):
            chosen.append((idx, set(out.expert_TK.reshape(-1).tolist())))
        return hook

    def guess(i, h):  # MoE block i's LayerNorm and router (top-1) on a residual stream h
        logits = torch.nn.functional.linear(off.layers[i].post_attention_layernorm(h).reshape(-1, 32).float(),
                                            off.layers[i].mlp.router.weight)
        return set(logits.argmax(-1).tolist())

    handles = [off.layers[i].mlp.router.register_forward_hook(router_hook(i)) for i in moe_blocks]
    for i in moe_blocks:
        blk = off.layers[i - 1]
        # early guess: the residual stream after the previous block's attention (its input + attention output)
        handles.append(blk.register_forward_pre_hook(lambda mod, args: setattr(mod, "_last_input", args[0])))
        handles.append(blk.self_attention.register_forward_hook(
            lambda mod, args, out, blk=blk, i=i: guessed.append((i, guess(i, blk._last_input + out)))))
        # refined guess: the MoE block's own input; the two are scored together
        handles.append(off.layers[i].register_forward_pre_hook(
            lambda mod, args, i=i: guessed[-1][1].update(guess(i, args[0]))))
    try:
        gen = torch.Generator().manual_seed(3)
        cache = off.new_kv_cache()
        with torch.no_grad():
            off(torch.randint(0, 128, (1, 6), generator=gen), kv_cache=cache)
            for _ in range(20):
                off(torch.randint(0, 128, (1, 1), generator=gen), kv_cache=cache)
        s = rt.summary()
    finally:
        for h in handles:
            h.remove()
        rt.close()
    assert len(guessed) == len(chosen) and [g[0] for g in guessed] == [c[0] for c in chosen]
    tp = sum(len(g & c) for (_, g), (_, c) in zip(guessed, chosen))
    assert s["prefetch_recall"] == pytest.approx(tp / sum(len(c) for _, c in chosen), abs=0)
    assert s["prefetch_precision"] == pytest.approx(tp / sum(len(g) for _, g in guessed), abs=0)
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0


def _cli(*argv):
    """`python SCRIPT ARGS...` as its main(argv) in this process: (exit code, stdout, stderr)."""
    r = run_cli(argv[0], argv[1:])
    return r.returncode, r.stdout, r.stderr


def _one_error_line(rc, stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("expert")]
    assert rc == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_moe_ckpt(tiny_corpus, tmp_path_factory):
    return save_moe_checkpoint(tmp_path_factory.mktemp("offload") / "ckpt", topk=2, seq=256,
                               tokenizer_model=tiny_corpus["tokenizer_model"])


def test_generate_cli_offloaded_tokens_equal_resident(tiny_moe_ckpt, tmp_path):
    gen = os.path.join("tools", "generate.py")
    common = ["--load", tiny_moe_ckpt, "--prompt", "The cat sees the door.", "--max-new-tokens", "24",
              "--no-progress"]
    for sampling in (["--temperature", "0"], ["--temperature", "0.9", "--top-k", "20", "--seed", "5"]):
        rc, want, err = _cli(gen, *common, *sampling)
        assert rc == 0, err
        rc, got, err = _cli(gen, *common, *sampling, "--moe-offload", "nvme", "--moe-expert-store",
                            str(tmp_path / "store"), "--moe-expert-cache-bytes", "25%",
                            "--stats-json", str(tmp_path / "stats.json"))
        assert rc == 0, err
        assert got == want
        assert "offload: hit rate" in err
        stats = json.loads((tmp_path / "stats.json").read_text())
        assert stats["tokens"] >= stats["new_tokens"] > 0 and stats["bytes_read"] > 0
        assert stats["prefetch_recall"] is not None


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_offload_experts_tool_and_one_line_errors(tiny_moe_ckpt, tmp_path, capsys):
    """The store tool runs as a user runs it (a process); the error cases call the same main() in-process."""
    tool = os.path.join("tools", "offload_experts.py")
    store = tmp_path / "store"
    rc, out, err = _cli(tool, "--load", tiny_moe_ckpt, "--out", str(store))
    assert rc == 0 and "expert records" in out, err
    line = _one_error_line(*_cli(tool, "--load", tiny_moe_ckpt, "--out", str(store))[::2])
    assert "not empty" in line
    generate = _tool("generate")
    run = ["--load", tiny_moe_ckpt, "--prompt", "The cat", "--max-new-tokens", "4", "--moe-offload", "nvme",
           "--no-progress"]

    def err_of(directory, *extra):
        capsys.readouterr()
        with torch.no_grad():
            rc = generate.main([*run, "--moe-expert-store", str(directory), *extra])
        return _one_error_line(rc, capsys.readouterr().err)

    assert "at least 2 resident at once" in err_of(store, "--moe-expert-cache-bytes", "1000")
    assert "cannot create it" in err_of("/dev/null/store")  # an unwritable place for a new store
    capsys.readouterr()
    assert "needs --moe-expert-store" in _one_error_line(generate.main(run), capsys.readouterr().err)
    assert "--moe-expert-cache-bytes ('lots')" in err_of(store, "--moe-expert-cache-bytes", "lots")
    # corrupted record: one flipped byte in the middle of a record
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    man = json.loads((bad / "manifest.json").read_text())
    with open(bad / "experts.bin", "r+b") as f:
        f.seek(man["records"][3]["offset"] + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "checksum mismatch" in err_of(bad, "--moe-expert-cache-bytes", "100%") and "experts.bin" in \
        err_of(bad, "--moe-expert-cache-bytes", "100%")
    # truncated data file
    with open(bad / "experts.bin", "r+b") as f:
        f.truncate(man["data_bytes"] - 4096)
    assert "truncated expert store" in err_of(bad)
    # missing data file
    os.remove(bad / "experts.bin")
    assert "data file is missing" in err_of(bad)
    # foreign manifest / directory holding other files
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert "not a megatron-moe expert store" in err_of(foreign)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    assert "no expert-store manifest" in err_of(other)
    # stale: a store written from another checkpoint
    stale = tmp_path / "stale"
    shutil.copytree(store, stale)
    man2 = json.loads((stale / "manifest.json").read_text())
    man2["source"]["fingerprint"] = "0"  # as if written from another checkpoint of the same shape
    (stale / "manifest.json").write_text(json.dumps(man2))
    assert "stale expert store" in err_of(stale)
    # a dense checkpoint has nothing to offload
    capsys.readouterr()
    rc = _tool("offload_experts").main(["--load", _dense_ckpt(tmp_path / "dense"), "--out", str(tmp_path / "d")])
    assert "dense checkpoint" in _one_error_line(rc, capsys.readouterr().err)


def test_eval_cli_offloaded_metrics_equal_resident(tiny_moe_ckpt, tmp_path):
    """tools/eval_zeroshot.py in separate processes: offloaded (layer-major and normal order, 25% resident) ==
    all-resident, metric for metric (with token dropping: each micro-batch is still routed on its own)."""
    from megatron.data.data_files import DataFileError, default_data_dir, resolve

    try:
        for name in ("lambada", "piqa-valid", "piqa-valid-labels"):
            resolve(name)
    except DataFileError as e:
        pytest.skip(f"LAMBADA/PIQA not under {default_data_dir()} ({e})")
    ev = os.path.join("tools", "eval_zeroshot.py")
    common = ["--load", tiny_moe_ckpt, "--tasks", "lambada,piqa", "--limit", "12", "--micro-batch-size", "3",
              "--no-progress", "--bootstrap-iters", "10", "--data-dir", str(default_data_dir()),
              "--moe-eval-token-dropping"]  # capacity routing (dropless is the default): the harder case
    results = {}
    for name, extra in (("resident", []),
                        ("layer-major", ["--moe-offload", "nvme", "--moe-expert-store", str(tmp_path / "s"),
                                         "--moe-expert-cache-bytes", "25%", "--stats-json", str(tmp_path / "st")]),
                        ("normal", ["--moe-offload", "nvme", "--moe-expert-store", str(tmp_path / "s"),
                                    "--moe-expert-cache-bytes", "25%", "--no-moe-offload-layer-major"])):
        out = tmp_path / f"{name}.json"
        rc, _, err = _cli(ev, *common, *extra, "--output", str(out))
        assert rc == 0, err
        report = json.loads(out.read_text())
        results[name] = [(r["task"], r["metric"], r["value"], r["stderr"]) for r in report["results"]]
        if name != "resident":
            assert report["offload"]["bytes_read"] > 0
            assert report["offload"]["layer_major_block"] == (1 if name == "normal" else
                                                                report["offload"]["layer_major_block"])
    assert results["layer-major"] == results["resident"] and results["normal"] == results["resident"]
    stats = json.loads((tmp_path / "st").read_text())
    assert stats["layer_major_block"] > 1 and stats["hit_rate_per_layer"]


def _dense_ckpt(root):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=16,
                      max_position_embeddings=16, padded_vocab_size=64)
    configs = {"model": dataclasses.asdict(cfg), "moe": None, "tokenizer": {}}
    checkpointing.save_checkpoint(str(root), 1, GPTModel(cfg), None, None, None, {}, configs)
    return str(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_full_disk_while_writing_the_store_leaves_nothing(tiny_moe_ckpt, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc, _, err = _cli(os.path.join("tools", "offload_experts.py"), "--load", tiny_moe_ckpt, "--out",
                          str(mnt / "store"))
        line = _one_error_line(rc, err)
        assert "disk is full" in line and str(mnt / "store") in line
        assert os.listdir(mnt / "store") == []
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cache slots in GPU memory)")
def test_cuda_offloaded_equals_resident(tmp_path):
    """Cache in GPU memory: reads into pinned staging buffers, async copies on a side stream, then compute."""
    ckpt = save_moe_checkpoint(tmp_path / "ckpt", topk=2, drop_tokens=False)
    payload, d = load_dense_whole(ckpt)
    mcfg, mc = model_configs_from_checkpoint(payload["configs"], d)
    ref = GPTModel(mcfg, mc)
    checkpointing.load_model_state(ref, payload, d)
    ref.cuda().eval()
    tokens = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1)).cuda()
    for budget in ("100%", "25%"):
        off, rt = build_offloaded_model(mcfg, mc, payload, d, 1, payload["configs"],
                                        OffloadConfig(mode="nvme", directory=str(tmp_path / "store"),
                                                      cache_bytes=budget), torch.device("cuda"))
        try:
            with torch.no_grad():
                assert torch.equal(ref(tokens).logits, off(tokens).logits), budget
                c1, c2 = ref.new_kv_cache(), off.new_kv_cache()
                for t in range(0, 12):
                    x = tokens[:1, t:t + 1]
                    assert torch.equal(ref(x, kv_cache=c1).logits, off(x, kv_cache=c2).logits), (budget, t)
            assert rt.summary()["device"].startswith("cuda")
        finally:
            rt.close()


def test_demand_reads_go_before_prefetches(tmp_path):
    """The readers' queue order: every demand read before any prefetch not yet started, in submission order;
    a prefetch raised to demand priority moves up and its old queue entry is skipped."""
    from moe.offload.cache import DEMAND, PREFETCH, CacheStats, _Entry, _Readers

    store, _ = _store_of_random_records(tmp_path / "s")
    readers = _Readers(store, 0, {}, CacheStats(), True, torch.device("cpu"), [], store.record_bytes)  # no threads
    entries = {k: _Entry(k, 0, store.records[k], prefetched=True) for k in [(1, 0), (1, 1), (0, 0), (0, 1)]}
    readers.submit(entries[(1, 0)], PREFETCH)
    readers.submit(entries[(1, 1)], PREFETCH)
    readers.submit(entries[(0, 0)], DEMAND)
    readers.submit(entries[(1, 1)], DEMAND)  # the prefetch of (1, 1) is now demanded
    readers.submit(entries[(0, 1)], DEMAND)
    order = [readers._next().key for _ in range(4)]
    assert order == [(0, 0), (1, 1), (0, 1), (1, 0)]
    # left: only the stale prefetch copy of (1, 1), already claimed, which a reader skips
    assert [(e.key, e.claimed) for _, _, e in readers.heap] == [((1, 1), True)]
    readers.close()
