"""Hugging Face safetensors <-> this model's parameter names for the Llama-style families, one tensor at a time.

Layouts (each checked by tests/unit/test_hf_families.py against transformers' own model):
- q/k/v: transformers keeps three projections, heads in order; this model fuses them: MHA `[3, heads, d]`, GQA
  `[G, heads/G + 2, d]` (each group's queries, then its key and value) -- `fuse_qkv`/`split_qkv`.
- SwiGLU: gate_proj and up_proj become one `[gate; up]` projection (dense MLP, shared expert, each routed expert:
  `experts.w1_eFD[e]`); down_proj is `dense_4h_to_h` / `experts.w2_eDF[e]`. Experts are read in the Hub's
  per-expert form (`experts.{e}.gate_proj.weight`, Mixtral's `w1/w3/w2`) or transformers 5's fused form
  (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]); they are written in the per-expert form.
- RoPE: rotate-half on the first/second half of each head's rotary dims, as transformers' Llama/Qwen/OLMoE/Mixtral.
  DeepSeek-V3 with rope_interleave=true rotates interleaved pairs; its rope rows (q_b_proj's per head, the last
  qk_rope_head_dim rows of kv_a_proj_with_mqa) are permuted [0, 2, 4, .., 1, 3, 5, ..] on import, which turns it
  into the rotate-half form; export writes rope_interleave=false with the rows as they are here.
- Routers: `mlp.gate.weight` (Mixtral `block_sparse_moe.gate.weight`) -> `mlp.router.weight`; DeepSeek-V3's
  `e_score_correction_bias` -> `mlp.router.expert_bias`. The routed experts' bias tensors (kept at zero with
  --disable-bias-linear) are written as zeros on import and must be zero on export.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Tuple

import torch

from megatron.config import ModelConfig
from megatron.errors import CheckpointError, ConfigError
from megatron.hf.configs import FAMILIES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsReader:
    """Name -> tensor over a directory's safetensors shards, each tensor read on demand (safe_open memory-maps the
    shard; nothing but the requested tensor is materialised). The pages a mapping has touched count in the
    process's RSS until it is closed, so a shard is re-opened after every `remap_bytes` read from it."""

    def __init__(self, hf_dir: str, remap_bytes: int = 256 * 2 ** 20, keep_dtypes=None):
        self.remap_bytes = remap_bytes
        # keep_dtypes (the expert store's reader): tensors of these dtypes are returned as stored, any other dtype
        # is refused naming the tensor; None: every tensor is returned as float32 (the importer's model is fp32)
        self.keep_dtypes = tuple(keep_dtypes) if keep_dtypes is not None else None
        self._read = {}
        from safetensors import safe_open

        self._open = safe_open
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            self.where = dict(json.load(open(index))["weight_map"])
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
                self.where = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"--hf-dir {hf_dir}: neither {INDEX} nor {SINGLE} (only safetensors weights are "
                                  f"read; convert .bin weights with transformers first)")
        for shard in sorted(set(self.where.values())):
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                raise CheckpointError(f"--hf-dir {hf_dir}: shard {shard} named by {INDEX} is missing")
        self._files = {}
        self._headers = {}  # shard -> (fd, data start, header): keep_dtypes mode reads with pread

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, to_float32: bool = True) -> torch.Tensor:
        """The tensor `name`, in fp32 (or as stored, `to_float32=False`)."""
        if name not in self.where:
            raise CheckpointError(f"--hf-dir {self.hf_dir}: tensor {name} is missing from the safetensors")
        shard = self.where[name]
        if self.keep_dtypes is not None:
            return self._pread(name, shard)
        if shard not in self._files:
            self._files[shard] = self._open(os.path.join(self.hf_dir, shard), "pt").__enter__()
            self._read[shard] = 0
        t = self._files[shard].get_tensor(name)
        self._read[shard] += t.numel() * t.element_size()
        if self._read[shard] >= self.remap_bytes:
            self._files.pop(shard).__exit__(None, None, None)
        return t.to(torch.float32) if to_float32 else t

    def meta(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        """(dtype, shape) of a tensor from its shard's header (keep_dtypes mode), nothing read; a dtype outside
        keep_dtypes is refused naming the tensor."""
        if name not in self.where:
            raise CheckpointError(f"--hf-dir {self.hf_dir}: tensor {name} is missing from the safetensors")
        _, _, header = self._header(self.where[name])
        return self._dtype(name, header[name]["dtype"]), tuple(header[name]["shape"])

    def read_into(self, name: str, out_u8: torch.Tensor) -> None:
        """The tensor's bytes as stored, read straight into `out_u8` (1-D uint8 CPU, exactly its size): no
        intermediate copy (keep_dtypes mode; the expert store fills its record buffers so)."""
        fd, base, header = self._header(self.where[name])
        start, end = header[name]["data_offsets"]
        if out_u8.numel() != end - start:
            raise CheckpointError(f"--hf-dir {self.hf_dir}: tensor {name} has {end - start} bytes, "
                                  f"{out_u8.numel()} expected")
        view, pos = memoryview(out_u8.numpy()), 0
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], base + start + pos)
            if got <= 0:
                raise CheckpointError(f"--hf-dir {self.hf_dir}: {self.where[name]} ends inside tensor {name} "
                                      f"(truncated shard)")
            pos += got

    def _header(self, shard: str):
        if shard not in self._headers:
            fd = os.open(os.path.join(self.hf_dir, shard), os.O_RDONLY)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            header.pop("__metadata__", None)
            self._headers[shard] = (fd, 8 + n, header)
        return self._headers[shard]

    def _dtype(self, name: str, st_dtype: str) -> torch.dtype:
        dtype = _ST_DTYPES.get(st_dtype)
        if dtype not in self.keep_dtypes:
            kept = ", ".join(str(d).removeprefix("torch.") for d in self.keep_dtypes)
            what = str(dtype).removeprefix("torch.") if dtype is not None else st_dtype
            raise ConfigError(f"--hf-dir {self.hf_dir}: tensor {name} is {what}, which the expert store cannot hold "
                              f"({kept}); convert the weights to bfloat16 first")
        return dtype

    def _pread(self, name: str, shard: str) -> torch.Tensor:
        """The tensor as stored (keep_dtypes mode), read with one positioned read from the shard's header offsets:
        a cold memory map faults the file in read-around-sized pieces (~30 MB/s measured on a virtio disk), one
        read of the whole tensor runs at the disk's speed, and its pages are not the process's RSS."""
        _, _, header = self._header(shard)
        meta = header[name]
        dtype = self._dtype(name, meta["dtype"])
        start, end = meta["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.read_into(name, buf)
        return buf.view(dtype).reshape(meta["shape"])

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()
        for fd, _, _ in self._headers.values():
            os.close(fd)
        self._headers.clear()


class StoredDtype:
    """A SafetensorsReader whose tensors keep their stored dtype (bf16 stays bf16): for import_tensors feeding
    parameters, whose copy_ converts (exactly: every layout step is a cat, reshape or row permutation), so the
    largest tensor is not held a second time in fp32."""

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name, to_float32=False)


