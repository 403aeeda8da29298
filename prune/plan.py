"""A pruning plan is data: what each layer keeps, the config it implies, parameter counts.
`make_plan` chooses from importance scores; `dsc.prune.cut.apply_plan` cuts the tensors and rewrites the config."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dsc.errors import FieldError
from dsc.evaluation import param_counts
from dsc.structure import BIAS_FLAGS, Structure
from dsc.prune import experts as moe_experts
from dsc.prune.importance import Scores


@dataclass
class Plan:
    drop_layers: list[int]
    keep_heads: dict[int, list[int]]  # original layer index -> kept query heads (original numbering)
    keep_kv: dict[int, list[int]]  # -> kept KV heads
    keep_channels: dict[int, list[int]]  # -> kept channels of the dense MLP or the shared expert(s)
    keep_experts: dict[int, list[int]]  # -> kept routed experts
    config: dict  # config fields after the cut
    keep_expert_channels: dict[int, list[list[int]]] = field(default_factory=dict)  # -> per kept expert
    merge_experts: dict[int, dict[int, int]] = field(default_factory=dict)  # -> removed expert: kept it merges into
    merge_weights: dict[int, list[float]] = field(default_factory=dict)  # -> routing frequency of each expert
    keep_latent: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # -> {"q"/"kv": kept latent channels}
    latent_scale: dict[int, dict[str, float]] = field(default_factory=dict)  # -> latent norm weight factors
    # -> {refit projection ("o_proj", "down_proj", "q_b_proj", ...): relative output error on calibration
    #     data of the plain cut and of the refit}
    reconstructed: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    params_non_embedding_before: int = 0
    params_non_embedding_after: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The plan without per-layer index lists: what a report shows."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("keep_") and k != "reconstructed"}
        if self.reconstructed:  # mean relative output error of each refit projection, cut → refit
            kinds = {k for layer in self.reconstructed.values() for k in layer}
            out["reconstruction"] = {k: {e: round(sum(v[k][e] for v in self.reconstructed.values() if k in v)
                                                  / sum(k in v for v in self.reconstructed.values()), 6)
                                         for e in ("error_cut", "error_refit")} for k in sorted(kinds)}
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
    if cfg.latent:
        _plan_latent(structure, scores, cfg, kept, plan)
    if cfg.experts:  # before channels: expert channels are chosen for the kept experts
        _plan_experts(model, structure, scores, cfg, kept, plan)
    if cfg.channels:
        _plan_channels(structure, scores, cfg, kept, plan)
    if plan.drop_layers and getattr(model.config, "layer_types", None):
        plan.config["layer_types"] = [t for i, t in enumerate(model.config.layer_types) if i not in plan.drop_layers]
    if plan.drop_layers and structure.family.name == "deepseek":  # dense layers come first
        plan.config["first_k_dense_replace"] = sum(layer.mlp is not None for layer in kept)
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
    if family.head_norm:
        raise FieldError("heads", f"{family.name} normalizes q and k over all heads at once (q_norm/k_norm): "
                         "removing heads would change every other head. Prune experts, channels or layers instead")
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
    plan.config.update(num_attention_heads=new_heads, num_key_value_heads=new_kv)
    if not family.mla:  # MLA's config head_dim is the RoPE width, not a head's
        plan.config["head_dim"] = structure.layers[0].attn.head_dim


def _plan_latent(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    """The same number of latent channels in every layer; each layer keeps its most important ones.
    RMSNorm divides by the root mean square over its channels: with the weak ones gone that mean
    rises, so the kept norm weights are scaled by √(mean_kept / mean_all) of the calibration
    energy (1 without calibration data)."""
    first = structure.layers[0].attn.mla
    if first is None:
        raise FieldError("latent", f"{structure.family.name} has no multi-head latent attention (q_lora_rank, "
                         "kv_lora_rank): latent applies to DeepSeek-V2/V3")
    ranks = {"kv": first.kv_b.in_features}
    if first.q_a is not None:
        ranks["q"] = first.q_b.in_features
    new = {k: max(1, int(r * (1 - cfg.latent))) for k, r in ranks.items()}
    if new == ranks:
        plan.notes.append(f"latent: {cfg.latent} of ranks {ranks} rounds to no cut")
        return
    for layer in kept:
        s = scores.latent[layer.index]
        plan.keep_latent[layer.index] = {k: _top(s[k], new[k]) for k in ranks}
        plan.latent_scale[layer.index] = {k: _rms_factor(s.get(f"{k}_energy"), plan.keep_latent[layer.index][k])
                                          for k in ranks}
    plan.config["kv_lora_rank"] = new["kv"]
    if "q" in new:
        plan.config["q_lora_rank"] = new["q"]


def _rms_factor(energy: torch.Tensor | None, keep: list[int]) -> float:
    if energy is None or float(energy.sum()) == 0:
        return 1.0
    return float((energy[keep].mean() / energy.mean()).sqrt())


def _narrower(width: int, cfg, multiple: int | None = None) -> int:
    multiple = multiple or cfg.channel_multiple
    return max(multiple, int(width * (1 - cfg.channels)) // multiple * multiple)


# transformers runs fused experts on torch._grouped_mm, whose operands need 16-byte strides: expert
# widths stay multiples of 8 (fp32, bf16 and fp16 alike)
EXPERT_MULTIPLE = 8


def _plan_channels(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    """Dense MLPs, and in MoE layers every routed expert and the shared expert(s): the same fraction."""
    widths = [layer.mlp.width for layer in structure.dense()]
    widths += [layer.moe.width for layer in structure.sparse()]
    if cfg.channel_multiple > min(widths):
        raise FieldError("channel_multiple", f"{cfg.channel_multiple} exceeds the MLP width ({min(widths)}, the narrowest)")
    if structure.dense():
        width = structure.dense()[0].mlp.width
        new_width = _narrower(width, cfg)
        if new_width < width:
            for layer in (layer for layer in kept if layer.mlp is not None):
                plan.keep_channels[layer.index] = _top(scores.channels[layer.index], new_width)
            plan.config["intermediate_size"] = new_width
    if structure.sparse():
        _plan_expert_channels(structure, scores, cfg, kept, plan)
    if not (plan.keep_channels or plan.keep_expert_channels):
        plan.notes.append(f"channels: {cfg.channels} of {min(widths)}–{max(widths)} rounds to no cut")


def _plan_expert_channels(structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    family, first = structure.family, structure.sparse()[0].moe
    width, multiple = first.width, math.lcm(cfg.channel_multiple, EXPERT_MULTIPLE)
    new_width = _narrower(width, cfg, multiple)
    if new_width == width:
        return
    shared_width = first.shared.width if first.shared is not None else 0
    # DeepSeek derives the shared width from the routed one; Qwen2-MoE sets it apart
    new_shared = _narrower(shared_width, cfg) if family.shared_width_key else shared_width * new_width // width
    if multiple != cfg.channel_multiple:
        plan.notes.append(f"channels: expert width {width} → {new_width}, a multiple of {multiple} "
                          "(fused experts run on torch grouped_mm, which needs 16-byte strides)")
    for layer in (layer for layer in kept if layer.moe is not None):
        per_expert = scores.expert_channels[layer.index]
        experts = plan.keep_experts.get(layer.index, range(layer.moe.num_experts))
        plan.keep_expert_channels[layer.index] = [_top(per_expert[e], new_width) for e in experts]
        if layer.moe.shared is not None and new_shared < shared_width:
            plan.keep_channels[layer.index] = _top(scores.shared_channels[layer.index], new_shared)
    plan.config[family.expert_width_key] = new_width
    if family.shared_width_key and shared_width:
        plan.config[family.shared_width_key] = new_shared


@dataclass
class ExpertBudget:
    """How many routed experts every MoE layer keeps, and the routing groups after the cut."""
    keep: int
    groups: int  # routing groups the experts are chosen from (1: chosen over all)
    config: dict  # config fields the cut changes
    notes: list[str]

    def choose(self, scores: torch.Tensor) -> list[int]:
        return _top_per_group(scores, self.keep, self.groups)


def expert_budget(model, structure: Structure, cfg) -> ExpertBudget:
    sparse = structure.sparse()
    if not sparse:
        raise FieldError("experts", "this model has no mixture-of-experts layers")
    n, top_k = sparse[0].moe.num_experts, sparse[0].moe.top_k
    groups, topk_group, least = moe_experts.routing_groups(model.config)
    new_n = round(n * (1 - cfg.experts))
    if new_n < top_k and cfg.ratio:  # a global ratio only asks for as many as routing allows
        new_n = top_k
    if new_n < top_k:
        raise FieldError("experts", f"{cfg.experts} of {n} experts leaves {new_n}, fewer than the "
                         f"{top_k} each token is routed to (num_experts_per_tok): lower it")
    notes = []
    new_groups, new_topk_group = _groups_after(n, new_n, groups, topk_group, least, top_k, notes)
    new_n = new_n // groups * groups if new_groups == groups else new_n  # an equal cut from every group
    config = {structure.family.experts_key: new_n}
    if groups > 1 and (new_groups, new_topk_group) != (groups, topk_group):
        config.update(n_group=new_groups, topk_group=new_topk_group)
    return ExpertBudget(new_n, new_groups, config, notes)


def _plan_experts(model, structure: Structure, scores: Scores, cfg, kept, plan: Plan) -> None:
    budget = expert_budget(model, structure, cfg)
    for layer in kept:
        if layer.moe is None:
            continue
        keep = budget.choose(scores.experts[layer.index])
        plan.keep_experts[layer.index] = keep
        if cfg.expert_merge == "merge":
            plan.merge_experts[layer.index] = moe_experts.merge_targets(scores.stats[layer.index], keep)
            plan.merge_weights[layer.index] = scores.stats[layer.index].frequency.tolist()
    plan.config.update(budget.config)
    plan.notes.extend(budget.notes)


def _groups_after(n, new_n, groups, topk_group, least, top_k, notes: list[str]) -> tuple[int, int]:
    """Group-limited routing views the experts as n_group equal groups and (DeepSeek-V3) scores each
    group by its two best experts: every group keeps the same count, at least 2 (V3) or 1 (V2), and
    top_k must fit in topk_group groups. Where that cannot hold, the groups merge into one."""
    if groups == 1:
        return 1, 1
    per_group = new_n // groups
    if per_group >= least and top_k <= topk_group * per_group:
        if new_n % groups:
            notes.append(f"experts: {new_n} rounded down to {per_group * groups}, a multiple of n_group {groups}")
        return groups, topk_group
    notes.append(f"experts: {new_n} of {n} left cannot form {groups} routing groups (each needs ≥ {least} "
                 f"and top-{top_k} must fit in topk_group {topk_group}): n_group and topk_group set to 1")
    return 1, 1


def _top_per_group(scores: torch.Tensor, k: int, groups: int) -> list[int]:
    """The k best, the same number from each of `groups` equal consecutive groups."""
    size = len(scores) // groups
    return [g * size + i for g in range(groups) for i in _top(scores[g * size:(g + 1) * size], k // groups)]


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
        i = layer.index
        if i in plan.keep_heads:
            removed += _removed_heads(layer.attn, plan, i)
        if i in plan.keep_latent:
            mla = layer.attn.mla
            for key, a, b in (("kv", mla.kv_a, mla.kv_b), ("q", mla.q_a, mla.q_b)):
                if key in plan.keep_latent[i]:
                    gone = b.in_features - len(plan.keep_latent[i][key])
                    rows = b.out_features  # b's rows left after a head cut (its removal counted them already)
                    if i in plan.keep_heads:
                        rows = rows // layer.attn.num_heads * len(plan.keep_heads[i])
                    removed += gone * (a.in_features + (a.bias is not None) + 1 + rows)  # + 1: norm
        if i in plan.keep_experts:
            e = layer.moe
            gone = e.num_experts - len(plan.keep_experts[i])
            per_expert = (e.experts.gate_up_proj.numel() + e.experts.down_proj.numel()) // e.num_experts
            removed += gone * (per_expert + e.router.weight.shape[1] + (getattr(e.router, "bias", None) is not None))
        if i in plan.keep_expert_channels:
            kept = plan.keep_expert_channels[i]
            hidden = layer.moe.experts.down_proj.shape[1]
            removed += len(kept) * (layer.moe.width - len(kept[0])) * 3 * hidden
        if i in plan.keep_channels:
            m = layer.mlp or layer.moe.shared
            dc = m.width - len(plan.keep_channels[i])
            rows = [m.up] + ([m.gate] if m.gate is not None else [])
            removed += sum(dc * (lin.in_features + (lin.bias is not None)) for lin in rows) + dc * m.down.out_features
    return removed


def add_bias_flags(structure: Structure, plan: Plan, flags: list[str]) -> None:
    """Turn on config `flags` (dsc.structure.BIAS_FLAGS): every linear each covers gets a bias after
    the cut, counted here so the plan's parameter counts stay what the saved model holds."""
    added = 0
    for layer in structure.layers:
        i = layer.index
        if i in plan.drop_layers:
            continue
        for flag in flags:
            where, attrs = BIAS_FLAGS[structure.model_type][flag]
            parent = getattr(layer, where)
            for attr in attrs if parent is not None else ():
                lin = getattr(parent, attr)
                if lin is not None and lin.bias is None:
                    added += _rows_after(layer, plan, attr, lin)
    plan.config.update({flag: True for flag in flags})
    plan.params_after += added
    plan.params_non_embedding_after += added


