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
    q: str
    k: str
    v: str
    o: str
    mlp: str
    gate: str | None  # gated MLPs (SwiGLU) have one; plain MLPs do not
    up: str
    down: str


LLAMA_LIKE = Family("llama-like", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", "self_attn",
                    "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "gate_proj", "up_proj", "down_proj")
FAMILIES = (LLAMA_LIKE,)


@dataclass(frozen=True)
class Attention:
    path: str  # "model.layers.3.self_attn"
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:  # query heads per KV head
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLP:
    path: str
    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.up.out_features


@dataclass(frozen=True)
class Layer:
    index: int
    path: str  # "model.layers.3"
    module: nn.Module
    attn: Attention
    mlp: MLP


@dataclass(frozen=True)
class Structure:
    family: Family
    layers: tuple[Layer, ...]

    @property
    def num_heads(self) -> int:
        return self.layers[0].attn.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].attn.num_kv_heads


def supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def describe(model: nn.Module) -> Structure:
    """The structure of a loaded causal LM, or an error naming the supported families."""
    config = model.config
    family = next((f for f in FAMILIES if config.model_type in f.model_types), None)
    if family is None:
        raise DscInputError("teacher", f"model_type {config.model_type!r} is not supported by this stage yet; "
                            f"supported: {supported()}")
    layers = _get(model, family.layers, family)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = []
    for i, layer in enumerate(layers):
        path = f"{family.layers}.{i}"
        attn, mlp = _get(layer, family.attn, family), _get(layer, family.mlp, family)
        if hasattr(mlp, "experts"):
            raise DscInputError("teacher", f"{path}.{family.mlp} is a mixture of experts: expert pruning is not "
                                "supported yet (dense families only)")
        out.append(Layer(i, path, layer,
                         Attention(f"{path}.{family.attn}", *(_get(attn, n, family) for n in
                                                               (family.q, family.k, family.v, family.o)),
                                   heads, kv, head_dim),
                         MLP(f"{path}.{family.mlp}", _get(mlp, family.gate, family) if family.gate else None,
                             _get(mlp, family.up, family), _get(mlp, family.down, family))))
    return Structure(family, tuple(out))


def _get(root: nn.Module, path: str, family: Family):
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise DscInputError("teacher", f"expected a module {path!r} ({family.name} layout) in "
                            f"{type(root).__name__}; supported: {supported()}") from None
