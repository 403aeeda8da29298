"""The gguf-py adapter: every `gguf` call of dsc's export is in this file.

A dsc model becomes one GGUF file that llama.cpp (llama-cli, llama-server, ollama) and
transformers' GGUF reader load: architecture metadata, tensors under llama.cpp's names (gguf-py's
TensorNameMap), the tokenizer, and dsc's provenance.

What lands in each tensor:
- a linear on a dsc grid is stored as the GGUF block type that holds that grid exactly, from its
  integer codes and scales: 4-bit symmetric → Q4_0 (q + 8 in a nibble, the group's scale as the
  block's float16 `d`), 4-bit asymmetric → Q4_1 (`d` = scale, `m` = −(zero − qmin)·scale), 8-bit
  symmetric → Q8_0. GGUF blocks are 32 weights with a float16 scale, so the grid's group size must
  be a multiple of 32 (or one per row of a width divisible by 32) and its scales float16 values
  (the quantizers' `scale_dtype: float16`). Any other grid is refused, or re-quantized on request
  with the error that adds reported;
- a float linear, the embedding and an untied LM head are stored as asked (F32, F16, BF16, or
  Q8_0 / Q4_0 / Q4_1 by gguf-py's numpy quantizers, which round as llama-quantize does); a width
  that is no multiple of 32 cannot be blocked and falls back to F16 (reported);
- norms and biases stay F32.
Llama-architecture files (llama, mistral) store q/k rows in llama.cpp's RoPE order (each head's
halves interleaved, as its converter does); rows move with their scales, so grids stay exact.
DeepSeek-V2/V3 (llama.cpp's deepseek2) store MLA as llama.cpp absorbs it: kv_b split into k_b
(transposed per head: a grid's blocks cannot follow, so a quantized k_b holds the grid's values in
F32) and v_b (rows kept: grids exact), the MoE routers and the routing correction bias in F32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsc.errors import DscInputError, FieldError
from dsc.quantize.ct import linear_grid, unpacked
from dsc.quantize.experts import ATTR, is_fused
from dsc.quantize.grid import Grid, Quantized

# transformers model_type → llama.cpp architecture.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2",
                 "deepseek_v3": "deepseek2"}
MOE = ("qwen2moe", "qwen3moe")
ROUTERS = ("mlp.gate", "mlp.router")  # MoE routers stay F32, as llama.cpp's converter keeps them
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")


def _types():
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}


@dataclass
class Tensor:
    """One tensor of the file: its llama.cpp name, type and data (a float array, or block bytes)."""

    name: str
    kind: str  # f32 | f16 | bf16 | q8_0 | q4_0 | q4_1
    data: np.ndarray
    source: str  # the state-dict name it came from
    how: str  # "grid" (dsc's grid, exact), "requantized", "cast", "quantized", "fallback"
    error: float | None = None  # relative RMS change of the weight this tensor's storage made (requantized)
    expected: torch.Tensor | None = field(default=None, repr=False)  # grid: the values its blocks must decode to


@dataclass
class Plan:
    arch: str
    tensors: list[Tensor] = field(default_factory=list)

    def summary(self) -> dict:
        kinds, how = {}, {}
        for t in self.tensors:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
            how[t.how] = how.get(t.how, 0) + 1
        return {"tensor_types": kinds, "tensors_by_origin": how,
                "requantized": {t.source: round(t.error, 6) for t in self.tensors if t.how == "requantized"},
                "fallback_f16": [t.source for t in self.tensors if t.how == "fallback"]}


def architecture(config) -> str:
    """llama.cpp's name for the model's family; an unsupported one is refused listing those that are."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise DscInputError("export", f"GGUF export of {config.model_type!r} models is not supported; supported "
                            f"families: {', '.join(sorted(ARCHITECTURES))}")
    if arch in MOE:
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise DscInputError("export", "llama.cpp's qwen2moe / qwen3moe have experts in every layer; this model "
                                f"has dense layers among them (mlp_only_layers {config.mlp_only_layers}): not "
                                "exportable to GGUF")
        norm = {"qwen2moe": False, "qwen3moe": True}[arch]  # what llama.cpp computes for the family
        if bool(getattr(config, "norm_topk_prob", norm)) != norm:
            raise DscInputError("export", f"llama.cpp's {arch} {'normalizes' if norm else 'does not normalize'} the "
                                f"top-k routing weights; this model sets norm_topk_prob: {config.norm_topk_prob}")
    if arch == "deepseek2":
        _check_deepseek(config)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind == "yarn" and arch == "deepseek2":
        return arch  # DeepSeek-V3's own long-context RoPE, written as llama.cpp's converter does
    if kind not in ("default", None):
        raise DscInputError("export", f"the model uses {kind!r} RoPE scaling, which dsc's GGUF export does not "
                            "write yet: export a model with default RoPE, or convert it with llama.cpp's "
                            "convert_hf_to_gguf.py")
    return arch


