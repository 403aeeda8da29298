"""Applying a plan: cut the tensors layer by layer, drop layers, make the config true.

    apply_plan(model, structure, plan)     # every layer at once
    cut_attention(layer, ...); cut_mlp(layer, plan); ...; finish(model, structure, plan)
                                           # one layer at a time (dsc.prune.reconstruct refits between)
"""
from __future__ import annotations

import torch
from torch import nn

from dsc.structure import BIAS_FLAGS, Structure
from dsc.prune import experts as moe_experts
from dsc.prune.plan import Plan


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


def unit_rows(units: list[int], size: int) -> list[int]:
    return [u * size + j for u in units for j in range(size)]


def apply_plan(model: nn.Module, structure: Structure, plan: Plan) -> nn.Module:
    """Cut the tensors, drop layers, and make the config true (it reloads with from_pretrained)."""
    for layer in structure.layers:
        cut_attention(layer, structure, plan)
        cut_mlp(layer, plan)
    return finish(model, structure, plan)


def cut_attention(layer, structure: Structure, plan: Plan, heads: bool = True, latent: bool = True) -> None:
    """One layer's attention cut: its MLA latent channels, its heads (and KV heads)."""
    if latent and layer.index in plan.keep_latent:
        _cut_latent(layer, structure, plan)
    if heads and layer.index in plan.keep_heads:
        _cut_heads(layer, structure, plan)


def cut_mlp(layer, plan: Plan) -> None:
    """One layer's MLP / MoE cut: channels of the dense MLP or shared expert(s), routed experts
    (dropped or merged), routed experts' channels, the routing groups."""
    i = layer.index
    if i in plan.keep_channels:
        m = layer.mlp or layer.moe.shared
        for lin in [m.up] + ([m.gate] if m.gate is not None else []):
            _slice(lin, plan.keep_channels[i], 0)
        _slice(m.down, plan.keep_channels[i], 1)
    if i in plan.keep_experts:
        weight = torch.tensor(plan.merge_weights[i]) if i in plan.merge_weights else None
        moe_experts.cut(layer.moe, plan.keep_experts[i], plan.merge_experts.get(i), weight)
    if i in plan.keep_expert_channels:
        moe_experts.cut_channels(layer.moe, plan.keep_expert_channels[i])
    if layer.moe is not None and "n_group" in plan.config:
        layer.moe.router.num_group, layer.moe.router.topk_group = plan.config["n_group"], plan.config["topk_group"]


def finish(model: nn.Module, structure: Structure, plan: Plan) -> nn.Module:
    """After every layer's cut: drop layers and make the config true."""
    if plan.keep_experts and hasattr(model, "num_experts"):  # the causal-LM head's aux-loss bookkeeping
        model.num_experts = plan.config[structure.family.experts_key]
    if plan.drop_layers:
        _drop_layers(model, structure, plan.drop_layers)
    for key, value in plan.config.items():
        setattr(model.config, key, value)
    return model


def add_zero_biases(layer, structure: Structure, plan: Plan) -> None:
    """Zero biases on every linear of `layer` a bias flag the plan turns on gives one (the refit
    gave its projection a real one): what a model built from the new config holds, so it reloads."""
    for flag, (where, attrs) in BIAS_FLAGS.get(structure.model_type, {}).items():
        parent = getattr(layer, where)
        if not plan.config.get(flag) or parent is None:
            continue
        for attr in attrs:
            lin = getattr(parent, attr)
            if lin is not None and lin.bias is None:
                lin.bias = nn.Parameter(lin.weight.new_zeros(lin.out_features), requires_grad=lin.weight.requires_grad)


def _cut_latent(layer, structure: Structure, plan: Plan) -> None:
    """Keep latent channels: kv_a's rows (its trailing RoPE rows stay), kv_a_layernorm, kv_b's
    columns; q_a's rows, q_a_layernorm, q_b's columns. The norms' weights take the RMS factor."""
    mla, keep, scale = layer.attn.mla, plan.keep_latent[layer.index], plan.latent_scale[layer.index]
    attn = layer.module.get_submodule(structure.family.attn)
    rank = mla.kv_b.in_features
    for key, a, norm, b, rows in (("kv", mla.kv_a, mla.kv_a_norm, mla.kv_b, keep["kv"] + list(
            range(rank, mla.kv_a.out_features))), ("q", mla.q_a, mla.q_a_norm, mla.q_b, keep.get("q"))):
        if key not in keep:
            continue
        _slice(a, rows, 0)
        _slice(b, keep[key], 1)
        w = norm.weight
        norm.weight = nn.Parameter(w.data[keep[key]].clone() * scale[key], requires_grad=w.requires_grad)
    attn.kv_lora_rank = len(keep["kv"])
    if "q" in keep:
        attn.q_lora_rank = len(keep["q"])


def _cut_heads(layer, structure: Structure, plan: Plan) -> None:
    a, i = layer.attn, layer.index
    attn = layer.module.get_submodule(structure.family.attn)
    if a.mla is not None:  # per head: q_b rows (nope + rope), kv_b rows (nope + v), o columns (v)
        mla, keep = a.mla, plan.keep_heads[i]
        _slice(mla.q_b, unit_rows(keep, mla.nope + mla.rope), 0)
        _slice(mla.kv_b, unit_rows(keep, mla.nope + mla.v_dim), 0)
        _slice(a.o, unit_rows(keep, mla.v_dim), 1)
        attn.num_heads = len(keep)
        return
    hd = a.head_dim  # separate q/k/v only (_plan_heads refuses fused layouts)
    _slice(a.q, unit_rows(plan.keep_heads[i], hd), 0)
    _slice(a.k, unit_rows(plan.keep_kv[i], hd), 0)
    _slice(a.v, unit_rows(plan.keep_kv[i], hd), 0)
    _slice(a.o, unit_rows(plan.keep_heads[i], hd), 1)
    attn.num_key_value_groups = len(plan.keep_heads[i]) // len(plan.keep_kv[i])


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
