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
A, C and ‖r Wᵀ‖² with no second pass over the data. With `bias`, the refit projection also gets an
intercept (FLAP's compensation, solved jointly: centred statistics give W', then b = W μ_r − W' μ_x).

What the reference sees (`target`):
- "layer": the unpruned layer on the pruned model's own inputs (attention first; the MLP's reference
  then reads the refit attention's output): each layer repairs only its own cut.
- "model": the unpruned model's layer on the unpruned model's inputs (a second stream of calibration
  activations, carried through the removed layers too): each refit also tries to correct what the
  layers before it got wrong. Measured far worse on held-out text (docs/benchmarks.md: least squares
  fits the pruned stream's drift on calibration text), so the stage does not offer it; the
  benchmark keeps it to show that.
`depth`: a layer right after removed ones also refits its input projections (q/k/v or MLA's q_a /
kv_a, and a dense MLP's gate/up) to read from its input what the unpruned model's layer read from
the unpruned stream; without it the layer reads a stream that skipped a layer.

Layer by layer (like the quantizers' calibration, dsc.quantize.calibrate): memory is the model, one
layer's calibration inputs and one projection's statistics at a time; a copy of the layer and a
second stream of inputs only where a refit reads the unpruned layer (a latent cut; "model"; depth,
up to the layer after the last removed one). With a `work_dir` every finished layer is saved, and
a run killed mid-model restarts after the last one (dsc.quantize.progress).
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
    total = torch.as_tensor(energy if total is None else total)
    return float(torch.as_tensor(err).clamp(min=0) / total.clamp(min=1e-30))


def output_error(weight: torch.Tensor, gram: torch.Tensor, keep: list[int], new: torch.Tensor) -> float:
    """‖x Wᵀ − x[:, K] W'ᵀ‖² / ‖x Wᵀ‖² from the Gram matrix (W' = `new`, out × |K|)."""
    g, w = gram.double(), weight.double()
    k = torch.as_tensor(keep, device=g.device)
    return error(w, new, g[k][:, k], g[k], ((w @ g) * w).sum())


class Paired:
    """Streaming statistics of one projection's input in the pruned layer (x, n × k) and in the
    reference (r, n × m), for its reference weight W (out, m). `keep`: x is exactly r[:, keep] (the
    cut removed columns and changed nothing else), so only rᵀr is accumulated and x is never read.
    `precise`: sums in float64 (an intercept centres them, which float32 sums of activations with a
    large mean, such as attention sinks, would not survive); otherwise float32, as calibration does."""

    def __init__(self, weight: torch.Tensor, keep: list[int] | None = None, precise: bool = False):
        self.w, self.keep, self.precise = weight, keep, precise
        self.a = self.c = self.mx = self.mr = None
        self.energy, self.n = 0.0, 0

    def add(self, x: torch.Tensor | None, r: torch.Tensor) -> None:
        dtype = torch.float64 if self.precise or r.dtype == torch.float64 else torch.float32
        r = r.reshape(-1, r.shape[-1]).to(dtype)  # (n, m)
        x = r if self.keep is not None else x.reshape(-1, x.shape[-1]).to(dtype)  # (n, k); a subset: A, C from rᵀr
        if self.a is None:
            self.mx, self.mr = x.new_zeros(x.shape[1], dtype=torch.float64), r.new_zeros(r.shape[1], dtype=torch.float64)
            self.a = x.new_zeros(x.shape[1], x.shape[1])
            self.c = None if self.keep is not None else x.new_zeros(x.shape[1], r.shape[1])
        self.a.addmm_(x.T, x)
        if self.c is not None:
            self.c.addmm_(x.T, r)
            self.energy += float((r @ self.w.to(dtype).T).double().pow(2).sum())
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
def paired(layer: nn.Module | None, inputs, ref: nn.Module, ref_inputs, stats: dict[str, Paired]) -> None:
    """Run `ref` on `ref_inputs` (and `layer` on `inputs`, unless every statistic is a plain subset)
    batch by batch, and add what each linear named in `stats` (the same name in both) reads."""
    got: dict[tuple[int, str], torch.Tensor] = {}
    both = any(st.keep is None for st in stats.values())

    def grab(side: int, name: str):
        def hook(_module, args):
            got[side, name] = args[0]
        return hook

    sides = (layer if both else None, ref)
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
    """One layer's refits. The reference is either the layer itself before each cut (`ref` None:
    the common case, every refit a plain subset read off rᵀr, no copy of the layer), or `ref`, a
    copy of the unpruned layer run on `ref_inputs` (a latent cut, the unpruned model's stream)."""

    def __init__(self, layer: Layer, inputs, damp: float, bias: tuple[str, ...], ref: nn.Module | None = None,
                 ref_inputs=None):
        self.layer, self.inputs, self.damp, self.bias, self.errors = layer, inputs, damp, bias, {}
        self.reference(ref, ref_inputs)

    def reference(self, ref: nn.Module | None, ref_inputs=None) -> None:
        self.ref = ref
        self.ref_inputs = ref_inputs if ref_inputs is not None else self.inputs
        # a plain subset is exact while the layer reads what the reference reads, and nothing refit
        # in it yet has changed that
        self.exact = self.ref_inputs is self.inputs

    def __call__(self, lins: dict[str, nn.Linear], keep: dict[str, list[int]], cut=None, subset: bool = False) -> None:
        """Run `cut` (if any), then refit every linear in `lins` (key → module of the cut layer) from one
        paired pass. `keep`: the reference's columns the plain cut keeps (what the error is compared
        against); `subset`: the cut only removes those columns, so while `exact` the statistics are
        read before the cut from the layer itself."""
        names = {k: name_of(self.layer.module, lin) for k, lin in lins.items()}
        exact = subset and self.exact
        if exact:
            full = {k: (lin.weight.data.clone(), None if lin.bias is None else lin.bias.data.clone())
                    for k, lin in lins.items()}
            stats = {names[k]: Paired(full[k][0], keep[k], precise=k in self.bias) for k in lins}
            paired(None, self.inputs, self.layer.module, self.inputs, stats)
        else:
            if self.ref is None:
                raise RuntimeError("dsc bug: a refit that is not a plain subset needs a copy of the unpruned layer")
            full = {k: (self.ref.get_submodule(n).weight.data, self.ref.get_submodule(n).bias) for k, n in names.items()}
        if cut is not None:
            cut()
        if not exact:
            stats = {names[k]: Paired(full[k][0], None, precise=k in self.bias) for k in lins}
            paired(self.layer.module, self.inputs, self.ref, self.ref_inputs, stats)
        for key, lin in lins.items():
            self._solve(key, lin, stats[names[key]], *full[key], keep[key])
        self.exact = False

    def _solve(self, key: str, lin: nn.Linear, st: Paired, weight, bias, keep: list[int]) -> None:
        intercept = key in self.bias
        plain_stats = st.means(centred=False)
        a, c, energy, mx, mr = st.means(centred=True) if intercept else plain_stats
        w = weight.double()
        new = fit(w, a, c, self.damp)
        plain = error(w, w[:, keep], *plain_stats[:3])  # the plain cut: no refit, no intercept
        refit = error(w, new, a, c, energy, plain_stats[2] if intercept else None)
        lin.weight.data.copy_(new.to(lin.weight.dtype))
        if intercept:  # b = b_ref + W μ_r − W' μ_x
            b = w @ mr - new @ mx + (bias.data.double() if bias is not None else 0)
            lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
        self.errors[key] = {"error_cut": round(plain, 6), "error_refit": round(refit, 6)}


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
    """The projections that read the residual stream (through a norm), by their names in the layer:
    attention's (q/k/v, fused qkv, or MLA's q_a or q_proj and kv_a), a dense MLP's gate/up."""
    a, m = layer.attn, layer.mlp
    if a.mla is not None:
        attn = [a.mla.q_a if a.mla.q_a is not None else a.mla.q_b, a.mla.kv_a]
    else:
        attn = [a.qkv] if a.qkv is not None else [a.q, a.k, a.v]
    mlp = [] if m is None else [lin for lin in (m.gate, m.up) if lin is not None]
    key = lambda lin: name_of(layer.module, lin).rpartition(".")[2]  # noqa: E731
    return {key(lin): lin for lin in attn}, {key(lin): lin for lin in mlp}


def _unchanged(lins: dict[str, nn.Linear]) -> tuple[dict, dict]:
    """An input refit's linears, compared against keeping them as they are (every column)."""
    return lins, {k: list(range(lin.in_features)) for k, lin in lins.items()}


def _attention(refit: Refit, layer: Layer, structure: Structure, plan: Plan, depth: bool) -> None:
    i, a = layer.index, layer.attn
    if depth:
        refit(*_unchanged(_input_linears(layer)[0]))
    if i in plan.keep_latent:  # MLA latent ranks first: q_b / kv_b read them, the norm sees fewer
        keep = plan.keep_latent[i]
        lins = {"kv_b_proj": a.mla.kv_b, **({"q_b_proj": a.mla.q_b} if "q" in keep else {})}
        refit(lins, {"kv_b_proj": keep["kv"], "q_b_proj": keep.get("q")},
              cut=lambda: cut_attention(layer, structure, plan, heads=False))
    if i in plan.keep_heads:
        keep = unit_rows(plan.keep_heads[i], a.mla.v_dim if a.mla is not None else a.head_dim)
        refit({"o_proj": a.o}, {"o_proj": keep}, cut=lambda: cut_attention(layer, structure, plan, latent=False),
              subset=True)


def _mlp(refit: Refit, layer: Layer, plan: Plan, depth: bool) -> None:
    """Dense MLP or shared expert(s): down_proj against the reference; routed experts: each on its own
    tokens in this layer (against the layer itself, also where the others follow the unpruned model's
    stream: routing differs between the two streams, so there is no token-by-token pairing)."""
    i = layer.index
    m = layer.mlp or (layer.moe.shared if layer.moe is not None else None)
    if depth and layer.mlp is not None:
        refit(*_unchanged(_input_linears(layer)[1]))
    routed = i in plan.keep_expert_channels
    if routed:  # each routed expert's down_proj input Gram, on its tokens, before the cut
        stats = ExpertStats.down_grams(layer.moe.experts)
        full = layer.moe.experts.down_proj.data.clone()
        observe(layer.module, refit.inputs, {}, experts={name_of(layer.module, layer.moe.experts): stats})
    if i in plan.keep_channels and m is not None:
        refit({"down_proj": m.down}, {"down_proj": plan.keep_channels[i]}, cut=lambda: cut_mlp(layer, plan),
              subset=True)
    else:
        cut_mlp(layer, plan)
    if routed:
        refit.errors["experts.down_proj"] = _refit_experts(layer, plan, stats, full, refit.damp)


def _restore(layer: Layer, structure: Structure, plan: Plan, progress: Progress) -> None:
    """A layer refit before a kill: cut to the saved shapes, then load the saved weights and errors."""
    cut_attention(layer, structure, plan)
    cut_mlp(layer, plan)
    add_zero_biases(layer, structure, plan)
    plan.reconstructed.update(progress.restore(layer.index, layer.module)[0])


def _refit_layer(layer: Layer, structure: Structure, plan: Plan, pruned, teacher, unpruned: nn.Module | None,
                 damp: float, bias: tuple[str, ...], whole: bool, depth: bool) -> dict:
    """Cut and refit one kept layer; `whole`: every refit targets the unpruned layer on the unpruned
    model's stream `teacher` (after removed layers, with `depth`), else the layer on its own inputs.
    `unpruned`: a copy of the layer already made (None: made here only if a refit needs one)."""
    ref = unpruned
    if ref is None and (whole or layer.index in plan.keep_latent):
        ref = copy.deepcopy(layer.module)
    refit = Refit(layer, pruned, damp, bias, ref, teacher if whole else None)
    _attention(refit, layer, structure, plan, depth)
    if not whole:  # the MLP's reference: the layer itself, reading the refit attention's output
        refit.reference(None)
    _mlp(refit, layer, plan, depth)
    add_zero_biases(layer, structure, plan)
    return dict(refit.errors)


def _log(log, i: int, done: dict) -> None:
    if log is not None and done:
        log.info("layer %d refit: %s", i, ", ".join(f"{k} error {v['error_cut']:.4f} → {v['error_refit']:.4f}"
                                                  for k, v in done.items()),
                 extra={"event": "reconstructed", "layer": i, **{k: v["error_refit"] for k, v in done.items()}})


@torch.no_grad()
def reconstruct(model: nn.Module, structure: Structure, plan: Plan, blocks: torch.Tensor, batch_size: int,
                damp: float, log=None, target: str = "layer", depth: bool = False, bias: tuple[str, ...] = (),
                work_dir=None) -> nn.Module:
    """Apply `plan` layer by layer, refitting what read removed units (see the module docstring) on
    calibration `blocks`; the errors land in plan.reconstructed. `bias`: of "o_proj" / "down_proj",
    the refits that get an intercept (the plan's config must carry the flags that give them one).
    `work_dir`: keep per-layer progress there and resume from it."""
    progress = Progress(work_dir)
    start = progress.finished() + 1
    depth = depth and bool(plan.drop_layers)
    # the unpruned model's stream: for every layer with target "model", else up to the last
    # layer that follows a removed one
    needs_teacher = (lambda i: True) if target == "model" else (lambda i: depth and i <= max(plan.drop_layers) + 1)
    if start:
        pruned, teacher = progress.inputs(next(model.parameters()).device)
        if log is not None:
            log.info("resuming the refit at layer %d", start, extra={"event": "resume", "layer": start})
    else:
        pruned = capture(model, model.get_submodule(structure.family.layers), blocks, batch_size,
                         next(model.parameters()).device)
        teacher = pruned if needs_teacher(0) else None
    after_drop = False
    for layer in structure.layers:
        i = layer.index
        if i in plan.drop_layers:
            after_drop = True
            if i >= start and teacher is not None:
                teacher = forward(layer.module, teacher)  # removed here, not in the unpruned model
            continue
        if i < start:
            _restore(layer, structure, plan, progress)
            after_drop = False
            continue
        unpruned = copy.deepcopy(layer.module) if teacher is not None else None
        whole = target == "model" or (depth and after_drop)
        done = _refit_layer(layer, structure, plan, pruned, teacher, unpruned, damp, bias, whole, depth and after_drop)
        if done:
            plan.reconstructed[i] = done
            _log(log, i, done)
        teacher = forward(unpruned, teacher) if teacher is not None and needs_teacher(i + 1) else None
        pruned = forward(layer.module, pruned)
        after_drop = False
        progress.save(i, layer.module, {i: done} if done else {}, [], (pruned, teacher))
    return finish(model, structure, plan)
