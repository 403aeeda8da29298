"""Quantize one decoder layer at a time: observe its inputs, fold scales, put weights on the grid.

Where a scale may be folded comes from the layer's structure (dsc.structure), checked against
what the calibration pass saw, never from a per-model table:
- the norm whose output q/k/v (or the fused qkv) read → those linears; MLA (DeepSeek): the
  attention norm → q_a and kv_a (q and kv_a without a query low rank), q_a_layernorm → q_b,
  kv_a_layernorm → kv_b (it normalizes the first kv_lora_rank outputs of kv_a, kv_b's inputs;
  the RoPE key part bypasses it);
- the norm whose output a dense MLP's gate/up read → gate/up;
- the norm whose output a MoE block reads → one scale for everything that reads it: the shared
  experts' gate/up (and Qwen2-MoE's shared-expert gate), every routed expert's gate_up, and the
  router's columns (the router stays float: its logits, hence the routing, are unchanged);
- v → o when v's outputs are o's inputs one to one (no grouped-query sharing); MLA: kv_b's value
  rows → o (each head has its own value, and attention is linear in it);
- up → down in a gated MLP (down reads act(gate) ⊙ up, linear in up's outputs), shared experts
  included, and per routed expert (dsc.quantize.experts).
A norm is used only when exactly the expected modules read its output.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dsc.quantize.calibrate import InputStats, Observed, hidden, observe
from dsc.quantize.experts import ExpertStats, QuantizedExperts, quantize_experts, routed_loss, scale_down, scale_inputs
from dsc.quantize.grid import Grid, Quantized  # noqa: F401  (Quantized: progress files name it)
from dsc.quantize.rounding import Rounding
from dsc.quantize.search import awq_scale, gram_loss, smooth_scale
from dsc.structure import Layer


@dataclass
class Plan:
    """How a layer is quantized: `awq` or `smooth` scaling (or none), then a rounding (round to
    nearest, AWQ's clipping search, GPTQ) onto the grid."""

    grid: Grid
    scaling: str | None = None  # "awq" | "smooth" | None
    alpha: float = 0.5  # SmoothQuant migration strength
    n_grid: int = 20
    duo: bool = True
    rounding: Rounding = Rounding()  # how weights go on the grid once scales are folded (dsc.quantize.rounding)
    module_loss: bool = False  # score norm-fed groups on their module's output (else: their own outputs)
    loss_batches: int = 1  # calibration batches that module loss replays
    round: bool = True  # False: scales and clipping searched and folded, weights left in float (a QAT start)
    grids: dict = field(default_factory=dict)  # full linear name → another grid (a scheme group)
    static_grids: tuple = ()  # grids whose linears record a static input scale (FP8 static, NVFP4 activations)

    def grid_of(self, name: str):
        return self.grids.get(name, self.grid)


@dataclass
class _Group:
    owner: nn.Module  # the decoder layer
    stats: InputStats
    prev: nn.Module | None  # where 1/s is folded: a norm (weight, bias) or a linear (rows)
    linears: list[str]
    rows: torch.Tensor | None = None  # the rows of a linear `prev` that make these inputs (None: all)


@dataclass
class _MoEGroup:
    """A MoE block's input, produced by `norm`: read by the router, the `members` (shared
    experts' linears) and the routed experts."""

    norm: str
    block: str  # the MoE block's name inside the layer
    stats: InputStats  # the block's input over every token
    members: list[InputStats]
    experts: str  # the fused experts' name inside the layer


def _names(layer: Layer) -> dict[int, str]:
    return {id(m): n for n, m in layer.module.named_modules()}


def _expected(layer: Layer, names: dict[int, str]) -> list[set[str]]:
    """Sets of linears a norm may feed, from the structure."""
    attn, mla = layer.attn, layer.attn.mla
    if mla is not None:
        first = mla.q_a if mla.q_a is not None else mla.q_b
        sets = [{names[id(first)], names[id(mla.kv_a)]}, {names[id(mla.kv_b)]}]
        sets += [{names[id(mla.q_b)]}] if mla.q_a is not None else []
    elif attn.qkv is None:
        sets = [{names[id(m)] for m in (attn.q, attn.k, attn.v) if m is not None}]
    else:
        sets = [{names[id(attn.qkv)]}]
    if layer.mlp is not None:
        sets.append({names[id(m)] for m in (layer.mlp.gate, layer.mlp.up) if m is not None})
    return sets


def _row_prev(layer: Layer, names: dict[int, str]) -> dict[str, tuple[nn.Linear, torch.Tensor | None]]:
    """Single linears whose input scale folds into rows of the linear before them."""
    attn, found = layer.attn, {}
    if attn.v is not None and attn.v.out_features == attn.o.in_features and attn.num_heads == attn.num_kv_heads:
        found[names[id(attn.o)]] = (attn.v, None)
    if attn.mla is not None:  # o's input h·v_dim + d is kv_b's row h·(nope + v_dim) + nope + d
        mla = attn.mla
        heads = torch.arange(attn.num_heads)[:, None] * (mla.nope + mla.v_dim)
        found[names[id(attn.o)]] = (mla.kv_b, (heads + mla.nope + torch.arange(mla.v_dim)).flatten())
    for mlp in (layer.mlp, layer.moe.shared if layer.moe is not None else None):
        if mlp is not None and mlp.gate is not None:
            found[names[id(mlp.down)]] = (mlp.up, None)
    return found


def _groups(layer: Layer, stats: list[InputStats], moe_norm: str | None = None) -> list[_Group]:
    names = _names(layer)
    expected, row_prev = _expected(layer, names), _row_prev(layer, names)
    groups = []
    for st in stats:
        prev, rows = None, None
        if moe_norm is not None and st.producer == moe_norm:
            prev = None  # no group of its own: scaled with the whole MoE block (_scale_moe)
        elif st.producer is not None and set(st.linears) in expected:
            prev = layer.module.get_submodule(st.producer)
        elif st.producer is None and len(st.linears) == 1:
            prev, rows = row_prev.get(st.linears[0], (None, None))
        groups.append(_Group(layer.module, st, prev, st.linears, rows))
    return groups


def _moe_group(layer: Layer, seen: Observed) -> _MoEGroup | None:
    """The MoE block's scale group, when its input comes from a norm that nothing else reads and
    the linears reading it are the ones the structure expects (the shared experts')."""
    moe = layer.moe
    if moe is None:
        return None
    names = _names(layer)
    block = names[id(moe.experts)].rpartition(".")[0]
    inp = seen.watched.get(block)
    if inp is None or inp.producer is None or moe.router.weight.shape[-1] != inp.abs_sum.shape[0]:
        return None
    members = [st for st in seen.stats if st.producer == inp.producer]
    allowed = {names[id(m)] for m in moe.linears}
    if not all(set(st.linears) <= allowed for st in members):
        return None
    return _MoEGroup(inp.producer, block, inp, members, names[id(moe.experts)])


def _divide(st: InputStats, s: torch.Tensor) -> None:
    """The statistics of x / s."""
    if st.gram is not None:
        st.gram.div_(s[:, None] * s[None, :])
    st.abs_sum.div_(s)
    st.abs_max.div_(s)


def _divide_by(module: nn.Module, s: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Outputs of a norm (per channel) or a linear (per row; `rows` of them) divided by s."""
    for p in (module.weight, getattr(module, "bias", None)):
        if p is not None:
            index = slice(None) if rows is None else rows.to(p.device)
            d = s.to(p.dtype)
            p[index] = p[index] / (d[:, None] if p.dim() == 2 else d)


@torch.no_grad()
def _fold(group: _Group, linears: dict[str, nn.Linear], s: torch.Tensor) -> None:
    """x → x / s before the group (in `prev`), W → W · s in every linear that reads x: the float
    output is unchanged."""
    _divide_by(group.prev, s, group.rows)
    for name in group.linears:
        lin = linears[name]
        lin.weight.mul_(s.to(lin.weight.dtype))
    _divide(group.stats, s)


@torch.no_grad()
def _fold_moe(group: _MoEGroup, layer: Layer, linears: dict[str, nn.Linear], stats: ExpertStats | None,
              s: torch.Tensor) -> None:
    """x → x / s in the norm; × s in the router's columns (E, H), the shared linears' and every
    routed expert's gate_up columns: routing and outputs unchanged."""
    _divide_by(layer.module.get_submodule(group.norm), s)
    router = layer.moe.router.weight
    router.mul_(s.to(router.dtype))
    for st in group.members:
        for name in st.linears:
            linears[name].weight.mul_(s.to(linears[name].weight.dtype))
        _divide(st, s)
    scale_inputs(layer.moe.experts, stats, s)
    _divide(group.stats, s)


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, w.shape[-1])  # fused experts (E, out, in) → (E·out, in): groups stay within rows


def _module_loss(module: nn.Module, calls, weights: list[nn.Parameter], grid: Grid):
    """Loss of a scale s: the error of the module's output (attention block, MLP, MoE block) when
    `weights` are quantized with s, replayed on the calls kept from calibration (AutoAWQ's objective)."""
    originals = [w.detach().clone() for w in weights]
    refs = [hidden(module(*a, **k)) for a, k in calls]
    count = sum(r.numel() for r in refs)

    def loss(s: torch.Tensor) -> float:
        try:
            for w, w0 in zip(weights, originals):
                w.copy_((grid.rtn(_flat(w0).float() * s) / s).reshape(w0.shape).to(w.dtype))
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


def _moe_linear_loss(group: _MoEGroup, linears, targets: set[str], experts: nn.Module | None,
                     stats: ExpertStats | None, grid: Grid):
    """Loss of a MoE-norm scale from the Gram matrices: the shared linears' output error over every
    token plus each routed expert's over its own tokens, per token."""
    parts = [(gram_loss(torch.cat([linears[n].weight.float() for n in st.linears if n in targets]), st.gram_mean,
                        grid), st.count) for st in group.members if any(n in targets for n in st.linears)]
    routed = routed_loss(experts, stats, grid) if experts is not None else None
    return lambda s: (sum(f(s) * n for f, n in parts) + (routed(s) if routed else 0.0)) / max(group.stats.count, 1)


def _scale_moe(group: _MoEGroup, layer: Layer, linears, targets: set[str], plan: Plan, calls: dict,
               stats: ExpertStats | None) -> dict | None:
    """One scale for the MoE block's input (AWQ or SmoothQuant), folded by _fold_moe."""
    shared = [linears[n].weight for st in group.members for n in st.linears if n in targets]
    experts = layer.moe.experts
    routed = experts if group.experts in targets else None
    if plan.scaling is None or not (shared or routed is not None):
        return None
    if plan.scaling == "smooth":
        if not shared:
            return None  # only the shared experts quantize their activations; routed experts are weight-only
        every = [linears[n].weight for st in group.members for n in st.linears] + [experts.gate_up_proj]
        s, info = smooth_scale(torch.cat([_flat(w) for w in every]), group.stats.abs_max, plan.alpha), {}
    else:
        weights = shared + ([routed.gate_up_proj] if routed is not None else [])
        if plan.module_loss and calls.get(group.block):
            loss = _module_loss(layer.module.get_submodule(group.block), calls[group.block], weights, plan.grid)
        else:
            loss = _moe_linear_loss(group, linears, targets, routed, stats, plan.grid)
        w = torch.cat([_flat(w).float() for w in weights])
        s, info = awq_scale(w, group.stats.abs_mean, plan.grid, loss, plan.n_grid, plan.duo)
    _fold_moe(group, layer, linears, stats, s)
    return info


def _score_linears(layer: Layer) -> set[nn.Module]:
    """q and k: their errors go through the attention softmax, so AWQ does not clip them (MLA:
    every projection before o feeds the scores)."""
    mla = layer.attn.mla.linears if layer.attn.mla is not None else []
    return {m for m in (layer.attn.q, layer.attn.k, layer.attn.qkv, *mla) if m is not None}


def _observe(layer: Layer, inputs, linears, targets: set[str], plan: Plan) -> tuple[Observed, ExpertStats | None]:
    names = _names(layer)
    experts = names[id(layer.moe.experts)] if layer.moe is not None else None
    stats = None
    if experts in targets and (plan.scaling == "awq" or plan.rounding.needs_gram):
        stats = ExpertStats.empty(layer.moe.experts, plan.grid)
    watch = (experts.rpartition(".")[0],) if experts else ()
    seen = observe(layer.module, inputs, linears, plan.loss_batches if plan.module_loss else 0,
                   gram=plan.scaling == "awq" or plan.rounding.needs_gram, watch=watch,
                   experts=None if stats is None else {experts: stats})
    return seen, stats


def _scale_layer(layer: Layer, seen: Observed, groups: list[_Group], moe: _MoEGroup | None, stats, linears,
                 targets: set[str], plan: Plan) -> list[dict]:
    """Fold the scales in call order: attention first, then the MoE block's input, each routed
    expert's up→down, and the remaining groups (the shared experts' down)."""
    attn = {n for n, m in layer.module.named_modules() if any(m is lin for lin in layer.attn.linears)}
    searches = []

    def run(group_list):
        for group in group_list:
            info = _scale(group, linears, targets, plan, seen.calls)
            if info is not None:
                searches.append({"linears": group.linears, **info})

    run([g for g in groups if set(g.linears) <= attn])
    if moe is not None:
        info = _scale_moe(moe, layer, linears, targets, plan, seen.calls, stats)
        if info is not None:
            searches.append({"linears": [n for st in moe.members for n in st.linears] + [moe.experts], **info})
    if stats is not None:
        searches += scale_down(layer.moe.experts, stats, plan.grid, plan.n_grid, plan.duo)
    run([g for g in groups if not set(g.linears) <= attn])
    return searches


@torch.no_grad()
def quantize_layer(layer: Layer, inputs, targets: set[str], plan: Plan
                   ) -> tuple[dict[str, Quantized | QuantizedExperts], list, list]:
    """Quantize the targets (names inside the layer: linears, fused experts) of one decoder layer
    in place. Returns what each became, the scale searches, and the float layer's outputs."""
    linears = {n: m for n, m in layer.module.named_modules() if isinstance(m, nn.Linear)}
    seen, stats = _observe(layer, inputs, linears, targets, plan)
    moe = _moe_group(layer, seen)
    groups = _groups(layer, seen.stats, moe.norm if moe else None)
    searches = _scale_layer(layer, seen, groups, moe, stats, linears, targets, plan)
    no_clip = _score_linears(layer)
    done = {}
    for group in groups:
        names = [n for n in group.linears if n in targets]
        if not names:
            continue
        gram = group.stats.gram_mean if group.stats.gram is not None else None
        by_grid: dict = {}
        for n in names:
            by_grid.setdefault(plan.grid_of(f"{layer.path}.{n}"), []).append(n)
        for grid, part in by_grid.items():
            got, metrics = plan.rounding.linears([linears[n].weight for n in part], gram, grid,
                                                 [linears[n] not in no_clip for n in part], plan.round)
            if grid in plan.static_grids:
                scale = grid.input_scale(group.stats.abs_max.max())
                got = [replace(q, input_scale=scale) for q in got]
            done.update(zip(part, got))
            if metrics:
                searches.append({"linears": part, "rounding": plan.rounding.method, **metrics})
    experts = _names(layer)[id(layer.moe.experts)] if layer.moe is not None else None
    if experts in targets:
        done[experts] = quantize_experts(layer.moe.experts, plan.grid, stats, plan.rounding)
    return done, searches, seen.outputs