# ------------------------------------------------------------------------------------------------ layouts
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """transformers' q/k/v weights [n*d, h] (or biases [n*d]) -> this model's fused query_key_value."""
    vec = q.dim() == 1
    q, k, v = (t.unsqueeze(-1) if vec else t for t in (q, k, v))
    h, d, n = q.shape[-1], cfg.head_dim, cfg.num_attention_heads
    if cfg.num_query_groups is None:
        out = torch.cat((q, k, v))
    else:
        g = cfg.num_query_groups
        out = torch.cat((q.reshape(g, n // g, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)), 1).reshape(-1, h)
    return out.squeeze(-1) if vec else out


def split_qkv(w: torch.Tensor, cfg: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vec = w.dim() == 1
    w = w.unsqueeze(-1) if vec else w
    h, d = w.shape[-1], cfg.head_dim
    if cfg.num_query_groups is None:
        out = w.chunk(3)
    else:
        t = w.reshape(cfg.num_query_groups, -1, d, h)
        out = (t[:, :-2].reshape(-1, h), t[:, -2].reshape(-1, h), t[:, -1].reshape(-1, h))
    return tuple((o.squeeze(-1) if vec else o).contiguous() for o in out)


def _rope_perm(cfg: ModelConfig, rows: int, per_head: int) -> torch.Tensor:
    """Row order turning interleaved RoPE pairs into rotate-half halves: in each block of `per_head` rows the last
    rotary_dim rows become [0, 2, 4, .., 1, 3, 5, ..] (transformers' apply_rotary_pos_emb_interleave)."""
    r = cfg.qk_pos_emb_head_dim
    base = torch.arange(rows).view(-1, per_head)
    rope = base[:, per_head - r:]
    base[:, per_head - r:] = torch.cat((rope[:, 0::2], rope[:, 1::2]), 1)
    return base.reshape(-1)


_MLA = (("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"), ("linear_q_up_proj", "q_b_proj"),
        ("linear_q_proj", "q_proj"), ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
        ("kv_layernorm", "kv_a_layernorm"), ("linear_kv_up_proj", "kv_b_proj"), ("dense", "o_proj"))


def _expert_names(fam: str, p: str, e: int) -> Tuple[str, str, str]:
    """(gate, up, down) names of routed expert e under layer prefix p."""
    if fam == "mixtral":
        b = f"{p}block_sparse_moe.experts.{e}."
        return b + "w1.weight", b + "w3.weight", b + "w2.weight"
    b = f"{p}mlp.experts.{e}."
    return b + "gate_proj.weight", b + "up_proj.weight", b + "down_proj.weight"


def _router_name(fam: str, p: str) -> str:
    return f"{p}block_sparse_moe.gate.weight" if fam == "mixtral" else f"{p}mlp.gate.weight"


def _shared_prefix(fam: str, p: str) -> str:
    return f"{p}mlp.shared_experts." if fam == "deepseek_v3" else f"{p}mlp.shared_expert."


# ------------------------------------------------------------------------------------------------ import
def import_tensors(r: SafetensorsReader, cfg: ModelConfig, moe, arch: str, hf_cfg,
                   experts: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
    """(this model's name, tensor) for every parameter and persistent buffer, read one tensor (one expert) at a
    time from `r`; a name `stacked#e` is expert e's row of the stacked expert tensor `stacked`. experts=False
    leaves out the routed experts (import_experts gives them one expert at a time)."""
    fam = FAMILIES[arch]
    plan = moe.is_moe_pattern(cfg.num_layers) if moe is not None else (False,) * cfg.num_layers
    yield "word_embeddings.weight", _pad_rows(r.get("model.embed_tokens.weight"), cfg.padded_vocab_size)
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        yield o + "input_layernorm.weight", r.get(p + "input_layernorm.weight")
        yield o + "post_attention_layernorm.weight", r.get(p + "post_attention_layernorm.weight")
        yield from _import_attention(r, cfg, fam, hf_cfg, p + "self_attn.", o + "self_attention.")
        if plan[i]:
            yield from _import_moe(r, cfg, moe, fam, p, o + "mlp.", experts)
        else:
            yield o + "mlp.dense_h_to_4h.weight", torch.cat((r.get(p + "mlp.gate_proj.weight"),
                                                             r.get(p + "mlp.up_proj.weight")))
            yield o + "mlp.dense_4h_to_h.weight", r.get(p + "mlp.down_proj.weight")
    yield "final_layernorm.weight", r.get("model.norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        yield "output_layer.weight", _pad_rows(r.get("lm_head.weight"), cfg.padded_vocab_size)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    out[:t.shape[0]] = t
    return out


def _import_attention(r, cfg, fam, hf_cfg, p, o):
    if fam == "deepseek_v3":
        interleave = bool(getattr(hf_cfg, "rope_interleave", True))
        heads, qh = cfg.num_attention_heads, cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        for ours, theirs in _MLA:
            if p + theirs + ".weight" not in r and ours in ("linear_q_down_proj", "q_layernorm", "linear_q_up_proj",
                                                           "linear_q_proj"):
                continue  # q_lora_rank decides which query projections exist
            t = r.get(p + theirs + ".weight")
            if interleave and ours in ("linear_q_up_proj", "linear_q_proj"):
                t = t[_rope_perm(cfg, heads * qh, qh)]
            elif interleave and ours == "linear_kv_down_proj":
                t = t[_rope_perm(cfg, t.shape[0], t.shape[0])]
            yield o + ours + ".weight", t
        return
    q, k, v = (r.get(p + f"{x}_proj.weight") for x in "qkv")
    yield o + "query_key_value.weight", fuse_qkv(q, k, v, cfg)
    if cfg.add_qkv_bias:
        yield o + "query_key_value.bias", fuse_qkv(*(r.get(p + f"{x}_proj.bias") for x in "qkv"), cfg)
    yield o + "dense.weight", r.get(p + "o_proj.weight")
    if cfg.qk_layernorm:
        yield o + "q_layernorm.weight", r.get(p + "q_norm.weight")
        yield o + "k_layernorm.weight", r.get(p + "k_norm.weight")


def import_experts(r: SafetensorsReader, cfg: ModelConfig, moe, arch: str
                   ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
    """(MoE layer index, expert id, {checkpoint expert-file name: tensor}) for every routed expert, one expert in
    memory at a time (a fused [E, ...] HF tensor: one layer's)."""
    fam = FAMILIES[arch]
    f, h = moe.moe_ffn_hidden_size or cfg.ffn_hidden_size, cfg.hidden_size
    for i, spec in enumerate(moe.layer_plan(cfg.num_layers)):
        if spec is None:
            continue
        p = f"model.layers.{i}."
        fused = (r.get(p + "mlp.experts.gate_up_proj"), r.get(p + "mlp.experts.down_proj")) \
            if p + "mlp.experts.gate_up_proj" in r else None
        for e in range(spec.num_experts):
            if fused is not None:
                w1, w2 = fused[0][e].clone(), fused[1][e].clone()
            else:
                g, u, d = _expert_names(fam, p, e)
                w1, w2 = torch.cat((r.get(g), r.get(u))), r.get(d)
            yield spec.moe_index, e, {"experts.w1_eFD": w1, "experts.b1_eF": torch.zeros(2 * f),
                                      "experts.w2_eDF": w2, "experts.b2_eD": torch.zeros(h)}


def _import_moe(r, cfg, moe, fam, p, o, experts=True):
    n, f = moe.num_experts[0], moe.moe_ffn_hidden_size or cfg.ffn_hidden_size
    yield o + "router.weight", r.get(_router_name(fam, p))
    if fam == "deepseek_v3":
        yield o + "router.expert_bias", r.get(p + "mlp.gate.e_score_correction_bias")
    if not experts:
        pass
    elif p + "mlp.experts.gate_up_proj" in r:  # transformers 5's fused form
        yield o + "experts.w1_eFD", r.get(p + "mlp.experts.gate_up_proj")
        yield o + "experts.w2_eDF", r.get(p + "mlp.experts.down_proj")
    else:
        for e in range(n):  # "name#e": row e of the stacked expert tensor, so no layer-sized copy is made
            g, u, d = _expert_names(fam, p, e)
            yield f"{o}experts.w1_eFD#{e}", torch.cat((r.get(g), r.get(u)))
            yield f"{o}experts.w2_eDF#{e}", r.get(d)
    if experts:
        yield o + "experts.b1_eF", torch.zeros(n, 2 * f)
        yield o + "experts.b2_eD", torch.zeros(n, cfg.hidden_size)
    if moe.shared_expert_ffn_hidden_size is not None:
        s = _shared_prefix(fam, p)
        yield o + "shared_expert.mlp.dense_h_to_4h.weight", torch.cat((r.get(s + "gate_proj.weight"),
                                                                        r.get(s + "up_proj.weight")))
        yield o + "shared_expert.mlp.dense_4h_to_h.weight", r.get(s + "down_proj.weight")
        if moe.shared_expert_gate:
            yield o + "shared_expert.gate.weight", r.get(p + "mlp.shared_expert_gate.weight")


# ------------------------------------------------------------------------------------------------ export
def stacked_expert_fn(sd: Dict[str, torch.Tensor]):
    """expert(layer, moe_index, e) over a full state dict holding the stacked expert tensors."""
    def expert(layer: int, moe_index: int, e: int) -> Dict[str, torch.Tensor]:
        m = f"layers.{layer}.mlp."
        return {k: sd[m + k][e] for k in ("experts.w1_eFD", "experts.b1_eF", "experts.w2_eDF", "experts.b2_eD")}
    return expert


def export_tensors(sd: Dict[str, torch.Tensor], cfg: ModelConfig, moe, arch: str, expert=None
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for `arch` from this model's TP-1 dense state dict `sd`; `expert(layer,
    moe_index, e)` gives one routed expert's {experts.w1_eFD: [2F, D], ...} (default: sliced from `sd`)."""
    fam = FAMILIES[arch]
    plan = moe.layer_plan(cfg.num_layers) if moe is not None else (None,) * cfg.num_layers
    expert = expert or stacked_expert_fn(sd)
    yield "model.embed_tokens.weight", sd["word_embeddings.weight"]
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        yield p + "input_layernorm.weight", sd[o + "input_layernorm.weight"]
        yield p + "post_attention_layernorm.weight", sd[o + "post_attention_layernorm.weight"]
        a, sa = p + "self_attn.", o + "self_attention."
        if fam == "deepseek_v3":
            for ours, theirs in _MLA:
                if sa + ours + ".weight" in sd:
                    yield a + theirs + ".weight", sd[sa + ours + ".weight"]
        else:
            for x, t in zip("qkv", split_qkv(sd[sa + "query_key_value.weight"], cfg)):
                yield a + f"{x}_proj.weight", t
            if cfg.add_qkv_bias:
                for x, t in zip("qkv", split_qkv(sd[sa + "query_key_value.bias"], cfg)):
                    yield a + f"{x}_proj.bias", t
            yield a + "o_proj.weight", sd[sa + "dense.weight"]
            if cfg.qk_layernorm:
                yield a + "q_norm.weight", sd[sa + "q_layernorm.weight"]
                yield a + "k_norm.weight", sd[sa + "k_layernorm.weight"]
        m = o + "mlp."
        if not plan[i]:
            g, u = sd[m + "dense_h_to_4h.weight"].chunk(2)
            yield p + "mlp.gate_proj.weight", g
            yield p + "mlp.up_proj.weight", u
            yield p + "mlp.down_proj.weight", sd[m + "dense_4h_to_h.weight"]
            continue
        yield _router_name(fam, p), sd[m + "router.weight"]
        if fam == "deepseek_v3":
            yield p + "mlp.gate.e_score_correction_bias", sd[m + "router.expert_bias"]
        for e in range(plan[i].num_experts):  # one expert in memory at a time
            w = expert(i, plan[i].moe_index, e)
            for b in ("experts.b1_eF", "experts.b2_eD"):
                if w[b].abs().max() != 0:
                    raise ConfigError(f"export as {arch}: {m}{b} of expert {e} is not zero (experts with biases); "
                                      f"transformers' experts have none")
            g, u, d = _expert_names(fam, p, e)
            gate, up = w["experts.w1_eFD"].chunk(2)
            yield g, gate
            yield u, up
            yield d, w["experts.w2_eDF"]
        if moe.shared_expert_ffn_hidden_size is not None:
            s = _shared_prefix(fam, p)
            g, u = sd[m + "shared_expert.mlp.dense_h_to_4h.weight"].chunk(2)
            yield s + "gate_proj.weight", g
            yield s + "up_proj.weight", u
            yield s + "down_proj.weight", sd[m + "shared_expert.mlp.dense_4h_to_h.weight"]
            if moe.shared_expert_gate:
                yield p + "mlp.shared_expert_gate.weight", sd[m + "shared_expert.gate.weight"]
    yield "model.norm.weight", sd["final_layernorm.weight"]
    if cfg.untie_embeddings_and_output_weights:
        yield "lm_head.weight", sd["output_layer.weight"]


_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}  # torch dtype -> safetensors header name


def write_shards(tensors: Iterator[Tuple[str, torch.Tensor]], out_dir: str, max_shard_bytes: int,
                 dtype: torch.dtype = torch.float32) -> List[str]:
    """safetensors shards of at most max_shard_bytes (a larger single tensor gets a shard of its own) plus
    model.safetensors.index.json when there is more than one. Each tensor goes to disk as it comes, into its shard's
    data file; a finished shard is its header (the safetensors format: 8-byte little-endian length, JSON, data) then
    that file, copied in 64 MB chunks. So memory holds one tensor (in `dtype`), never a shard."""
    import shutil

    shards: List[Tuple[str, list]] = []  # (data file, [(name, shape, bytes)])
    f, size, total = None, 0, 0
    for k, t in tensors:
        t = t.detach().to(dtype).contiguous()
        b = t.numel() * t.element_size()
        if f is not None and size + b > max_shard_bytes:
            f.close()
            f = None
        if f is None:
            shards.append((os.path.join(out_dir, f"model-{len(shards) + 1:05d}.safetensors.data.tmp"), []))
            f, size = open(shards[-1][0], "wb"), 0
        if b:
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, no copy
        shards[-1][1].append((k, list(t.shape), b))
        size += b
        total += b
        del t
    if f is not None:
        f.close()
    n, files, where = len(shards), [], {}
    for j, (data, entries) in enumerate(shards, 1):
        final = SINGLE if n == 1 else f"model-{j:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k, shape, b in entries:
            header[k] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [off, off + b]}
            off += b
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
        with open(os.path.join(out_dir, final + ".tmp"), "wb") as out, open(data, "rb") as src:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(src, out, 64 * 2 ** 20)
        os.replace(os.path.join(out_dir, final + ".tmp"), os.path.join(out_dir, final))
        os.remove(data)
        files.append(final)
        where.update({k: final for k, _, _ in entries})
    if n > 1:
        with open(os.path.join(out_dir, INDEX), "w") as fi:
            json.dump({"metadata": {"total_size": total}, "weight_map": where}, fi, indent=2)
    return files
