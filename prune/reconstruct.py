"""Reconstruction after the cut: each consumer of removed units is refit by least squares so the
pruned layer's output matches the unpruned layer's on calibration inputs.

A head or an MLP channel is removed by deleting columns of the projection that reads it (o_proj
for heads, down_proj for channels; a routed expert's down_proj is refit on the tokens routed to
it). The units kept compute exactly what they did, so only that projection's output changes:
with its input x (n, in) over calibration tokens, Gram Σ = xᵀx / n, weight W (out, in) and the kept columns K, the best W' (out, |K|) in

    min ‖x Wᵀ − x[:, K] W'ᵀ‖²  is  W' = W Σ[:, K] (Σ[K, K] + λI)⁻¹

(λ: `reconstruct_damp` × the mean of diag Σ[K, K], as GPTQ dampens its Hessian). Without
reconstruction W' = W[:, K], which is what the error is compared against. The output error
‖x (W − W'ᵀ-embedded)ᵀ‖² is read off the Gram matrix with no second pass over the data.

Layer by layer (like the quantizers' calibration, dsc.quantize.calibrate): layer ℓ's inputs are
the outputs of the already pruned and refit layers before it, attention is cut and refit first,
then the MLP sees the refit attention's output. Memory: the model plus one layer's calibration
inputs and one Gram matrix at a time. Removed layers pass their input through unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from dsc.quantize.calibrate import capture, forward, observe
from dsc.quantize.experts import ExpertStats
from dsc.structure import Structure, name_of
from dsc.prune.cut import cut_attention, cut_mlp, finish, unit_rows
from dsc.prune.plan import Plan


def solve(weight: torch.Tensor, gram: torch.Tensor, keep: list[int], damp: float) -> torch.Tensor:
    """W Σ[:, K] (Σ[K, K] + λI)⁻¹ (out, |K|), in float64; λ = damp · mean diag Σ[K, K]."""
    w, g = weight.double(), gram.double()
    k = torch.as_tensor(keep, device=g.device)
    a = g[k][:, k]
    lam = damp * a.diagonal().mean().clamp(min=1e-12)
    a = a + lam * torch.eye(len(keep), dtype=a.dtype, device=a.device)
    b = g[k] @ w.T  # (|K|, out) = Σ[K, :] Wᵀ
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item():  # not positive definite even dampened (a dead input): least squares instead
        return torch.linalg.lstsq(a, b).solution.T
    return torch.cholesky_solve(b, chol).T


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: list[int], new: torch.Tensor) -> float:
    """‖x Wᵀ − x[:, K] W'ᵀ‖² / ‖x Wᵀ‖² from the Gram matrix (W' = `new`, out × |K|)."""
    w, g = weight.double(), gram.double()
    d = -w.clone()
    d[:, torch.as_tensor(keep, device=d.device)] += new.double()
    return float(((d @ g) * d).sum() / ((w @ g) * w).sum().clamp(min=1e-30))


def _refit(layer, lin: nn.Linear, keep: list[int], inputs, cut, damp: float, experts: dict | None = None) -> dict:
    """Observe `lin`'s input over `inputs`, run `cut` (which removes its columns outside `keep`),
    then refit what is left of it; returns the output error before and after the refit.
    `experts`: routed experts' statistics filled by the same pass (see `observe`)."""
    name = name_of(layer.module, lin)
    seen = observe(layer.module, inputs, {name: lin}, experts=experts)
    gram = seen.stats[0].gram_mean
    full = lin.weight.data.clone()
    cut()
    new = solve(full, gram, keep, damp)
    plain = output_error(full, gram, keep, full[:, keep])
    lin.weight.data.copy_(new.to(lin.weight.dtype))
    return {"error_cut": round(plain, 6), "error_refit": round(output_error(full, gram, keep, new), 6)}


def _refit_experts(layer, plan: Plan, stats: ExpertStats, full: torch.Tensor, damp: float) -> dict:
    """Refit each kept routed expert's down_proj (H, I') on the tokens routed to it. An expert
    another was merged into has new weights the statistics did not see: it keeps the plain cut."""
    i, down = layer.index, layer.moe.experts.down_proj
    kept = plan.keep_experts.get(i, list(range(full.shape[0])))
    merged = set(plan.merge_experts.get(i, {}).values())
    cut, refit = [], []
    for j, e in enumerate(kept):
        keep, gram = plan.keep_expert_channels[i][j], stats.down_gram(e)
        if e in merged or gram is None:
            continue
        new = solve(full[e], gram, keep, damp)
        cut.append(output_error(full[e], gram, keep, full[e][:, keep]))
        refit.append(output_error(full[e], gram, keep, new))
        down.data[j] = new.to(down.dtype)
    if not cut:
        return {"error_cut": 0.0, "error_refit": 0.0}
    return {"error_cut": round(sum(cut) / len(cut), 6), "error_refit": round(sum(refit) / len(refit), 6)}


@torch.no_grad()
def reconstruct(model: nn.Module, structure: Structure, plan: Plan, blocks: torch.Tensor, batch_size: int,
                damp: float, log=None) -> nn.Module:
    """Apply `plan` layer by layer, refitting o_proj after a head cut and down_proj after a channel
    cut (dense MLPs, shared experts, each routed expert on its own tokens) on calibration `blocks`;
    the errors land in plan.reconstructed."""
    device = next(model.parameters()).device
    layers = model.get_submodule(structure.family.layers)
    inputs = capture(model, layers, blocks, batch_size, device)
    for layer in structure.layers:
        i = layer.index
        if i in plan.drop_layers:
            continue  # removed: the next layer reads what this one would have
        done = {}
        cut_attention(layer, structure, plan, heads=False)  # MLA latent channels first (not refit yet)
        if i in plan.keep_heads:
            a = layer.attn
            keep = unit_rows(plan.keep_heads[i], a.mla.v_dim if a.mla is not None else a.head_dim)
            done["o_proj"] = _refit(layer, a.o, keep, inputs,
                                    lambda: cut_attention(layer, structure, plan, latent=False), damp)
        m = layer.mlp or (layer.moe.shared if layer.moe is not None else None)
        routed = i in plan.keep_expert_channels
        stats, full, experts = None, None, None
        if routed:  # each routed expert's down_proj input Gram, on its tokens, before the cut
            stats = ExpertStats.down_grams(layer.moe.experts)
            full = layer.moe.experts.down_proj.data.clone()
            experts = {name_of(layer.module, layer.moe.experts): stats}
        if i in plan.keep_channels and m is not None:  # one pass observes the shared and the routed experts
            done["down_proj"] = _refit(layer, m.down, plan.keep_channels[i], inputs, lambda: cut_mlp(layer, plan),
                                       damp, experts)
        else:
            if routed:
                observe(layer.module, inputs, {}, experts=experts)
            cut_mlp(layer, plan)
        if routed:
            done["experts.down_proj"] = _refit_experts(layer, plan, stats, full, damp)
        if done:
            plan.reconstructed[i] = done
            if log is not None:
                log.info("layer %d refit: %s", i, ", ".join(f"{k} error {v['error_cut']:.4f} → {v['error_refit']:.4f}"
                                                          for k, v in done.items()),
                         extra={"event": "reconstructed", "layer": i, **{k: v["error_refit"] for k, v in done.items()}})
        inputs = forward(layer.module, inputs)
    return finish(model, structure, plan)