def _rows_after(layer, plan: Plan, attr: str, lin: nn.Linear) -> int:
    """Output rows `lin` (layer.attn.q/k/v/o or layer.mlp.gate/up/down) has after the cut."""
    i, a = layer.index, layer.attn
    if attr == "q" and i in plan.keep_heads:
        return len(plan.keep_heads[i]) * a.head_dim
    if attr in ("k", "v") and i in plan.keep_kv:
        return len(plan.keep_kv[i]) * a.head_dim
    if attr in ("gate", "up") and i in plan.keep_channels:
        return len(plan.keep_channels[i])
    return lin.out_features


def _removed_heads(a, plan: Plan, i: int) -> int:
    gone = a.num_heads - len(plan.keep_heads[i])
    if a.mla is not None:
        mla = a.mla
        return gone * ((mla.nope + mla.rope) * mla.q_b.in_features + (mla.nope + mla.v_dim) * mla.kv_b.in_features
                       + mla.v_dim * a.o.out_features)
    hd = a.head_dim
    dq, dkv = gone * hd, (a.num_kv_heads - len(plan.keep_kv[i])) * hd
    return dq * (a.q.in_features + (a.q.bias is not None)) + dq * a.o.out_features + \
        2 * dkv * (a.k.in_features + (a.k.bias is not None))
