"""A pruning plan is data: what each layer keeps, the config it implies, parameter counts.
`make_plan` chooses from importance scores; `apply_plan` cuts the tensors and rewrites the config."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dsc.errors import FieldError
from dsc.evaluation import param_counts
from dsc.structure import Structure
from dsc.prune.importance import Scores


@dataclass
class Plan:
    drop_layers: list[int]
    keep_heads: dict[int, list[int]]  # original layer index -> kept query heads (original numbering)
    keep_kv: dict[int, list[int]]  # -> kept KV heads
    keep_channels: dict[int, list[int]]  # -> kept MLP channels
    keep_experts: dict[int, list[int]]  # -> kept routed experts
    config: dict  # config fields after the cut
    params_before: int = 0
    params_after: int = 0
    params_non_embedding_before: int = 0
    params_non_embedding_after: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The plan without per-layer index lists: what a report shows."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("keep_")}
        out["removed_fraction_non_embedding"] = 1 - self.params_non_embedding_after / self.params_non_embedding_before
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _select_layers(structure: Structure, cfg) -> list[int]:
    """Layers depth pruning may remove: `targets` (default all) minus `ignore`; each pattern must match."""
    paths = [layer.path for layer in structure.layers]

    def matches(field: str, pattern: str) -> set[int]:
        hits = {i for i, p in enumerate(paths) if re.search(pattern, p)}
        if not hits:
            raise FieldError(field, f"pattern {pattern!r} matches no layer (layers are {paths[0]} … {paths[-1]})")
        return hits

    chosen = set().union(*(matches("targets", p) for p in cfg.targets)) if cfg.targets else set(range(len(paths)))
    for pattern in cfg.ignore:
        chosen -= matches("ignore", pattern)
    return sorted(chosen)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (ties broken by index)."""
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def make_plan(model: nn.Module, structure: Structure, scores: Scores, cfg) -> Plan:
    plan = Plan(_drop(structure, scores, cfg), {}, {}, {}, {}, {})
    kept = [layer for layer in structure.layers if layer.index not in plan.drop_layers]
    plan.config = {"num_hidden_layers": len(kept)}
    if cfg.heads:
        _plan_heads(structure, scores, cfg, kept, plan)
    if cfg.channels:
        _plan_channels(structure, scores, cfg, kept, plan)
    if cfg.experts:
        _plan_experts(structure, scores, cfg, kept, plan)
    if plan.drop_layers and getattr(model.config, "layer_types", None):
        plan.config["layer_types"] = [t for i, t in enumerate(model.config.layer_types) if i not in plan.drop_layers]
    if plan.drop_layers and structure.family.name == "qwen-moe":
        # which layers are dense is given by index: restate it for the renumbered layers
        plan.config["mlp_only_layers"] = [new for new, layer in enumerate(kept) if layer.mlp is not None]
        plan.config["decoder_sparse_step"] = 1
    before = param_counts(model)
    removed = _removed_params(structure, plan)
    plan.params_before, plan.params_non_embedding_before = before["params"], before["params_non_embedding"]
    plan.params_after = before["params"] - removed
    plan.params_non_embedding_after = before["params_non_embedding"] - removed
    return plan


def _drop(structure: Structure, scores: Scores, cfg) -> list[int]:
    if not cfg.layers:
        return []
    candidates = _select_layers(structure, cfg)
    n_drop = min(int(len(structure.layers) * cfg.layers + 0.5), len(candidates), len(structure.layers) - 1)
    return sorted(sorted(candidates, key=lambda i: (scores.layers[i].item(), i))[:n_drop])


