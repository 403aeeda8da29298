"""Reconstruction after the cut: each projection that reads removed units is refit by least squares
so the pruned layer computes what the unpruned one did on calibration inputs.

A head or an MLP channel is removed by deleting columns of the projection that reads it (o_proj for
heads, down_proj for channels, q_b / kv_b for MLA latent ranks; a routed expert's down_proj is refit
on the tokens routed to it). With x (n, k) that projection's input in the pruned model and r (n, m)
its input in the reference (the unpruned layer), weight W (out, m), the best W' (out, k) is

    min ‖r Wᵀ − x W'ᵀ‖²   →   W' = W Cᵀ (A + λI)⁻¹,   A = xᵀx / n,  C = xᵀr / n

(λ: `reconstruct_damp` × the mean of diag A, as GPTQ dampens its Hessian). Where the kept units
compute exactly what they did (heads, channels: x = r[:, K]) this is W Σ[:, K] (Σ[K, K] + λI)⁻¹ with
Σ the input Gram; a latent cut changes what the kept ranks carry too (the latent norm sees fewer
channels), which the cross term C captures. The output error, relative to ‖r Wᵀ‖², is read off
A, C and D = rᵀr / n with no second pass over the data. With `bias`, the refit projection also gets an
intercept (FLAP's compensation, solved jointly: the centred statistics give W', then b = W μ_r − W' μ_x).

What the reference sees (`target`):
- "layer": the unpruned layer on the pruned model's own inputs (attention first; the MLP's reference
  then reads the refit attention's output): each layer repairs only its own cut.
- "model": the unpruned model's layer on the unpruned model's inputs (a second stream of calibration
  activations, carried through the removed layers too): each refit also corrects what the layers
  before it got wrong.
`depth`: a layer right after removed ones also refits its input projections (q/k/v or MLA's q_a /
kv_a, and a dense MLP's gate/up) to read from its input what the unpruned model's layer read from
the unpruned stream; without it the layer reads a stream that skipped a layer.

Layer by layer (like the quantizers' calibration, dsc.quantize.calibrate): memory is the model, one
layer's calibration inputs (two with "model" / depth), one copy of the layer being refit and one
projection's statistics at a time. With a `progress` folder every finished layer is saved, and a
run killed mid-model restarts after the last one (dsc.quantize.progress).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dsc.quantize.calibrate import capture, forward, observe
from dsc.quantize.experts import ExpertStats
from dsc.quantize.progress import Progress
from dsc.structure import Layer, Structure, name_of
from dsc.prune.cut import add_zero_biases, cut_attention, cut_mlp, finish, unit_rows
from dsc.prune.plan import Plan


def fit(weight: torch.Tensor, a: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    """W Cᵀ (A + λI)⁻¹ (out, k) in float64: weight (out, m), a (k, k), c (k, m); λ = damp · mean diag A."""
    w, a, c = weight.double(), a.double(), c.double()
    lam = damp * a.diagonal().mean().clamp(min=1e-12)
    a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    b = c @ w.T  # (k, out)
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item():  # not positive definite even dampened (a dead input): least squares instead
        return torch.linalg.lstsq(a, b).solution.T
    return torch.cholesky_solve(b, chol).T


def solve(weight: torch.Tensor, gram: torch.Tensor, keep: list[int], damp: float) -> torch.Tensor:
    """The refit when the kept columns are unchanged (x = r[:, K]): W Σ[:, K] (Σ[K, K] + λI)⁻¹."""
    g = gram.double()
    k = torch.as_tensor(keep, device=g.device)
    return fit(weight, g[k][:, k], g[k], damp)


def error(weight: torch.Tensor, new: torch.Tensor, a: torch.Tensor, c: torch.Tensor, energy, total=None) -> float:
    """‖r Wᵀ − x W'ᵀ‖² / ‖r Wᵀ‖² from A = xᵀx / n, C = xᵀr / n and energy = ‖r Wᵀ‖² / n (centred
    statistics: the error with the best intercept; `total`: the uncentred energy it is relative to)."""
    w, v = weight.double(), new.double()
    err = ((v @ a.double()) * v).sum() - 2 * ((v @ c.double()) * w).sum() + energy
    return float(torch.as_tensor(err).clamp(min=0) / torch.as_tensor(energy if total is None else total).clamp(min=1e-30))


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: list[int], new: torch.Tensor) -> float:
    """‖x Wᵀ − x[:, K] W'ᵀ‖² / ‖x Wᵀ‖² from the Gram matrix (W' = `new`, out × |K|)."""
    g, w = gram.double(), weight.double()
    k = torch.as_tensor(keep, device=g.device)
    return error(w, new, g[k][:, k], g[k], ((w @ g) * w).sum())


class Paired:
    """Streaming statistics of one projection's input in the pruned layer (x, n × k) and in the
    reference (r, n × m), for its reference weight W (out, m). `keep`: x is exactly r[:, keep] (the
    cut removed columns and changed nothing else), so only rᵀr is accumulated and x is never read."""

    def __init__(self, weight: torch.Tensor, keep: list[int] | None = None):
        self.w, self.keep = weight, keep
        self.a = self.c = self.mx = self.mr = None
        self.energy, self.n = 0.0, 0

    def add(self, x: torch.Tensor | None, r: torch.Tensor) -> None:
        dtype = torch.float64 if r.dtype == torch.float64 else torch.float32  # sums of model activations: float32
        r = r.reshape(-1, r.shape[-1]).to(dtype)  # (n, m)
        if self.keep is not None:
            x = r  # A and C are read off rᵀr
        else:
            x = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, k)
            self.energy += float((r @ self.w.to(dtype).T).double().pow(2).sum())
        if self.a is None:
            self.mx, self.mr = x.new_zeros(x.shape[1], dtype=torch.float64), r.new_zeros(r.shape[1], dtype=torch.float64)
            self.a, self.c = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], r.shape[1])
        self.a.addmm_(x.T, x)
        if self.keep is None:
            self.c.addmm_(x.T, r)
        self.mx += x.sum(0).double()
        self.mr += r.sum(0).double()
        self.n += x.shape[0]

    def means(self, centred: bool):
        """(A, C, energy, μ_x, μ_r) per token; `centred`: covariances (what an intercept leaves to W')."""
        n, w = max(self.n, 1), self.w.double()
        a, mx, mr = self.a.double() / n, self.mx / n, self.mr / n
        if self.keep is not None:  # a holds rᵀr
            k = torch.as_tensor(self.keep, device=a.device)
            g = a - torch.outer(mr, mr) if centred else a
            return g[k][:, k], g[k], ((w @ g) * w).sum(), mr[k], mr
        c, energy = self.c.double() / n, torch.tensor(self.energy / n, dtype=torch.float64)
        if centred:
            a, c, energy = a - torch.outer(mx, mx), c - torch.outer(mx, mr), energy - (w @ mr).pow(2).sum()
        return a, c, energy, mx, mr


@torch.no_grad()
def paired(layer: nn.Module, inputs, ref: nn.Module, ref_inputs, stats: dict[str, Paired]) -> None:
    """Run `ref` on `ref_inputs` (and `layer` on `inputs`, unless every statistic is a plain subset)
    batch by batch, and add what each linear named in `stats` (the same name in both) reads."""
    got: dict[tuple[int, str], torch.Tensor] = {}
    both = any(st.keep is None for st in stats.values())

    def grab(side: int, name: str):
        def hook(_module, args):
            got[side, name] = args[0]
        return hook

    sides = (layer, ref) if both else (None, ref)
    handles = [m.get_submodule(n).register_forward_pre_hook(grab(side, n))
               for side, m in enumerate(sides) if m is not None for n in stats]
    try:
        for (args, kwargs), (r_args, r_kwargs) in zip(inputs, ref_inputs):
            if both:
                layer(*args, **kwargs)
            ref(*r_args, **r_kwargs)
            for n, st in stats.items():
                st.add(got.get((0, n)), got[1, n])
            got.clear()
    finally:
        for h in handles:
            h.remove()


class Refit:
    """One layer's refits: the layer (being cut) and its inputs, the reference and its inputs."""

    def __init__(self, layer: Layer, inputs, ref: nn.Module, ref_inputs, damp: float, bias: tuple[str, ...]):
        self.layer, self.inputs, self.damp, self.bias, self.errors = layer, inputs, damp, bias, {}
        self.reference(ref, ref_inputs)

    def reference(self, ref: nn.Module, ref_inputs) -> None:
        self.ref, self.ref_inputs = ref, ref_inputs
        self.changed = ref_inputs is not self.inputs  # False: the layer reads what the reference reads

    def __call__(self, lins: dict[str, nn.Linear], keep: dict[str, list[int] | None], subset: bool = False) -> None:
        """Refit every linear in `lins` (key → module of the cut layer) from one paired pass. `keep`:
        the reference's columns the plain cut kept (None: no plain cut to compare); `subset`: the cut
        kept those columns unchanged, which (until a refit changes the layer) reads them off rᵀr."""
        names = {k: name_of(self.layer.module, lin) for k, lin in lins.items()}
        exact = subset and not self.changed
        stats = {names[k]: Paired(self.ref.get_submodule(names[k]).weight, keep.get(k) if exact else None)
                 for k in lins}
        paired(self.layer.module, self.inputs, self.ref, self.ref_inputs, stats)
        for key, lin in lins.items():
            ref_lin = self.ref.get_submodule(names[key])
            intercept = key in self.bias
            st = stats[names[key]]
            a, c, energy, mx, mr = st.means(centred=intercept)
            w = ref_lin.weight.data.double()
            new = fit(w, a, c, self.damp)
            plain = None
            if keep.get(key) is not None:  # the plain cut: no refit, no intercept
                plain = error(w, w[:, keep[key]], *st.means(centred=False)[:3])
            refit = error(w, new, a, c, energy, st.means(centred=False)[2] if intercept else None)
            plain = refit if plain is None else plain
            lin.weight.data.copy_(new.to(lin.weight.dtype))
            if intercept:  # b = b_ref + W μ_r − W' μ_x
                b = w @ mr - new @ mx + (ref_lin.bias.data.double() if ref_lin.bias is not None else 0)
                lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
            self.errors[key] = {"error_cut": round(plain, 6), "error_refit": round(refit, 6)}
        self.changed = True


def _refit_experts(layer: Layer, plan: Plan, stats: ExpertStats, full: torch.Tensor, damp: float) -> dict:
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


def _input_linears(layer: Layer) -> tuple[dict[str, nn.Linear], dict[str, nn.Linear]]:
    """The projections that read the residual stream (through a norm): attention's, a dense MLP's."""
    a = layer.attn
    if a.mla is not None:
        attn = {"q_a_proj": a.mla.q_a or a.mla.q_b, "kv_a_proj": a.mla.kv_a}
    else:
        attn = {"qkv_proj": a.qkv} if a.qkv is not None else {"q_proj": a.q, "k_proj": a.k, "v_proj": a.v}
    m = layer.mlp
    mlp = {} if m is None else {"up_proj": m.up, **({"gate_proj": m.gate} if m.gate is not None else {})}
    return attn, mlp


def _unchanged(lins: dict[str, nn.Linear]) -> tuple[dict, dict]:
    """An input refit's linears, compared against keeping them as they are (every column)."""
    return lins, {k: list(range(lin.in_features)) for k, lin in lins.items()}


def _attention(refit: Refit, layer: Layer, structure: Structure, plan: Plan, depth: bool) -> None:
    i, a = layer.index, layer.attn
    if depth:
        refit(*_unchanged(_input_linears(layer)[0]))
    cut_attention(layer, structure, plan, heads=False)  # MLA latent ranks first: q_b / kv_b read them
    if i in plan.keep_latent:
        keep = plan.keep_latent[i]
        lins = {"kv_b_proj": a.mla.kv_b, **({"q_b_proj": a.mla.q_b} if "q" in keep else {})}
        refit(lins, {"kv_b_proj": keep["kv"], "q_b_proj": keep.get("q")})
    if i in plan.keep_heads:
        cut_attention(layer, structure, plan, latent=False)
        keep = unit_rows(plan.keep_heads[i], a.mla.v_dim if a.mla is not None else a.head_dim)
        refit({"o_proj": a.o}, {"o_proj": keep}, subset=True)


def _mlp(refit: Refit, layer: Layer, plan: Plan, depth: bool) -> None:
    i = layer.index
    m = layer.mlp or (layer.moe.shared if layer.moe is not None else None)
    if depth and layer.mlp is not None:
        refit(*_unchanged(_input_linears(layer)[1]))
    routed = i in plan.keep_expert_channels
    if routed:  # each routed expert's down_proj input Gram, on its tokens, before the cut
        stats = ExpertStats.down_grams(layer.moe.experts)
        full = layer.moe.experts.down_proj.data.clone()
        observe(layer.module, refit.inputs, {}, experts={name_of(layer.module, layer.moe.experts): stats})
    cut_mlp(layer, plan)
    if i in plan.keep_channels and m is not None:
        refit({"down_proj": m.down}, {"down_proj": plan.keep_channels[i]}, subset=True)
    if routed:
        refit.errors["experts.down_proj"] = _refit_experts(layer, plan, stats, full, refit.damp)


@torch.no_grad()
def reconstruct(model: nn.Module, structure: Structure, plan: Plan, blocks: torch.Tensor, batch_size: int,
                damp: float, log=None, target: str = "layer", depth: bool = False, bias: tuple[str, ...] = (),
                work_dir=None) -> nn.Module:
    """Apply `plan` layer by layer, refitting what read removed units (see the module docstring) on
    calibration `blocks`; the errors land in plan.reconstructed. `bias`: of "o_proj" / "down_proj",
    the refits that get an intercept (the plan's config must carry the flags that give them one)."""
    device = next(model.parameters()).device
    progress = Progress(work_dir)
    start = progress.finished() + 1
    if start:
        pruned, teacher = progress.inputs(device)
        if log is not None:
            log.info("resuming the refit after layer %d", start - 1, extra={"event": "resume", "layer": start})
    else:
        pruned = capture(model, model.get_submodule(structure.family.layers), blocks, batch_size, device)
        teacher = pruned if target == "model" or depth else None  # the unpruned model's stream
    after_drop = False
    for layer in structure.layers:
        i = layer.index
        if i in plan.drop_layers:
            after_drop = True
            if i >= start and teacher is not None:
                teacher = forward(layer.module, teacher)  # removed here, not in the unpruned model
            continue
        if i < start:  # refit before a kill: cut to the saved shapes, then load the saved weights
            cut_attention(layer, structure, plan)
            cut_mlp(layer, plan)
            add_zero_biases(layer, structure, plan)
            plan.reconstructed.update(progress.restore(i, layer.module)[0])
            after_drop = False
            continue
        unpruned = copy.deepcopy(layer.module)
        # after removed layers, depth refits read from the unpruned stream and the layer targets it
        whole = target == "model" or (depth and after_drop)
        refit = Refit(layer, pruned, unpruned, teacher if whole else pruned, damp, bias)
        _attention(refit, layer, structure, plan, depth and after_drop)
        if not whole:  # the MLP's reference reads the refit attention's output
            refit.reference(copy.deepcopy(layer.module), pruned)
        _mlp(refit, layer, plan, depth and after_drop)
        add_zero_biases(layer, structure, plan)
        done = {k: v for k, v in refit.errors.items()}
        if done:
            plan.reconstructed[i] = done
            if log is not None:
                log.info("layer %d refit: %s", i, ", ".join(f"{k} error {v['error_cut']:.4f} → {v['error_refit']:.4f}"
                                                          for k, v in done.items()),
                         extra={"event": "reconstructed", "layer": i, **{k: v["error_refit"] for k, v in done.items()}})
        if teacher is not None:
            teacher = forward(unpruned, teacher)
        pruned = forward(layer.module, pruned)
        after_drop = False
        progress.save(i, layer.module, {i: done} if done else {}, [], (pruned, teacher))
    return finish(model, structure, plan)
