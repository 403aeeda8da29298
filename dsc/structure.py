"""One place that knows model structure.

Prune, quantize and distill need the same facts: where the decoder layers are, which linears form
attention (and its head layout), which form the MLP, and which config fields describe them. They
are derived here once, from the loaded modules and config, into a small typed description every
stage consumes; adding a family is one entry in FAMILIES, not an `if` in every stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dsc.errors import DscInputError


@dataclass(frozen=True)
class Family:
    """Module names of one family of decoder layers."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the ModuleList of decoder layers
    attn: str  # attention module inside a layer
    q: str | None  # separate projections (q/k/v) ...
    k: str | None
    v: str | None
    qkv: str | None  # ... or one fused projection
    o: str
    mlp: str  # the MLP, or the MoE block, inside a layer
    gate: str | None  # gated MLPs (SwiGLU) have one; plain MLPs do not
    up: str
    down: str
    experts_key: str | None = None  # config field holding the routed expert count
    expert_width_key: str | None = None  # config field holding one routed expert's intermediate size
    shared_width_key: str | None = None  # ... the shared expert's (None: derived from expert_width_key)
    fixed_head_dim: bool = True  # False: head size = hidden / heads, so heads cannot be removed
    mla: bool = False  # multi-head latent attention (DeepSeek-V2/V3): q_a/q_b, kv_a/kv_b, o
    shared: str | None = None  # shared expert(s) inside the MoE block, a dense MLP
    shared_gate: str | None = None  # Qwen2-MoE: a sigmoid gate on the shared expert's output
    head_norm: bool = False  # q/k norms over all heads at once (OLMoE): heads cannot be removed exactly


_LLAMA = dict(attn="self_attn", q="q_proj", k="k_proj", v="v_proj", qkv=None, o="o_proj", mlp="mlp",
              gate="gate_proj", up="up_proj", down="down_proj", layers="model.layers")
FAMILIES = (
    Family("llama-like", ("llama", "mistral", "qwen2", "qwen3"), **_LLAMA),
    Family("mixtral", ("mixtral",), **_LLAMA, experts_key="num_local_experts", expert_width_key="intermediate_size"),
    Family("qwen-moe", ("qwen2_moe", "qwen3_moe"), **_LLAMA, experts_key="num_experts",
           expert_width_key="moe_intermediate_size", shared="shared_expert", shared_gate="shared_expert_gate",
           shared_width_key="shared_expert_intermediate_size"),
    Family("olmoe", ("olmoe",), **_LLAMA, experts_key="num_experts", expert_width_key="intermediate_size",
           head_norm=True),
    # DeepSeek: shared experts are n_shared_experts × moe_intermediate_size wide, the first
    # first_k_dense_replace layers dense (intermediate_size), routing group-limited (n_group, topk_group)
    Family("deepseek", ("deepseek_v2", "deepseek_v3"), **{**_LLAMA, "q": None, "k": None, "v": None},
           experts_key="n_routed_experts", expert_width_key="moe_intermediate_size", mla=True,
           shared="shared_experts"),
    Family("gpt-neox", ("gpt_neox",), "gpt_neox.layers", "attention", None, None, None, "query_key_value", "dense",
           "mlp", None, "dense_h_to_4h", "dense_4h_to_h", fixed_head_dim=False),
)


# Config flags that give a family's projections a bias: model_type → flag → (the Layer attribute
# holding the linears, "attn" or "mlp" (dense MLPs only), and their attributes there). Keyed by
# model_type, not Family: the llama-like family mixes configs with and without them. This is where
# prune's refit may add an intercept (FLAP's bias compensation) and still leave a config that
# reloads with from_pretrained.
BIAS_FLAGS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "llama": {"attention_bias": ("attn", ("q", "k", "v", "o")), "mlp_bias": ("mlp", ("gate", "up", "down"))},
    "qwen3": {"attention_bias": ("attn", ("q", "k", "v", "o"))},
    "qwen3_moe": {"attention_bias": ("attn", ("q", "k", "v", "o"))},
}


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/V3). Per head h, q_b's rows h·(nope+rope) … hold its
    query (no-RoPE part first), kv_b's rows h·(nope+v) … its no-RoPE key then its value, o's columns
    h·v … its output; the RoPE key (the last `rope` rows of kv_a) is shared by all heads."""

    q_a: nn.Linear | None  # hidden → q_lora_rank (None: one q_proj, no low rank)
    q_a_norm: nn.Module | None
    q_b: nn.Linear  # q_lora_rank (or hidden) → heads · (nope + rope)
    kv_a: nn.Linear  # hidden → kv_lora_rank + rope
    kv_a_norm: nn.Module
    kv_b: nn.Linear  # kv_lora_rank → heads · (nope + v)
    nope: int
    rope: int
    v_dim: int

    @property
    def linears(self) -> list[nn.Linear]:
        return [lin for lin in (self.q_a, self.q_b, self.kv_a, self.kv_b) if lin is not None]


@dataclass(frozen=True)
class Attention:
    path: str  # "model.layers.3.self_attn"
    q: nn.Linear | None  # None where q/k/v are fused into `qkv`
    k: nn.Linear | None
    v: nn.Linear | None
    qkv: nn.Linear | None
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mla: MLA | None = None

    @property
    def group_size(self) -> int:  # query heads per KV head
        return self.num_heads // self.num_kv_heads

    @property
    def linears(self) -> list[nn.Linear]:
        return [lin for lin in (self.q, self.k, self.v, self.qkv) if lin is not None] + \
            (self.mla.linears if self.mla is not None else []) + [self.o]


@dataclass(frozen=True)
class MLP:
    path: str
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.up.out_features

    @property
    def linears(self) -> list[nn.Linear]:
        return [lin for lin in (self.gate, self.up, self.down) if lin is not None]


@dataclass(frozen=True)
class MoE:
    """Routed experts stored fused (transformers 5): gate_up_proj (E, 2I, H), down_proj (E, H, I);
    the router's weight is (E, H)."""

    path: str
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    shared: MLP | None = None  # shared expert(s): every token goes through them
    shared_gate: nn.Linear | None = None

    @property
    def width(self) -> int:  # intermediate size of one routed expert
        return self.experts.down_proj.shape[2]

    @property
    def linears(self) -> list[nn.Linear]:  # the nn.Linear modules; the routed experts are fused tensors
        return (self.shared.linears if self.shared is not None else []) + \
            ([self.shared_gate] if self.shared_gate is not None else [])