def _plan_heads(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    family = structure.family
    if not family.fixed_head_dim or family.qkv:
        raise FieldError("heads", f"{family.name} derives its head size from hidden_size / num_attention_heads: "
                         "removing heads would change the hidden size. Prune channels or layers instead")
    heads, kv_heads = structure.num_heads, structure.num_kv_heads
    gs = heads // kv_heads
    mode = "groups" if gs == 1 else cfg.head_mode  # one head per KV head: cutting heads is cutting groups
    if mode == "groups":
        new_kv = max(1, round(kv_heads * (1 - cfg.heads)))
        new_heads = new_kv * gs
    else:
        new_kv, new_heads = kv_heads, max(1, round(gs * (1 - cfg.heads))) * kv_heads
    if new_heads == heads:
        plan.notes.append(f"heads: {cfg.heads} of {heads} heads ({mode}) rounds to no cut")
        return
    for layer in kept:
        plan.keep_kv[layer.index], plan.keep_heads[layer.index] = _keep_heads(
            scores, layer.index, mode, kv_heads, gs, new_heads, new_kv)
    plan.config.update(num_attention_heads=new_heads, num_key_value_heads=new_kv,
                       head_dim=structure.layers[0].attn.head_dim)


def _plan_channels(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    dense = [layer for layer in kept if layer.mlp is not None]
    if not structure.dense():
        raise FieldError("channels", "this model has no dense MLP layers (expert width pruning is not supported "
                         "yet): prune experts, heads or layers")
    width = structure.dense()[0].mlp.width
    if cfg.channel_multiple > width:
        raise FieldError("channel_multiple", f"{cfg.channel_multiple} exceeds the MLP width ({width})")
    new_width = max(cfg.channel_multiple, int(width * (1 - cfg.channels)) // cfg.channel_multiple * cfg.channel_multiple)
    if new_width == width:
        plan.notes.append(f"channels: {cfg.channels} of {width} rounds to no cut")
        return
    for layer in dense:
        plan.keep_channels[layer.index] = _top(scores.channels[layer.index], new_width)
    plan.config["intermediate_size"] = new_width


def _plan_experts(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    sparse = structure.sparse()
    if not sparse:
        raise FieldError("experts", "this model has no mixture-of-experts layers")
    n, top_k = sparse[0].moe.num_experts, sparse[0].moe.top_k
    new_n = round(n * (1 - cfg.experts))
    if new_n < top_k and cfg.ratio:  # a global ratio only asks for as many as routing allows
        new_n = top_k
    if new_n < top_k:
        raise FieldError("experts", f"{cfg.experts} of {n} experts leaves {new_n}, fewer than the "
                         f"{top_k} each token is routed to (num_experts_per_tok): lower it")
    for layer in kept:
        if layer.moe is not None:
            plan.keep_experts[layer.index] = _top(scores.experts[layer.index], new_n)
    plan.config[structure.family.experts_key] = new_n


def _keep_heads(scores: Scores, i: int, mode: str, kv_heads: int, gs: int, new_heads: int, new_kv: int):
    if mode == "groups":
        groups = _top(scores.kv[i], new_kv)
        return groups, [g * gs + j for g in groups for j in range(gs)]
    per_group = new_heads // kv_heads  # the same count from every group keeps the GQA layout
    heads = scores.heads[i].view(kv_heads, gs)
    return list(range(kv_heads)), [g * gs + j for g in range(kv_heads) for j in _top(heads[g], per_group)]


def _removed_params(structure: Structure, plan: Plan) -> int:
    removed = 0
    for layer in structure.layers:
        if layer.index in plan.drop_layers:
            removed += sum(p.numel() for p in layer.module.parameters())
            continue
        a, m = layer.attn, layer.mlp
        if layer.index in plan.keep_experts:
            e = layer.moe
            gone = e.num_experts - len(plan.keep_experts[layer.index])
            per_expert = (e.experts.gate_up_proj.numel() + e.experts.down_proj.numel()) // e.num_experts
            removed += gone * (per_expert + e.router.weight.shape[1] + (getattr(e.router, "bias", None) is not None))
        if layer.index in plan.keep_heads:
            hd = a.head_dim
            dq = (a.num_heads - len(plan.keep_heads[layer.index])) * hd
            dkv = (a.num_kv_heads - len(plan.keep_kv[layer.index])) * hd
            removed += dq * (a.q.in_features + (a.q.bias is not None)) + dq * a.o.out_features
            removed += 2 * dkv * (a.k.in_features + (a.k.bias is not None))
        if layer.index in plan.keep_channels:
            dc = m.width - len(plan.keep_channels[layer.index])
            rows = [m.up] + ([m.gate] if m.gate is not None else [])
            removed += sum(dc * (lin.in_features + (lin.bias is not None)) for lin in rows) + dc * m.down.out_features
    return removed


def _slice(lin: nn.Linear, index: list[int], dim: int) -> None:
    """Keep `index` along the weight's `dim` (0: outputs, 1: inputs), in place."""
    idx = torch.as_tensor(index, device=lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, idx).clone(), requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[idx].clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = len(index)
    else:
        lin.in_features = len(index)


def _rows(units: list[int], size: int) -> list[int]:
    return [u * size + j for u in units for j in range(size)]


def apply_plan(model: nn.Module, structure: Structure, plan: Plan) -> nn.Module:
    """Cut the tensors, drop layers, and make the config true (it reloads with from_pretrained)."""
    for layer in structure.layers:
        a, m, i = layer.attn, layer.mlp, layer.index
        if i in plan.keep_heads:  # separate q/k/v only (_plan_heads refuses fused layouts)
            hd = a.head_dim
            _slice(a.q, _rows(plan.keep_heads[i], hd), 0)
            _slice(a.k, _rows(plan.keep_kv[i], hd), 0)
            _slice(a.v, _rows(plan.keep_kv[i], hd), 0)
            _slice(a.o, _rows(plan.keep_heads[i], hd), 1)
            attn = layer.module.get_submodule(structure.family.attn)
            attn.num_key_value_groups = len(plan.keep_heads[i]) // len(plan.keep_kv[i])
        if i in plan.keep_channels:
            for lin in [m.up] + ([m.gate] if m.gate is not None else []):
                _slice(lin, plan.keep_channels[i], 0)
            _slice(m.down, plan.keep_channels[i], 1)
        if i in plan.keep_experts:
            _cut_experts(layer.moe, plan.keep_experts[i])
    if plan.keep_experts and hasattr(model, "num_experts"):  # the causal-LM head's aux-loss bookkeeping
        model.num_experts = plan.config[structure.family.experts_key]
    if plan.drop_layers:
        _drop_layers(model, structure, plan.drop_layers)
    for key, value in plan.config.items():
        setattr(model.config, key, value)
    return model


def _cut_experts(moe, keep: list[int]) -> None:
    """Keep routed experts `keep`: both fused expert tensors, the router rows (and bias)."""
    idx = torch.as_tensor(keep, device=moe.router.weight.device)
    for owner, name in ((moe.experts, "gate_up_proj"), (moe.experts, "down_proj"), (moe.router, "weight"),
                        (moe.router, "bias")):
        param = getattr(owner, name, None)
        if isinstance(param, torch.Tensor):
            setattr(owner, name, nn.Parameter(param.data.index_select(0, idx).clone(), requires_grad=param.requires_grad))
    for owner in (moe.experts, moe.router):
        if hasattr(owner, "num_experts"):
            owner.num_experts = len(keep)


def _drop_layers(model: nn.Module, structure: Structure, drop: list[int]) -> None:
    parent_path, _, name = structure.family.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    kept = [layer for layer in structure.layers if layer.index not in drop]
    setattr(parent, name, nn.ModuleList(layer.module for layer in kept))
    for new, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
        attn = layer.module.get_submodule(structure.family.attn)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new
        if hasattr(layer.module, "layer_idx"):
            layer.module.layer_idx = new
    # config fields that index layers (layer_types, mlp_only_layers) are in plan.config, set by apply_plan
