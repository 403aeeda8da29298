"""Routed experts stored fused (transformers 5: gate_up_proj (E, 2I, H), down_proj (E, H, I)):
calibration statistics, importance, and the cut (drop, or merge into the most similar kept expert).

Statistics come from one forward hook on the experts module, which receives each token's routed
experts and routing weights; per expert e, over the tokens routed to it (g = routing weight):
  usage      Σ g                          frequency  Σ 1
  reap       Σ g·‖f_e(x)‖₂ / Σ 1          (REAP, Lasby et al. 2025: router-weighted output norm)
  sq         Σ (g·h_e(x))² per channel    (h_e = act(gate·x) ⊙ up·x, the input of down_proj: the
                                            activation importance of expert channels, Wanda on down)
  similarity mean cos(f_e(x), f_d(x)) over a token sample run through every expert (for merging)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

SIM_TOKENS = 64  # tokens per forward run through every expert for the similarity matrix


@dataclass
class ExpertStats:
    usage: torch.Tensor  # (E,)
    frequency: torch.Tensor  # (E,)
    reap: torch.Tensor  # (E,) Σ g·‖f_e(x)‖
    sq: torch.Tensor  # (E, I)
    similarity: torch.Tensor  # (E, E) Σ cos over sampled tokens

    @classmethod
    def empty(cls, experts: nn.Module) -> "ExpertStats":
        e, _, width = experts.down_proj.shape
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(z(e), z(e), z(e), z(e, width), z(e, e))

    def importance(self, kind: str) -> torch.Tensor:
        if kind == "reap":  # mean over the tokens routed to the expert; never-routed experts score 0
            return (self.reap / self.frequency.clamp(min=1)).float()
        return {"usage": self.usage, "frequency": self.frequency}[kind].float()


def _expert(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, f): expert e's down_proj input and output for tokens x (T, H)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    h = experts.act_fn(gate) * up
    return h, F.linear(h, experts.down_proj[e])


def hook(stats: ExpertStats, outputs: bool, similarity: bool):
    """A forward hook for the experts module; `outputs`: run the experts again for reap / sq."""

    def fn(experts, args, output):
        x, index, weights = args[0], args[1], args[2]
        x = x.reshape(-1, x.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        flat = index.reshape(-1).cpu()
        stats.usage.index_add_(0, flat, weights.reshape(-1).double().cpu())
        stats.frequency.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
        if outputs:
            for e in flat.unique().tolist():
                token, slot = torch.where(index == e)
                g = weights[token, slot].float()[:, None]
                h, f = _expert(experts, e, x[token].to(experts.down_proj.dtype))
                stats.reap[e] += (g[:, 0] * f.float().norm(dim=-1)).sum().double().cpu()
                stats.sq[e] += (g * h.float()).pow(2).sum(0).double().cpu()
        if similarity:
            sample = x[:SIM_TOKENS]
            outs = torch.stack([F.normalize(_expert(experts, e, sample)[1].float(), dim=-1)
                                for e in range(experts.down_proj.shape[0])])  # (E, T, H)
            stats.similarity += torch.einsum("eth,dth->ed", outs, outs).double().cpu()

    return fn


def channel_scores(experts: nn.Module, kind: str, stats: ExpertStats | None, norm: str, gen) -> torch.Tensor:
    """(E, I) importance of each expert's intermediate channels (down's columns, gate/up rows)."""
    down = experts.down_proj.detach().float()  # (E, H, I)
    if kind == "activation":
        return down.abs().sum(1) * stats.sq.sqrt().float()
    if kind == "random":
        return torch.rand(down.shape[0], down.shape[2], generator=gen)
    gate_up = experts.gate_up_proj.detach().float()  # (E, 2I, H)
    p = (lambda w: w.abs()) if norm == "l1" else (lambda w: w.pow(2))
    width = down.shape[2]
    return p(down).sum(1) + p(gate_up[:, :width]).sum(2) + p(gate_up[:, width:]).sum(2)


def merge_targets(stats: ExpertStats, keep: list[int]) -> dict[int, int]:
    """Each removed expert → the kept expert whose outputs are most similar to its own."""
    kept = torch.as_tensor(keep)
    sim = stats.similarity[:, kept]
    return {e: keep[int(sim[e].argmax())] for e in range(len(stats.usage)) if e not in keep}


def _merged(param: torch.Tensor, keep: list[int], into: dict[int, int], weight: torch.Tensor) -> torch.Tensor:
    """Kept experts' tensors, each averaged with the experts merged into it, weighted by `weight`
    (routing frequency, as M-SMoE does)."""
    out = param.detach().clone().double()
    for k in keep:
        group = [k] + [d for d, t in into.items() if t == k]
        if len(group) > 1:
            w = weight[group].double().clamp(min=1e-6)
            out[k] = torch.einsum("e,e...->...", w / w.sum(), param.detach()[group].double())
    return out.to(param.dtype)


def cut(moe, keep: list[int], into: dict[int, int] | None = None, weight: torch.Tensor | None = None) -> None:
    """Keep routed experts `keep` (merging the others in where `into` says): both fused tensors,
    the router's rows, its bias and DeepSeek's e_score_correction_bias (a buffer)."""
    idx = torch.as_tensor(keep, device=moe.router.weight.device)
    experts, router = moe.experts, moe.router
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(experts, name)
        data = _merged(param, keep, into, weight) if into else param.data
        setattr(experts, name, nn.Parameter(data.index_select(0, idx).clone(), requires_grad=param.requires_grad))
    for name in ("weight", "bias"):
        param = getattr(router, name, None)
        if isinstance(param, nn.Parameter):
            setattr(router, name, nn.Parameter(param.data.index_select(0, idx).clone(),
                                               requires_grad=param.requires_grad))
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor):
        router.register_buffer("e_score_correction_bias", bias.index_select(0, idx).clone())
    for owner in (experts, router):
        if hasattr(owner, "num_experts"):
            owner.num_experts = len(keep)


def cut_channels(moe, keep: list[list[int]]) -> None:
    """Keep, for every expert e, its intermediate channels keep[e] (the same count for all)."""
    experts = moe.experts
    width = experts.down_proj.shape[2]
    rows = torch.stack([torch.as_tensor(k + [width + j for j in k]) for k in keep])  # gate rows, then up rows
    cols = torch.stack([torch.as_tensor(k) for k in keep])
    gate_up, down = experts.gate_up_proj, experts.down_proj
    experts.gate_up_proj = nn.Parameter(torch.stack([gate_up.data[e, rows[e]] for e in range(len(keep))]),
                                        requires_grad=gate_up.requires_grad)
    experts.down_proj = nn.Parameter(torch.stack([down.data[e][:, cols[e]] for e in range(len(keep))]),
                                     requires_grad=down.requires_grad)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = len(keep[0])


# ---- reconstruction: choose experts by the MoE block's output error (greedy) ----------------------

def capture(stats_inputs: list, limit: int):
    """A forward pre-hook for an MoE block keeping up to `limit` of its input tokens (on CPU)."""

    def fn(block, args):
        have = sum(x.shape[0] for x in stats_inputs)
        if have < limit:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            stats_inputs.append(x[: limit - have].cpu())

    return fn


@torch.no_grad()
def removal_order(block: nn.Module, moe, x: torch.Tensor, groups: int, least: int, top_k: int) -> torch.Tensor:
    """Scores (E,) from a greedy removal: each step removes the expert whose absence changes the
    block's output on `x` least, from the fullest routing group (so an equal cut of every group is
    an exact prefix) while groups keep `least` experts, then from all (as when the groups merge
    into one), down to top_k. An expert's score is the step it went at (never removed: E)."""
    x = x.to(moe.router.weight.device, dtype=next(block.parameters()).dtype)[None]
    reference = block(x).float()
    saved = getattr(moe.router, "num_group", None), getattr(moe.router, "topk_group", None)
    try:
        return _greedy(block, moe, x, reference, groups, least, top_k)
    finally:
        if groups > 1:
            _set_groups(moe.router, *saved)