def _check_deepseek(config) -> None:
    """What llama.cpp's deepseek2 computes, against what this DeepSeek model does."""
    experts, groups = int(config.n_routed_experts), int(getattr(config, "n_group", None) or 1)
    topk_group = int(getattr(config, "topk_group", None) or groups)
    if groups > 1 and experts % groups:
        raise DscInputError("export", f"{experts} routed experts do not split into n_group {groups} groups: "
                            "llama.cpp's group-limited routing needs equal groups")
    if config.model_type == "deepseek_v2" and getattr(config, "topk_method", "greedy") == "group_limited_greedy" \
            and 1 < groups and topk_group < groups:
        raise DscInputError("export", "DeepSeek-V2's group_limited_greedy routing scores a group by its best expert; "
                            "llama.cpp's deepseek2 scores it by its best two (DeepSeek-V3's rule): the file would "
                            "route differently. Export with topk_group equal to n_group, or topk_method greedy")
    if int(getattr(config, "moe_layer_freq", 1) or 1) != 1:
        raise DscInputError("export", f"moe_layer_freq {config.moe_layer_freq}: llama.cpp's deepseek2 has experts in "
                            "every layer after the first_k_dense_replace dense ones")


def _deepseek_rope_rows(n_rows: int, lead: int, rope: int) -> torch.Tensor:
    """Row order of q_b (per head: `lead` no-RoPE rows, then `rope`) or kv_a (`lead` latent rows,
    then the shared RoPE key) for llama.cpp, which rotates adjacent pairs, from a checkpoint whose
    RoPE part rotates halves (DeepSeek-V3 with `rope_interleave: false`): its RoPE rows interleaved."""
    per = lead + rope
    heads = n_rows // per
    inner = torch.arange(rope).reshape(2, rope // 2).t().reshape(-1)
    return (torch.arange(heads)[:, None] * per + torch.cat([torch.arange(lead), lead + inner])).reshape(-1)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---- tensor packing --------------------------------------------------------------------------

def _f16_exact(x: torch.Tensor) -> bool:
    return bool(torch.equal(x.to(torch.float16).float(), x.float()))


def _blocks(q: Quantized, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per block of 32 weights (out, in / 32)."""
    per = q.grid.group(in_features) // BLOCK
    return q.scale.repeat_interleave(per, dim=1), q.zero.repeat_interleave(per, dim=1)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kind: str) -> np.ndarray:
    """Block bytes (out, in / 32 · block bytes) of integer codes (out, in) in [qmin, qmax] with a
    float16-exact scale and integer zero point per block (out, in / 32)."""
    out, width = codes.shape
    nb = width // BLOCK
    d = scale.to(torch.float16).numpy().view(np.uint8).reshape(out, nb, 2)
    if kind == "q8_0":
        qs = codes.to(torch.int8).numpy().view(np.uint8).reshape(out, nb, BLOCK)
        return np.concatenate([d, qs], axis=-1).reshape(out, -1)
    q = (codes.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(out, nb, 2, BLOCK // 2)
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))  # weight j in the low nibble of byte j, j + 16 high
    parts = [d]
    if kind == "q4_1":
        m = (-(zero + 8) * scale).to(torch.float16).numpy().view(np.uint8).reshape(out, nb, 2)
        parts.append(m)
    return np.concatenate(parts + [qs], axis=-1).reshape(out, -1)


def grid_kind(grid: Grid) -> str | None:
    """The GGUF block type that holds `grid`, or None."""
    if grid.bits == 4:
        return "q4_0" if grid.symmetric else "q4_1"
    if grid.bits == 8 and grid.symmetric:
        return "q8_0"
    return None


def why_not_exact(weight: torch.Tensor, q: Quantized) -> str | None:
    """Why the grid `q` of `weight` (out, in) cannot be stored bit-exactly in GGUF, or None."""
    kind = grid_kind(q.grid)
    if kind is None:
        return (f"a {q.grid.bits}-bit {'symmetric' if q.grid.symmetric else 'asymmetric'} grid has no GGUF block "
                "type (Q4_0: 4-bit symmetric, Q4_1: 4-bit asymmetric, Q8_0: 8-bit symmetric)")
    group = q.grid.group_size or weight.shape[1]
    if group % BLOCK or weight.shape[1] % BLOCK:
        return f"group size {group} is no multiple of GGUF's {BLOCK}-weight blocks"
    if not _f16_exact(q.scale):
        return "its scales are no float16 values (quantize with `scale_dtype: float16`)"
    if kind == "q4_1" and not _f16_exact(-(q.zero + 8) * q.scale):
        return "its block minimums are no float16 values (quantize with `scale_dtype: float16`)"
    return None


def _grid_tensor(name: str, source: str, weight: torch.Tensor, q: Quantized) -> Tensor:
    kind = grid_kind(q.grid)
    scale, zero = _blocks(q, weight.shape[1])
    codes = torch.round(weight.float().reshape(weight.shape[0], scale.shape[1], BLOCK) / scale[..., None])
    codes = (codes + zero[..., None]).clamp(q.grid.qmin, q.grid.qmax)
    values = ((codes - zero[..., None]) * scale[..., None]).reshape(weight.shape)  # float32: what the blocks decode to
    if not torch.equal(values.to(weight.dtype), weight):  # a bf16 / fp16 model holds them rounded to its dtype
        diff = (values - weight.float()).abs().max().item()
        raise RuntimeError(f"GGUF export: {source} is not on the grid its scales describe (max difference "
                           f"{diff:.3g}); this is a dsc bug")
    return Tensor(name, kind, pack(codes.reshape(weight.shape), scale, zero, kind), source, "grid", expected=values)


def _requantized(name: str, source: str, weight: torch.Tensor, kind: str) -> Tensor:
    """`weight` (already on a grid GGUF cannot hold) re-rounded by gguf-py into `kind`; the
    relative RMS change it adds is reported."""
    data = _quantize(weight, kind)
    back = torch.from_numpy(dequantize(data, kind, weight.shape))
    w = weight.float()
    error = float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp(min=1e-30))
    return Tensor(name, kind, data, source, "requantized", error)


def _quantize(weight: torch.Tensor, kind: str) -> np.ndarray:
    from gguf import quants

    return quants.quantize(weight.detach().float().contiguous().numpy(), _types()[kind])


def dequantize(data: np.ndarray, kind: str, shape) -> np.ndarray:
    """Float32 values of block bytes (gguf-py's reference dequantizer)."""
    from gguf import quants

    return quants.dequantize(data, _types()[kind]).reshape(shape)


def _float(name: str, source: str, t: torch.Tensor, kind: str, how: str | None = None) -> Tensor:
    """A float tensor stored as `kind`; `how` defaults to "quantized" for block types, else "cast"."""
    how = how or ("quantized" if kind in BLOCK_TYPES else "cast")
    t = t.detach()
    if kind in BLOCK_TYPES:
        if t.ndim != 2 or t.shape[1] % BLOCK:
            return Tensor(name, "f16", t.to(torch.float16).numpy(), source, "fallback")
        return Tensor(name, kind, _quantize(t, kind), source, how)
    if kind == "bf16":
        from gguf import quants

        return Tensor(name, "bf16", quants.quantize(t.float().numpy(), _types()["bf16"]), source, how)
    return Tensor(name, kind, t.to(torch.float16 if kind == "f16" else torch.float32).numpy(), source, how)


def _llama_rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama architecture expects for q or k (`n_head` heads): within each
    head the two rotated halves interleave (HF: [x0..x(d/2-1), y0..], GGUF: [x0, y0, x1, y1, ..])."""
    d = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, d // 2).transpose(1, 2).reshape(-1)


def plan(model, weights: str, embedding: str, requantize: bool) -> Plan:
    """Every tensor of the file, named, typed and packed (nothing written yet).

    weights: how float linears are stored (f32 | f16 | bf16 | q8_0 | q4_0 | q4_1; auto: f32);
    embedding: how the embedding and an untied LM head are stored unless dsc quantized the head;
    requantize: re-round grids GGUF cannot hold (else they are refused, naming the fix)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    config = model.config
    arch = architecture(config)
    if any(hasattr(m, "SCB") or type(getattr(m, "weight", None)).__name__ == "Int8Params" for m in model.modules()):
        raise DscInputError("export", "bitsandbytes int8 weights have no GGUF form: export the model before the "
                            "`int8` stage with backend bitsandbytes, or use backend compressed-tensors (→ Q8_0)")
    unpacked(model)  # a checkpoint just loaded holds packed codes until its first forward
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    float_kind = "f32" if weights == "auto" else weights
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    modules = dict(model.named_modules())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = Plan(arch)
    mla = arch == "deepseek2"
    interleaved = config.model_type == "deepseek_v2" or bool(getattr(config, "rope_interleave", True))
    for source, t in model.state_dict().items():
        t = t.detach().cpu()  # a GPU run's model: the file is written from host memory
        base, _, suffix = source.rpartition(".")
        if suffix in ("gate_up_proj", "down_proj") and is_fused(modules.get(base)):
            out.tensors += _experts(base, suffix, t, getattr(modules[base], ATTR, None), float_kind, requantize)
            continue
        if suffix == "e_score_correction_bias":  # DeepSeek-V3's routing bias: llama.cpp's exp_probs_b
            name = f"{names.get_name(base + '.e_score_correction')}.bias"
            out.tensors.append(_float(name, source, t.float(), "f32"))
            continue
        if mla and base.endswith("kv_b_proj") and suffix == "weight":
            out.tensors += _kv_b(names.get_name(base), source, t, linear_grid(modules[base]), config,
                                 float_kind, requantize)
            continue
        if suffix not in ("weight", "bias") or (tied and base == "lm_head"):
            continue  # scales and zero points travel with their weight; a tied head is the embedding
        module = modules.get(base)
        gname = names.get_name(base)
        if gname is None:
            raise DscInputError("export", f"{source} has no llama.cpp tensor name in the {arch!r} architecture: "
                                "the model holds tensors this exporter does not know")
        name = f"{gname}.{suffix}"
        rows = None
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            rows = _llama_rope_rows(t.shape[0], heads if base.endswith("q_proj") else kv_heads)
        if mla and not interleaved and base.endswith(("q_b_proj", "q_proj", "kv_a_proj_with_mqa")):
            lead = config.kv_lora_rank if base.endswith("kv_a_proj_with_mqa") else config.qk_nope_head_dim
            rows = _deepseek_rope_rows(t.shape[0], lead, config.qk_rope_head_dim)
        if rows is not None:
            t = t[rows]
        if base.endswith(ROUTERS) and suffix == "weight" and t.ndim == 2 and t.shape[0] < t.shape[1]:
            out.tensors.append(_float(name, source, t, "f32"))
            continue
        if base.endswith("shared_expert_gate"):  # llama.cpp reads it as a vector (its grid values, in F32)
            out.tensors.append(_float(name, source, t.float().reshape(-1), "f32"))
            continue
        q = linear_grid(module) if suffix == "weight" and module is not None else None
        if q is not None:
            if rows is not None:
                q = Quantized(q.grid, q.scale[rows], q.zero[rows])
            out.tensors.append(_from_grid(name, source, t, q, requantize))
        elif t.ndim < 2:
            out.tensors.append(_float(name, source, t.float(), "f32"))
        elif base in ("model.embed_tokens", "lm_head"):
            out.tensors.append(_float(name, source, t, embedding))
        else:
            out.tensors.append(_float(name, source, t, float_kind))
    return out


def _from_grid(name: str, source: str, t: torch.Tensor, q: Quantized, requantize: bool) -> Tensor:
    """A weight (out, in) on a dsc grid: stored exactly, re-rounded on request, or refused."""
    problem = why_not_exact(t, q)
    if problem is None:
        return _grid_tensor(name, source, t, q)
    if not requantize:
        raise FieldError("requantize", f"{source} cannot be stored exactly in GGUF: {problem}. Set "
                                       "`requantize: true` to re-round it (the error it adds is reported)")
    if t.shape[1] % BLOCK:
        raise FieldError("requantize", f"{source} has {t.shape[1]} inputs, no multiple of {BLOCK}: no GGUF block "
                                       "type holds it; add it to the quantizer's `ignore`")
    return _requantized(name, source, t, grid_kind(q.grid) or ("q8_0" if q.grid.bits == 8 else "q4_0"))


def _kv_b(name: str, source: str, t: torch.Tensor, q: Quantized | None, config, float_kind: str,
          requantize: bool) -> list[Tensor]:
    """MLA's kv_b (heads · (nope + v), kv_lora_rank) as llama.cpp's absorbed pair (its converter's
    split): attn_k_b (heads, kv_lora_rank, nope), each head's key part transposed, and attn_v_b
    (heads, v, kv_lora_rank). v_b keeps kv_b's rows, so a grid stays exact; k_b contracts over the
    other axis, so the grid's blocks cannot carry over: it holds the grid's values in F32, which
    compute exactly what dsc does (a float kv_b's k_b is stored as `weights` says)."""
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    rank = t.shape[1]
    k_rows = (torch.arange(heads)[:, None] * (nope + v) + torch.arange(nope)).reshape(-1)
    v_rows = (torch.arange(heads)[:, None] * (nope + v) + nope + torch.arange(v)).reshape(-1)
    k_name, v_name = name.replace("attn_kv_b", "attn_k_b"), name.replace("attn_kv_b", "attn_v_b")
    k_b = t.float()[k_rows].reshape(heads, nope, rank).transpose(1, 2).reshape(heads * rank, nope).contiguous()
    if q is None:
        k = _float(f"{k_name}.weight", f"{source}[k]", k_b, float_kind)
        vt = _float(f"{v_name}.weight", f"{source}[v]", t[v_rows], float_kind)
    else:
        k = Tensor(f"{k_name}.weight", "f32", k_b.numpy(), f"{source}[k]", "grid-values")
        vt = _from_grid(f"{v_name}.weight", f"{source}[v]", t[v_rows],
                        Quantized(q.grid, q.scale[v_rows], q.zero[v_rows]), requantize)
    k.data = k.data.reshape(heads, rank, -1)
    vt.data = vt.data.reshape(heads, v, -1)
    return [k, vt]


def _experts(base: str, suffix: str, t: torch.Tensor, q, float_kind: str, requantize: bool) -> list[Tensor]:
    """A fused experts tensor as llama.cpp's 3-D ones: gate_up_proj (E, 2I, H) → ffn_gate_exps and
    ffn_up_exps (E, I, H), down_proj (E, H, I) → ffn_down_exps. On a dsc grid each expert's rows
    are packed like a linear's (their scales move with them)."""
    parts = {"gate_up_proj": [("gate", slice(0, t.shape[1] // 2)), ("up", slice(t.shape[1] // 2, None))],
             "down_proj": [("down", slice(None))]}[suffix]
    grid = None if q is None else (q.gate_up if suffix == "gate_up_proj" else q.down)
    if grid is not None:
        grid = Quantized(grid.grid, grid.scale.cpu(), grid.zero.cpu())
    layer = base.split(".layers.")[1].split(".")[0]
    out = []
    for which, rows in parts:
        name = f"blk.{layer}.ffn_{which}_exps.weight"
        source = f"{base}.{suffix}" + (f"[{which}]" if suffix == "gate_up_proj" else "")
        w = t[:, rows].detach()
        e, r, c = w.shape
        flat = w.reshape(e * r, c)
        if grid is None:
            one = _float(name, source, flat, float_kind)
        else:
            qe = Quantized(grid.grid, grid.scale[:, rows].reshape(e * r, -1), grid.zero[:, rows].reshape(e * r, -1))
            one = _from_grid(name, source, flat, qe, requantize)
        one.data = one.data.reshape(e, r, -1)
        out.append(one)
    return out


# ---- tokenizer -------------------------------------------------------------------------------

def _pre_from_json(tok_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, where it is one dsc
    recognizes (plain GPT-2 splitting, SmolLM's digits-first splitting, a split regex transformers'
    GGUF reader names)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if types and types[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # older transformers: no table to match against
            return None
        return next((name for name, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    return None


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str | None) -> dict:
    """What the file says of the tokenizer: model type, tokens, scores, types, merges, special
    ids, BOS/EOS flags, chat template. `pre`: llama.cpp's pre-tokenizer name (None: recognized
    from the tokenizer, else refused naming the field)."""
    from gguf import TokenType

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json["model"]
    decoder = (tok_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE":
        raise DscInputError("export", f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    spm = bool(model.get("byte_fallback"))  # sentencepiece-style BPE (Llama 2, stories260K): llama.cpp "llama"
    if not spm and decoder != "ByteLevel":
        raise DscInputError("export", f"GGUF export supports byte-level BPE and sentencepiece BPE tokenizers; this "
                            f"one decodes with {decoder!r}")
    if not spm and pre is None:
        pre = _pre_from_json(tok_json)
        if pre is None:
            raise FieldError("pre_tokenizer", "dsc does not recognize this tokenizer's pre-tokenizer: name "
                                              "llama.cpp's (e.g. llama-bpe, qwen2, smollm, gpt-2) in "
                                              "`pre_tokenizer`")
    n = len(tokenizer)
    if n > vocab_size:
        raise DscInputError("export", f"the tokenizer has {n} tokens but the model's embedding only {vocab_size}")
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    types, scores = [], []
    for i, text in enumerate(tokens):
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif spm and i == tokenizer.unk_token_id:
            types.append(TokenType.UNKNOWN)
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
        scores.append(0.0 if types[-1] != TokenType.NORMAL else -float(i))  # sentencepiece order = merge priority
    for i in range(n, vocab_size):  # embedding rows past the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        scores.append(0.0)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    meta = {
        "model": "llama" if spm else "gpt2",
        "pre": pre or "default",
        "tokens": tokens,
        "types": [int(t) for t in types],
        "scores": scores if spm else None,
        "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    if spm:
        meta["add_space_prefix"] = _prepends_space(tok_json)
    return meta


def _prepends_space(tok_json: dict) -> bool:
    pre = tok_json.get("pre_tokenizer") or {}
    normalizer = json.dumps(tok_json.get("normalizer") or {})
    return pre.get("prepend_scheme", "never") != "never" or '"Prepend"' in normalizer


def teacher_pre_tokenizer(path: Path) -> str | None:
    """The pre-tokenizer name a GGUF file records (the teacher's, when it came as one)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


# ---- the file --------------------------------------------------------------------------------

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}


def write(path: Path, model, the_plan: Plan, tok: dict, name: str, provenance: dict) -> None:
    """Write the GGUF file at `path` (the caller makes it atomic)."""
    import gguf

    config = model.config
    arch = the_plan.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(1 if arch == "deepseek2" else int(config.num_key_value_heads))  # MLA absorbed: one KV head
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    if config.model_type == "mixtral":  # llama.cpp's llama architecture with routed experts (top-k renormalized)
        w.add_expert_count(int(config.num_local_experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
    if arch in MOE:
        w.add_expert_count(int(config.num_experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if arch == "deepseek2":
        _deepseek_metadata(w, config)
    else:
        hd = head_dim(config)
        w.add_rope_dimension_count(hd)
        w.add_key_length(hd)
        w.add_value_length(hd)
    counts = {}
    for t in the_plan.tensors:
        if t.data.ndim == 2 and t.source.endswith(".weight") and "embed" not in t.source and "lm_head" not in t.source:
            counts[t.kind] = counts.get(t.kind, 0) + 1
    main = max(counts, key=counts.get) if counts else "f32"
    w.add_file_type(FILE_TYPES[main])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # tokenizer
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            fn(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])
    # provenance
    for key, value in provenance.items():
        w.add_string(f"dsc.{key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    types = _types()
    for t in the_plan.tensors:
        if t.kind in BLOCK_TYPES or t.kind == "bf16":
            w.add_tensor(t.name, t.data, raw_dtype=types[t.kind])
        else:
            w.add_tensor(t.name, np.ascontiguousarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _deepseek_metadata(w, config) -> None:
    """llama.cpp's deepseek2 keys: MLA as absorbed MQA (key = latent + RoPE key, value = latent),
    the MLA head sizes, routed / shared experts, dense leading layers and routing."""
    import gguf

    v3 = config.model_type == "deepseek_v3"
    rank, rope = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
    w.add_q_lora_rank(int(config.q_lora_rank or 0))  # 0: one q_proj (llama.cpp requires the key)
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(int(config.qk_nope_head_dim) + rope)
    w.add_value_length_mla(int(config.v_head_dim))
    w.add_rope_dimension_count(rope)
    w.add_leading_dense_block_count(int(getattr(config, "first_k_dense_replace", 0) or 0))
    w.add_expert_count(int(config.n_routed_experts))
    w.add_expert_used_count(int(config.num_experts_per_tok))
    w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    w.add_expert_shared_count(int(getattr(config, "n_shared_experts", 0) or 0))
    w.add_expert_weights_scale(float(getattr(config, "routed_scaling_factor", 1.0) or 1.0))
    if v3 and getattr(config, "norm_topk_prob", False):  # transformers' DeepSeek-V2 never renormalizes
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope_params.get("rope_type", rope_params.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope_params["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope_params["original_max_position_embeddings"]))
        for key, fn in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                        ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope_params.get(key) is not None:
                fn(float(rope_params[key]))
        if rope_params.get("mscale_all_dim"):  # llama.cpp's deepseek2 divides this key by 0.1 when reading it
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope_params["mscale_all_dim"]))
    groups = int(getattr(config, "n_group", None) or 1)
    if groups > 1:
        w.add_expert_group_count(groups)
        w.add_expert_group_used_count(int(getattr(config, "topk_group", None) or groups))


def read_summary(path: Path) -> dict:
    """What a GGUF file holds: architecture, tensor names → (type, shape), and its dsc keys."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")
              or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")}
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    return {"fields": fields, "tensors": tensors}
