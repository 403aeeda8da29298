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
    n_layers = len(structure.layers)
    candidates = _select_layers(structure, cfg) if cfg.layers else []
    n_drop = min(round(n_layers * cfg.layers), len(candidates), n_layers - 1)
    drop = sorted(sorted(candidates, key=lambda i: (scores.layers[i].item(), i))[:n_drop]) if n_drop else []
    kept = [layer for layer in structure.layers if layer.index not in drop]
    heads, kv_heads, gs = structure.num_heads, structure.num_kv_heads, structure.num_heads // structure.num_kv_heads
    plan = Plan(drop, {}, {}, {}, {})
    new_heads, new_kv = heads, kv_heads
    if cfg.heads:
        if cfg.head_mode == "groups":
            new_kv = max(1, round(kv_heads * (1 - cfg.heads)))
            new_heads = new_kv * gs
        else:
            new_heads = max(1, round(gs * (1 - cfg.heads))) * kv_heads
        if new_heads == heads:
            plan.notes.append(f"heads: {cfg.heads} of {heads} heads ({cfg.head_mode}) rounds to no cut")
    width = structure.layers[0].mlp.width
    new_width = width
    if cfg.channels:
        new_width = max(cfg.channel_multiple, int(width * (1 - cfg.channels)) // cfg.channel_multiple * cfg.channel_multiple)
    for layer in kept:
        i = layer.index
        if new_heads != heads:
            plan.keep_kv[i], plan.keep_heads[i] = _keep_heads(scores, i, cfg.head_mode, kv_heads, gs, new_heads, new_kv)
        if new_width != width:
            plan.keep_channels[i] = _top(scores.channels[i], new_width)
    plan.config = {"num_hidden_layers": len(kept), "num_attention_heads": new_heads, "num_key_value_heads": new_kv,
                   "intermediate_size": new_width, "head_dim": structure.layers[0].attn.head_dim}
    before = param_counts(model)
    removed = _removed_params(structure, plan)
    plan.params_before, plan.params_non_embedding_before = before["params"], before["params_non_embedding"]
    plan.params_after = before["params"] - removed
    plan.params_non_embedding_after = before["params_non_embedding"] - removed
    return plan


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
        if i in plan.keep_heads:
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
    if plan.drop_layers:
        _drop_layers(model, structure, plan.drop_layers)
    for key, value in plan.config.items():
        setattr(model.config, key, value)
    return model


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
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