def _greedy(block, moe, x, reference, groups: int, least: int, top_k: int) -> torch.Tensor:
    n = moe.num_experts
    kept, score, size = list(range(n)), torch.full((n,), float(n)), n // groups
    while len(kept) > top_k:
        counts = [sum(1 for e in kept if e // size == g) for g in range(groups)]
        if groups > 1 and min(counts) <= least:
            groups, size = 1, n  # the rest ranked as the merged single group routes
            _set_groups(moe.router, 1, 1)
            continue
        fullest = [e for e in kept if counts[e // size] == max(counts)]
        errors = {e: _error(block, moe, [k for k in kept if k != e], x, reference) for e in fullest}
        gone = min(errors, key=errors.get)
        score[gone] = n - len(kept)
        kept.remove(gone)
    return score


def routing_groups(config) -> tuple[int, int, int]:
    """(n_group, topk_group, least experts a group needs) of group-limited routing; (1, 1, 1) without.
    DeepSeek-V3 scores a group by its two best experts (least 2), DeepSeek-V2 by its best."""
    if getattr(config, "topk_method", "noaux_tc") == "greedy":  # DeepSeek-V2 without groups
        return 1, 1, 1
    groups = getattr(config, "n_group", None) or 1
    return groups, getattr(config, "topk_group", None) or 1, 2 if config.model_type == "deepseek_v3" else 1


def _set_groups(router, n_group: int, topk_group: int) -> None:
    router.num_group, router.topk_group = n_group, topk_group


def _error(block, moe, keep: list[int], x, reference) -> float:
    """‖block(x) − reference‖² with only `keep` routed. DeepSeek-V3: the others masked out of
    routing (correction bias −∞), which routes exactly as the cut model; other routers: a cut copy."""
    bias = getattr(moe.router, "e_score_correction_bias", None)
    if bias is not None:
        saved = bias.clone()
        mask = torch.ones_like(bias, dtype=torch.bool)
        mask[keep] = False
        bias.masked_fill_(mask, float("-inf"))
        try:
            return (block(x).float() - reference).pow(2).sum().item()
        finally:
            bias.copy_(saved)
    return (cut_copy(block, moe, keep)(x).float() - reference).pow(2).sum().item()


def cut_copy(block: nn.Module, moe, keep: list[int], groups: tuple[int | None, int | None] = (None, None)) -> nn.Module:
    """A copy of the MoE block with only `keep` experts (and, where given, the routing groups
    (n_group, topk_group) after the cut), sharing nothing it changes with `block`."""
    def shallow(module):
        new = copy.copy(module)
        new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), \
            dict(module._modules)
        return new

    new = shallow(block)
    names = {id(m): name for name, m in block.named_children()}
    experts, router = shallow(moe.experts), shallow(moe.router)
    new._modules[names[id(moe.experts)]], new._modules[names[id(moe.router)]] = experts, router
    cut(SimpleNamespace(experts=experts, router=router), keep)
    if groups[0] is not None:
        _set_groups(router, *groups)
    return new
