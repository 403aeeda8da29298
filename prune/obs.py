"""`importance: obs` — a unit is scored by the output error its removal causes while the units
left compensate for it (Optimal Brain Surgeon; SlimGPT's structured form, with greedy group removal).

A head or an MLP channel is a set S of input columns of the projection that reads it (o_proj,
down_proj). With that projection's weight W (out, n) and its input Gram Σ on calibration tokens
(dampened: H = Σ + λI, λ = `reconstruct_damp` × mean diag Σ), removing S and refitting the rest
by least squares raises the output error by

    ΔE(S) = tr( W[:, S] (H⁻¹[S, S])⁻¹ W[:, S]ᵀ )          (one channel: ‖W[:, j]‖² / H⁻¹[j, j])

and leaves W ← W − W[:, S] (H⁻¹[S, S])⁻¹ H⁻¹[S, :] with H⁻¹ over the remaining columns the Schur
complement H⁻¹[R, R] − H⁻¹[R, S] (H⁻¹[S, S])⁻¹ H⁻¹[S, R]. Greedy removal takes the cheapest unit,
updates W and H⁻¹, and scores again, until one unit is left: a unit's score is its position in that
order (removed first = least important), which is what the plan's top-k selection reads. Unlike
activation or Taylor scores it sees that two heads writing the same thing are one too many.

MLP channels go width/128 at a time (the cheapest of the current scores; W and H⁻¹ are updated in
place, O(n³) in all for width n, as SlimGPT batches its removals); heads one at a time. With `head_mode: per_group` every
KV group keeps its quota: a head whose group is at its quota is not removed before every group is
(the plan then keeps exactly the heads greedy removal kept). Routed experts' channels are ordered
per expert on the tokens routed to it. The Gram matrices come from the unpruned model, one
decoder layer at a time (dsc.quantize.calibrate); `reconstruct: true` then refits the kept columns
with the same statistics, sequentially.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsc.quantize.calibrate import capture, observe
from dsc.quantize.experts import ExpertStats
from dsc.structure import Structure, name_of


def _inverse(a: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item():
        return torch.linalg.pinv(a, hermitian=True)
    return torch.cholesky_inverse(chol)


def removal_order(weight: torch.Tensor, gram: torch.Tensor, size: int, damp: float,
                  groups: torch.Tensor | None = None, quota: int = 0, chunk: int = 1) -> torch.Tensor:
    """(n / size,) greedy OBS removal position of each unit of `size` consecutive input columns of
    `weight` (out, n), 0 = removed first. `groups` (units,): a unit may not be removed while its
    group has `quota` units left, until every group is at its quota. `chunk`: units removed per step.
    W and H⁻¹ stay full size and are updated in place (removed columns become zero)."""
    w, g = weight.detach().double().clone(), gram.detach().double().to(weight.device)
    n = w.shape[1]
    units = n // size
    lam = damp * g.diagonal().mean().clamp(min=1e-12)
    hinv = _inverse(g + lam * torch.eye(n, dtype=g.dtype, device=g.device))
    removed = torch.zeros(units, dtype=torch.bool, device=w.device)
    left = torch.bincount(groups, minlength=int(groups.max()) + 1) if groups is not None else None
    order = torch.empty(units, dtype=torch.long)
    cols = torch.arange(n, device=w.device).view(units, size)
    pos = 0
    while pos < units - 1:
        if size == 1:
            cost = w.pow(2).sum(0) / hinv.diagonal().clamp(min=1e-30)
        else:
            blocks = hinv.view(units, size, units, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (U, s, s)
            blocks = blocks + torch.eye(size, dtype=w.dtype, device=w.device) * removed[:, None, None]
            ws = w.view(w.shape[0], units, size).transpose(0, 1)  # (U, out, s)
            cost = (ws * torch.linalg.solve(blocks, ws.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
        cost = cost.masked_fill(removed, math.inf)
        if left is not None:  # units whose group is at its quota wait until every group is
            full = left[groups] <= quota
            if not bool(full[~removed].all()):
                cost = cost.masked_fill(full, math.inf)
        take = torch.argsort(cost, stable=True)[:min(chunk, units - 1 - pos)]
        take = take[torch.isfinite(cost[take])]  # a chunk never takes a group below its quota
        s = cols[take].reshape(-1)
        a = _inverse(hinv[s][:, s]) @ hinv[s]  # (|S|, n) = (H⁻¹[S, S])⁻¹ H⁻¹[S, :]
        w.addmm_(w[:, s], a, alpha=-1)
        hinv.addmm_(hinv[:, s], a, alpha=-1)
        removed[take] = True
        for j, t in enumerate(take.tolist()):
            order[t] = pos + j
            if left is not None:
                left[groups[t]] -= 1
        pos += len(take)
    order[~removed.cpu()] = units - 1
    return order


def _chunk(width: int) -> int:
    return max(1, math.ceil(width / 128))


def head_order(attn, gram: torch.Tensor, damp: float, mode: str, quota: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_heads,), (num_kv_heads,) scores (higher = kept longer) from o_proj's input Gram."""
    w = attn.o.weight
    if attn.mla is not None:  # every head its own KV: heads are the units
        h = removal_order(w, gram, attn.mla.v_dim, damp).float()
        return h, h
    gs = attn.group_size
    if mode == "groups" or gs == 1:
        kv = removal_order(w, gram, gs * attn.head_dim, damp).float()
        return kv.repeat_interleave(gs), kv
    groups = torch.arange(attn.num_heads, device=w.device) // gs
    h = removal_order(w, gram, attn.head_dim, damp, groups=groups, quota=quota).float()
    return h, h.view(attn.num_kv_heads, gs).sum(1)


