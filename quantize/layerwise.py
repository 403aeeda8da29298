"""Quantize one decoder layer at a time: observe its inputs, fold scales, put weights on the grid.

Where a scale may be folded comes from the layer's structure (dsc.structure), checked against
what the calibration pass saw, never from a per-model table:
- the norm whose output q/k/v (or the fused qkv) read → those linears;
- the norm whose output a dense MLP's gate/up read → gate/up;
- v → o when v's outputs are o's inputs one to one (no grouped-query sharing);
- up → down in a gated MLP (down reads act(gate) ⊙ up, linear in up's outputs).
A norm is used only when exactly the expected linears read its output (a MoE block's router and
fused experts also read it, so MoE layers are quantized without the MLP-side scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsc.quantize.calibrate import InputStats, hidden, observe
from dsc.quantize.grid import Grid, Quantized, to_grid  # noqa: F401  (Quantized: progress files name it here)
from dsc.quantize.search import awq_scale, clip_ratios, gram_loss, smooth_scale
from dsc.structure import Layer


@dataclass
class Plan:
    """How a layer is quantized: `awq` or `smooth` scaling (or none), clipping, the grid."""

    grid: Grid
    scaling: str | None = None  # "awq" | "smooth" | None
    alpha: float = 0.5  # SmoothQuant migration strength
    n_grid: int = 20
    duo: bool = True
    clip: bool = False
    module_loss: bool = False  # score norm-fed groups on their module's output (else: their own outputs)
    loss_batches: int = 1  # calibration batches that module loss replays


@dataclass
class _Group:
    owner: nn.Module  # the decoder layer
    stats: InputStats
    prev: nn.Module | None  # where 1/s is folded: a norm (weight, bias) or a linear (rows)
    linears: list[str]


def _names(layer: Layer) -> dict[int, str]:
    return {id(m): n for n, m in layer.module.named_modules()}


def _expected(layer: Layer, names: dict[int, str]) -> list[set[str]]:
    """Sets of linears a norm may feed, from the structure."""
    attn = layer.attn
    sets = [{names[id(m)] for m in (attn.q, attn.k, attn.v) if m is not None} if attn.qkv is None
            else {names[id(attn.qkv)]}]
    if layer.mlp is not None:
        sets.append({names[id(m)] for m in (layer.mlp.gate, layer.mlp.up) if m is not None})
    return sets


def _groups(layer: Layer, stats: list[InputStats]) -> list[_Group]:
    names = _names(layer)
    expected = _expected(layer, names)
    attn, mlp = layer.attn, layer.mlp
    row_prev = {}
    if attn.v is not None and attn.v.out_features == attn.o.in_features and attn.num_heads == attn.num_kv_heads:
        row_prev[names[id(attn.o)]] = attn.v
    if mlp is not None and mlp.gate is not None:
        row_prev[names[id(mlp.down)]] = mlp.up
    groups = []
    for st in stats:
        prev = None
        if st.producer is not None and set(st.linears) in expected:
            prev = layer.module.get_submodule(st.producer)
        elif st.producer is None and len(st.linears) == 1:
            prev = row_prev.get(st.linears[0])
        groups.append(_Group(layer.module, st, prev, st.linears))
    return groups


@torch.no_grad()
def _fold(group: _Group, linears: dict[str, nn.Linear], s: torch.Tensor) -> None:
    """x → x / s before the group (in `prev`), W → W · s in every linear that reads x: the float
    output is unchanged."""
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = linears[name]
        lin.weight.mul_(s.to(lin.weight.dtype))
    st = group.stats
    if st.gram is not None:
        st.gram.div_(s[:, None] * s[None, :])
    st.abs_sum.div_(s)
    st.abs_max.div_(s)


def _module_loss(module: nn.Module, calls, weights: list[nn.Parameter], grid: Grid):
    """Loss of a scale s: the error of the module's output (attention block, MLP) when `weights`
    are quantized with s, replayed on the calls kept from calibration (AutoAWQ's objective)."""
    originals = [w.detach().clone() for w in weights]
    refs = [hidden(module(*a, **k)) for a, k in calls]
    count = sum(r.numel() for r in refs)

    def loss(s: torch.Tensor) -> float:
        try:
            for w, w0 in zip(weights, originals):
                w.copy_((grid.rtn(w0.float() * s) / s).to(w.dtype))
            errors = (float((hidden(module(*a, **k)) - r).float().pow(2).sum()) for (a, k), r in zip(calls, refs))
            return sum(errors) / count
        finally:
            for w, w0 in zip(weights, originals):
                w.copy_(w0)
    return loss



def _scale(group: _Group, linears: dict[str, nn.Linear], targets: set[str], plan: Plan, calls: dict) -> dict | None:
    quantized = [linears[n].weight for n in group.linears if n in targets]
    if plan.scaling is None or group.prev is None or not quantized:
        return None
    if plan.scaling == "smooth" and isinstance(group.prev, nn.Linear):
        return None  # SmoothQuant smooths the inputs that norms produce
    w = torch.cat([q.float() for q in quantized])
    if plan.scaling == "awq":
        parent = {n.rpartition(".")[0] for n in group.linears}
        name = parent.pop() if len(parent) == 1 else None
        if plan.module_loss and not isinstance(group.prev, nn.Linear) and calls.get(name):
            loss = _module_loss(group.owner.get_submodule(name), calls[name], quantized, plan.grid)
        else:  # a single linear (o, down): its own output error is exact, and cheap from G
            loss = gram_loss(w, group.stats.gram_mean, plan.grid)
        s, info = awq_scale(w, group.stats.abs_mean, plan.grid, loss, plan.n_grid, plan.duo)
    else:
        s, info = smooth_scale(torch.cat([linears[n].weight for n in group.linears]), group.stats.abs_max,
                               plan.alpha), {}
    _fold(group, linears, s)
    return info


def _score_linears(layer: Layer) -> set[nn.Module]:
    """q and k: their errors go through the attention softmax, so AWQ does not clip them."""
    return {m for m in (layer.attn.q, layer.attn.k, layer.attn.qkv) if m is not None}


@torch.no_grad()
def quantize_layer(layer: Layer, inputs, targets: set[str], plan: Plan) -> tuple[dict[str, Quantized], list, list]:
    """Quantize the target linears (names inside the layer) of one decoder layer in place.
    Returns what each became, the scale searches, and the float layer's outputs."""
    linears = {n: m for n, m in layer.module.named_modules() if isinstance(m, nn.Linear)}
    seen = observe(layer.module, inputs, linears, plan.loss_batches if plan.module_loss else 0,
                   gram=plan.scaling == "awq" or plan.clip)
    groups, outputs = _groups(layer, seen.stats), seen.outputs
    searches = []
    for group in groups:
        info = _scale(group, linears, targets, plan, seen.calls)
        if info is not None:
            searches.append({"linears": group.linears, **info})
    no_clip = _score_linears(layer)
    done = {}
    for group in groups:
        for name in group.linears:
            if name not in targets:
                continue
            w = linears[name].weight
            ratio = 1.0
            if plan.clip and linears[name] not in no_clip:
                ratio = clip_ratios(w, group.stats.gram_mean, plan.grid, plan.n_grid)
            done[name] = to_grid(w, plan.grid, ratio)
    return done, searches, outputs