@dataclass(frozen=True)
class Layer:
    index: int
    path: str  # "model.layers.3"
    module: nn.Module
    attn: Attention
    mlp: MLP | None  # a dense MLP ...
    moe: MoE | None  # ... or a mixture of experts


@dataclass(frozen=True)
class Structure:
    family: Family
    layers: tuple[Layer, ...]
    model_type: str = ""  # config.model_type (BIAS_FLAGS is keyed by it)

    @property
    def num_heads(self) -> int:
        return self.layers[0].attn.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].attn.num_kv_heads

    def dense(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.mlp is not None]

    def sparse(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.moe is not None]


def supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def describe(model: nn.Module) -> Structure:
    """The structure of a loaded causal LM, or an error naming the supported families."""
    config = model.config
    family = next((f for f in FAMILIES if config.model_type in f.model_types), None)
    if family is None:
        raise DscInputError("teacher", f"model_type {config.model_type!r} is not supported by this stage yet; "
                            f"supported: {supported()}")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = []
    for i, layer in enumerate(_get(model, family.layers, family)):
        path = f"{family.layers}.{i}"
        attn_mod, mlp_mod = _get(layer, family.attn, family), _get(layer, family.mlp, family)
        names = (family.q, family.k, family.v, family.qkv)
        q, k, v, qkv = (_get(attn_mod, n, family) if n else None for n in names)
        mla = _mla(attn_mod, config) if family.mla else None
        attn = Attention(f"{path}.{family.attn}", q, k, v, qkv, _get(attn_mod, family.o, family), heads, kv,
                         mla.nope + mla.rope if mla else head_dim, mla)
        mlp = moe = None
        if hasattr(mlp_mod, "experts"):
            router = _get(mlp_mod, "gate", family)
            shared = _mlp(mlp_mod, family.shared, f"{path}.{family.mlp}", family) if family.shared else None
            gate = _get(mlp_mod, family.shared_gate, family) if family.shared_gate and shared else None
            moe = MoE(f"{path}.{family.mlp}", router, mlp_mod.experts, router.weight.shape[0], router.top_k,
                      shared, gate)
        else:
            mlp = _mlp(layer, family.mlp, path, family)
        layers.append(Layer(i, path, layer, attn, mlp, moe))
    return Structure(family, tuple(layers), config.model_type)


def _mlp(parent: nn.Module, name: str, parent_path: str, family: Family) -> MLP | None:
    module = getattr(parent, name, None)
    if module is None:  # e.g. a Qwen2-MoE with shared_expert_intermediate_size 0
        return None
    return MLP(f"{parent_path}.{name}", _get(module, family.gate, family) if family.gate else None,
               _get(module, family.up, family), _get(module, family.down, family))


def _mla(attn: nn.Module, config) -> MLA:
    q_a = getattr(attn, "q_a_proj", None)
    return MLA(q_a, getattr(attn, "q_a_layernorm", None), attn.q_b_proj if q_a is not None else attn.q_proj,
               attn.kv_a_proj_with_mqa, attn.kv_a_layernorm, attn.kv_b_proj,
               config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)


def _get(root: nn.Module, path: str, family: Family):
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise DscInputError("teacher", f"expected a module {path!r} ({family.name} layout) in "
                            f"{type(root).__name__}; supported: {supported()}") from None


def name_of(parent: nn.Module, module: nn.Module) -> str:
    """The name of `module` inside `parent` (as named_modules gives it)."""
    return next(n for n, m in parent.named_modules() if m is module)