def channel_order(down: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(width,) scores of an MLP's channels from down_proj's weight (hidden, width) and input Gram."""
    return removal_order(down, gram, 1, damp, chunk=_chunk(down.shape[1])).float()


@torch.no_grad()
def scores(model: nn.Module, structure: Structure, cfg, blocks: torch.Tensor, out) -> None:
    """Fill `out` (dsc.prune.importance.Scores) with OBS scores of heads and MLP channels (dense,
    shared and routed experts), layer by layer on the unpruned model."""
    device = next(model.parameters()).device
    inputs = capture(model, model.get_submodule(structure.family.layers), blocks, cfg.batch_size, device)
    gs = structure.num_heads // max(structure.num_kv_heads, 1)
    quota = max(1, round(gs * (1 - cfg.heads))) if cfg.heads else 0
    for layer in structure.layers:
        a, i = layer.attn, layer.index
        m = layer.mlp or (layer.moe.shared if layer.moe is not None else None)
        linears = {}  # what is ordered here, by its name in the layer: o_proj for heads, down_proj for channels
        if cfg.heads and (a.q is not None or a.mla is not None):
            linears["heads"] = a.o
        if cfg.channels and m is not None:
            linears["channels"] = m.down
        names = {what: name_of(layer.module, lin) for what, lin in linears.items()}
        experts = ({name_of(layer.module, layer.moe.experts): ExpertStats.down_grams(layer.moe.experts)}
                   if cfg.channels and layer.moe is not None else {})
        seen = observe(layer.module, inputs, {names[w]: lin for w, lin in linears.items()}, experts=experts)
        grams = {name: st.gram_mean for st in seen.stats for name in st.linears}
        if "heads" in names:
            out.heads[i], out.kv[i] = (t.cpu() for t in head_order(a, grams[names["heads"]], cfg.reconstruct_damp,
                                                                   cfg.head_mode, quota))
        if "channels" in names:
            order = channel_order(m.down.weight, grams[names["channels"]], cfg.reconstruct_damp).cpu()
            (out.channels if layer.mlp is not None else out.shared_channels)[i] = order
        if experts:
            st = next(iter(experts.values()))
            out.expert_channels[i] = _expert_orders(layer.moe.experts.down_proj, st, cfg.reconstruct_damp)
        inputs = seen.outputs


def _expert_orders(down: torch.Tensor, stats: ExpertStats, damp: float) -> torch.Tensor:
    """(E, I): each routed expert's channels ordered on the tokens routed to it (an expert that
    received none: by the norm of its down_proj columns, the OBS score with an identity Gram)."""
    rows = []
    for e in range(down.shape[0]):
        gram = stats.down_gram(e)
        if gram is None:
            gram = torch.eye(down.shape[2], device=down.device)
        rows.append(channel_order(down[e], gram, damp).cpu())
    return torch.stack(rows)
