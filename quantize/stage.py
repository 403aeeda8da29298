"""`rtn`, `awq`, `gptq`, `int8`, `fp`: quantize the linears of a model in place and mark them for saving.

    dsc.quantize.apply_awq(model, AWQConfig(group_size=64), ctx)      # or apply_rtn / apply_gptq / ...

Every calibrated stage is the same loop (`_layerwise`) with a different `Plan`: which scales are
folded first (AWQ, SmoothQuant or none) and how weights are then rounded (dsc.quantize.rounding:
round to nearest, AWQ's clipping search, GPTQ) onto an integer or floating-point grid.

Calibrated stages run one decoder layer at a time (dsc.quantize.calibrate): peak memory is the
model plus one layer's inputs for the calibration set. Fused MoE experts count as linears (one
per expert and projection; dsc.quantize.experts); W8A8 keeps them weight-only (their activations
are not quantized: the fused experts' forward has no place to do it).
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn

from dsc.errors import FieldError
from dsc.quantize import ct
from dsc.quantize.calibrate import capture, forward, placed
from dsc.quantize.config import (AWQConfig, FloatConfig, GPTQConfig, GPTQKnobs, GridConfig, Int8Config, RTNConfig,
                                 SensitivityConfig, TargetsConfig)
from dsc.quantize.fp import FloatGrid
from dsc.quantize.grid import Grid
from dsc.quantize.experts import QuantizedExperts, is_fused, quantize_experts
from dsc.quantize.grid import to_grid
from dsc.quantize.layerwise import Plan, quantize_layer
from dsc.quantize.progress import Progress
from dsc.quantize.rounding import Rounding, shared_global_scale
from dsc.stages import StageOutput
from dsc.structure import describe


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return type(module).__name__ == pattern or name == pattern or name.endswith("." + pattern)


def select(model: nn.Module, cfg: TargetsConfig) -> tuple[list[str], list[str]]:
    """Full names of the linears, and of the fused MoE experts modules, that `targets` name and
    `ignore` does not (the "Linear" target takes fused experts too: each is a stack of linears);
    patterns matching nothing are errors rather than silently skipped weights."""
    modules = dict(model.named_modules())
    for key in ("targets", "ignore"):
        for pattern in getattr(cfg, key):
            if not any(matches(pattern, n, m) for n, m in modules.items()):
                raise FieldError(key, f"{pattern!r} matches no module of this model; names look like "
                                      f"{', '.join(n for n, m in modules.items() if isinstance(m, nn.Linear))[:160]}…")
    ignored = {n for n, m in modules.items() if any(matches(p, n, m) for p in cfg.ignore)}
    chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in ignored
              and any(matches(p, n, m) for p in cfg.targets)]
    experts = [n for n, m in modules.items() if is_fused(m) and n not in ignored
               and any(p == "Linear" or matches(p, n, m) for p in cfg.targets)]
    if not chosen:
        raise FieldError("targets", f"no linear left to quantize: targets {cfg.targets} minus ignore {cfg.ignore}"
                                    + (" (fused experts alone cannot make a compressed-tensors checkpoint: keep at "
                                       "least one linear)" if experts else ""))
    return chosen, experts


def scale_dtype(cfg) -> str | None:
    return None if cfg.scale_dtype == "weight" else cfg.scale_dtype


def grid_for(cfg: GridConfig | FloatConfig, model: nn.Module, names: list[str], experts: list[str] = ()
             ) -> Grid | FloatGrid:
    """The stage's grid, checked against every target's width before any work is done."""
    if isinstance(cfg, FloatConfig):
        grid = FloatGrid.named(cfg.scheme)
    else:
        grid = Grid(cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype(cfg))
    for name in names:  # every width is checked before any work is done
        grid.group(model.get_submodule(name).in_features, name)
    for name in experts:
        for param in ("gate_up_proj", "down_proj"):
            grid.group(getattr(model.get_submodule(name), param).shape[2], f"{name}.{param}")
    return grid


def check_untied(model: nn.Module, names: list[str]) -> None:
    """A target sharing its weight with the input embedding (tied LM head) is refused: quantizing
    it would quantize the embedding too."""
    embedding = model.get_input_embeddings().weight
    for name in names:
        if model.get_submodule(name).weight is embedding:
            raise FieldError("ignore", f"{name} shares its weight with the input embedding "
                                       "(tie_word_embeddings): keep it in ignore")


def _rtn(model: nn.Module, names: list[str], grid: Grid, experts: list[str] = (), grids: dict | None = None) -> dict:
    """Round to nearest; `grids`: full name → another grid for that linear (a scheme group)."""
    grids, outer = grids or {}, {}
    global_scaled = any(hasattr(g, "global_scale") for g in {grid, *grids.values()})
    for fused in _shared_inputs(model) if global_scaled else ():  # NVFP4: one global scale for q/k/v, gate/up
        chosen = [n for n in fused if n in names and grids.get(n, grid) == grids.get(fused[0], grid)]
        g = shared_global_scale([model.get_submodule(n).weight for n in chosen], grids.get(chosen[0], grid)) \
            if len(chosen) > 1 else None
        outer.update(dict.fromkeys(chosen, g))
    done = {name: to_grid(model.get_submodule(name).weight, grids.get(name, grid), outer=outer.get(name))
            for name in names}
    return {**done, **{name: quantize_experts(model.get_submodule(name), grid) for name in experts}}


def _shared_inputs(model: nn.Module) -> list[list[str]]:
    """Names of the linears that read one input, from the structure: q/k/v and gate/up."""
    structure = describe(model)
    names = {id(m): n for n, m in model.named_modules()}
    sets = []
    for layer in structure.layers:
        attn, mlps = layer.attn, [layer.mlp] + ([layer.moe.shared] if layer.moe is not None else [])
        sets.append([names[id(m)] for m in (attn.q, attn.k, attn.v) if m is not None])
        sets += [[names[id(m)] for m in (mlp.gate, mlp.up) if m is not None] for mlp in mlps if mlp is not None]
    return sets


def _outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device):
    """Everything but the decoder layers (embeddings, rotary tables, final norm, head)."""
    inside = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside:
            t.data = t.data.to(device)


def _layerwise(model, cfg, ctx, names: list[str], plan: Plan) -> tuple[dict, list]:
    structure = describe(model)
    layers = model.get_submodule(structure.family.layers)
    device = torch.device(cfg.calibration_device) if cfg.calibration_device else ctx.device
    progress = Progress(ctx.work_dir)
    start = progress.finished() + 1
    if start:
        inputs = progress.inputs(device)
        ctx.log.info("resuming calibration after layer %d", start - 1, extra={"event": "resume", "layer": start})
    else:
        inputs = _capture(model, layers, cfg, ctx, device)
    done, searches, t0 = {}, [], time.perf_counter()
    for layer in structure.layers:
        prefix = layer.path + "."
        if layer.index < start:
            got, found = progress.restore(layer.index, layer.module)
        else:
            targets = {n[len(prefix):] for n in names if n.startswith(prefix)}
            with placed(layer.module, device):
                got, found, outputs = quantize_layer(layer, inputs, targets, plan)
                inputs = forward(layer.module, inputs) if cfg.propagate else outputs
            progress.save(layer.index, layer.module, got, found, inputs)
            ctx.log.info("quantized layer %d/%d (%.1f s)", layer.index + 1, len(structure.layers),
                         time.perf_counter() - t0, extra={"event": "quantized_layer", "layer": layer.index})
        done.update({prefix + n: q for n, q in got.items()})
        searches += [{"layer": layer.index, **s} for s in found]
    rest = [n for n in names if n not in done]  # outside the decoder layers (an untied LM head)
    if rest and any(plan.grids.get(n, plan.grid) in plan.static_grids for n in rest):
        raise FieldError("ignore", f"{rest} lie outside the decoder layers, where calibration records no input "
                                   "scale: add them to `ignore`")
    done.update(_rtn(model, rest, plan.grid, grids=plan.grids))
    return done, searches


def _blocks(cfg, ctx):
    """The calibration blocks a stage reads: `num_samples` of its source's split."""
    return ctx.data[cfg.data or ctx.data.default()].blocks(cfg.split)[: cfg.num_samples]


def _capture(model, layers, cfg, ctx, device):
    blocks = _blocks(cfg, ctx)
    home = next(model.parameters()).device
    _outside_layers(model, layers, device)
    try:
        return capture(model, layers, blocks, cfg.batch_size, device)
    finally:
        _outside_layers(model, layers, home)


def _finish(model, done: dict, cfg: TargetsConfig, activations: str | bool | None, extra: dict,
            modes: dict | None = None) -> StageOutput:
    ct.attach(model, done, activations, cfg.format, modes)
    experts = {n: q for n, q in done.items() if isinstance(q, QuantizedExperts)}
    metrics = {"quantized_linears": len(done) - len(experts), "scheme": ct.describe(model)}
    if experts:
        metrics["quantized_experts"] = sum(q.gate_up.scale.shape[0] for q in experts.values())
    return StageOutput(model, {**metrics, **extra})


def _fallback(done: dict) -> dict:
    """Experts no calibration token reached (rounded to nearest), as `model.layers.2.mlp.experts[5]`."""
    names = [f"{n}[{e}]" for n, q in done.items() if isinstance(q, QuantizedExperts) for e in q.no_tokens]
    return {"experts_rtn_fallback": names} if any(isinstance(q, QuantizedExperts) for q in done.values()) else {}


def scheme_grids(cfg, model: nn.Module, names: list[str]) -> tuple[dict[str, Grid | FloatGrid], dict]:
    """The linears the stage's `schemes` take (full name → grid; the first group matching a linear
    takes it) and each grid's activation mode (None: weight-only); the stage's own grid is the
    default. A group that takes no linear, or a width its grid does not divide, is an error."""
    modules, grids, modes = dict(model.named_modules()), {}, {}
    for i, group in enumerate(getattr(cfg, "schemes", ())):
        grid = (FloatGrid.named(group.scheme) if group.scheme != "int"
                else Grid(group.bits, group.group_size, group.symmetric, scale_dtype(cfg)))
        taken = [n for n in names if n not in grids and any(matches(p, n, modules[n]) for p in group.targets)]
        if not taken:
            raise FieldError(f"schemes[{i}].targets", f"{group.targets} take none of the stage's linears (those an "
                                                      "earlier group took included)")
        for n in taken:
            grid.group(modules[n].in_features, n)
        mode = None if group.act_mode == "none" else group.act_mode
        if modes.get(grid, mode) != mode:
            raise FieldError(f"schemes[{i}].activations", "two groups with one grid need one activation mode")
        modes[grid] = mode
        grids.update(dict.fromkeys(taken, grid))
    return grids, modes


def _modes(default_grid, default_mode: str | None, modes: dict) -> dict:
    if default_grid in modes and modes[default_grid] != default_mode:
        raise FieldError("schemes", "a scheme group repeats the stage's own grid with other activations: merge them")
    return {default_grid: default_mode, **modes}


def _static(modes: dict) -> tuple:
    """The grids whose linears record a static input scale from calibration."""
    return tuple(g for g, m in modes.items() if m == "static")


def _targets(model, cfg, mode: str | None = None) -> tuple[list[str], list[str], Grid | FloatGrid, dict, dict]:
    """What a quantizer works on: its linears and fused experts, its grid, the scheme groups' grids
    (full name → grid) and every grid's activation mode (`mode`: the stage grid's)."""
    names, experts = select(model, cfg)
    check_untied(model, names)
    grid = grid_for(cfg, model, names, experts)
    grids, modes = scheme_grids(cfg, model, names)
    return names, experts, grid, grids, _modes(grid, mode, modes)


def _uncalibrated(modes: dict) -> None:
    if _static(modes):
        raise FieldError("schemes", "static activations need calibration data: use the `fp` or `gptq` stage, or "
                                    "activations: dynamic / none")


def apply_rtn(model, cfg: RTNConfig, ctx) -> StageOutput:
    names, experts, grid, grids, modes = _targets(model, cfg)
    _uncalibrated(modes)
    return _finish(model, _rtn(model, names, grid, experts, grids), cfg, None, {}, modes)


def apply_awq(model, cfg: AWQConfig, ctx, round_weights: bool = True) -> StageOutput:
    """AWQ; `round_weights=False` searches and folds the scales and clipping but leaves the weights
    in float, with their grids attached: the start of quantization-aware training."""
    names, experts = select(model, cfg)
    check_untied(model, names)
    plan = Plan(grid_for(cfg, model, names, experts), "awq", n_grid=cfg.n_grid, duo=cfg.duo_scaling,
                rounding=Rounding("clip" if cfg.clip else "rtn", n_grid=cfg.n_grid),
                module_loss=cfg.loss == "module", loss_batches=max(1, -(-cfg.loss_samples // cfg.batch_size)),
                round=round_weights)
    t0 = time.perf_counter()
    done, searches = _layerwise(model, cfg, ctx, names + experts, plan)
    return _finish(model, done, cfg, False, {"seconds": round(time.perf_counter() - t0, 2), **_summary(searches),
                                             **_fallback(done)})


def _summary(searches: list[dict]) -> dict:
    """Stage metrics from the per-layer records: AWQ's scale searches (loss against plain rounding)
    and the roundings' output errors on the calibration tokens (against round-to-nearest)."""
    scaled = [s for s in searches if "ratio" in s]
    rounded = [s for s in searches if "error" in s]
    out = {}
    if scaled:
        gains = [s["loss"] / s["loss_rtn"] for s in scaled if s["loss_rtn"] > 0]
        out.update(scaled_groups=sum(s["ratio"] is not None for s in scaled), searched_groups=len(scaled),
                   mean_loss_vs_rtn=round(sum(gains) / max(len(gains), 1), 4))
    if rounded:
        gains = [s["error"] / s["error_rtn"] for s in rounded if s["error_rtn"] > 0]
        out["mean_error_vs_rtn"] = round(sum(gains) / max(len(gains), 1), 4)
    return out


def apply_gptq(model, cfg: GPTQConfig, ctx) -> StageOutput:
    """GPTQ (with `awq_scales`: AWQ's scales searched and folded first, then GPTQ)."""
    names, experts, grid, grids, modes = _targets(model, cfg)
    plan = Plan(grid, "awq" if cfg.awq_scales else None, n_grid=cfg.n_grid,
                duo=cfg.duo_scaling, module_loss=cfg.loss == "module",
                loss_batches=max(1, -(-cfg.loss_samples // cfg.batch_size)), rounding=_gptq(cfg, cfg.clip),
                grids=grids, static_grids=_static(modes))
    t0 = time.perf_counter()
    done, searches = _layerwise(model, cfg, ctx, names + experts, plan)
    return _finish(model, done, cfg, None, {"seconds": round(time.perf_counter() - t0, 2), **_summary(searches),
                                            **_fallback(done)}, modes)


def _gptq(cfg: GPTQKnobs, clip: bool = False) -> Rounding:
    return Rounding("gptq", n_grid=getattr(cfg, "n_grid", 20), clip=clip, damp=cfg.dampening,
                    block_size=cfg.block_size, act_order=cfg.act_order)


def apply_float(model, cfg: FloatConfig, ctx) -> StageOutput:
    """FP8 (per channel or 128×128 blocks), NVFP4, MXFP4 weights, activations dynamic or static."""
    mode = None if cfg.act_mode == "none" else cfg.act_mode
    names, experts, grid, grids, modes = _targets(model, cfg, mode)
    if experts:
        raise FieldError("ignore", f"fused MoE experts ({experts[0]}, …) are not yet saved in {cfg.scheme}: add "
                                   "\"re:.*experts\" to ignore (their linears can be; or use gptq / rtn / awq)")
    if grid.block and mode:  # compressed-tensors quantizes the activations in groups of 128 at run time
        narrow = [n for n in names if model.get_submodule(n).in_features % grid.block[1]]
        if narrow:
            raise FieldError("activations", f"fp8-block quantizes inputs in groups of {grid.block[1]}, which does not "
                                            f"divide the inputs of {len(narrow)} targets ({narrow[0]}: "
                                            f"{model.get_submodule(narrow[0]).in_features}): use activations: none "
                                            "(weight blocks pad), scheme: fp8, or add them to `ignore`")
    t0 = time.perf_counter()
    if cfg.needs_data:
        plan = Plan(grid, None, rounding=_gptq(cfg) if cfg.gptq else Rounding("rtn"), grids=grids,
                    static_grids=_static(modes))
        done, searches = _layerwise(model, cfg, ctx, names + experts, plan)
    else:
        done, searches = _rtn(model, names, grid, experts, grids), []
    extra = {"seconds": round(time.perf_counter() - t0, 2), **_summary(searches), **_fallback(done)}
    return _finish(model, done, cfg, mode, extra, modes)


def apply_int8(model, cfg: Int8Config, ctx) -> StageOutput:
    if cfg.backend == "bitsandbytes":
        from dsc.quantize.bnb import int8_model

        return StageOutput(int8_model(model, cfg, ctx), {"backend": "bitsandbytes LLM.int8"})
    names, experts = select(model, cfg)
    check_untied(model, names)
    grid = Grid(8, None, True, scale_dtype(cfg))
    if cfg.needs_data:
        done, _ = _layerwise(model, cfg, ctx, names + experts, Plan(grid, "smooth", alpha=cfg.smoothing))
    else:
        done = _rtn(model, names, grid, experts)
    extra = {"smoothing": cfg.smoothing if cfg.needs_data else None}
    if experts and cfg.mode == "w8a8":
        extra["experts_w8a8"] = ("weight-only int8: the fused experts' forward has no place to quantize their "
                                 "inputs, and transformers loads fused experts weight-only")
    return _finish(model, done, cfg, cfg.mode == "w8a8", extra)


def apply_sensitivity(model, cfg: SensitivityConfig, ctx) -> StageOutput:
    """The `sensitivity` stage: measure, write the table and the suggestion; the model is unchanged."""
    import json

    from dsc.quantize.sensitivity import markdown, sensitivity, suggest

    names, _ = select(model, cfg)
    t0 = time.perf_counter()
    rows = sensitivity(model, cfg.candidates, _blocks(cfg, ctx), cfg.batch_size, names)
    top = suggest(rows, cfg.candidates[0], cfg.candidates[-1], cfg.top) if len(cfg.candidates) > 1 else {}
    metrics = {"seconds": round(time.perf_counter() - t0, 2), "linears": len({r["linear"] for r in rows}),
               "most_sensitive": top.get("targets", [])[:cfg.top], "suggested_schemes": [top] if top else []}
    if ctx.artifact_dir is not None:
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
        report = ctx.artifact_dir / cfg.file
        report.with_suffix(".json").write_text(json.dumps({"rows": rows, "suggestion": top}, indent=1))
        report.write_text(markdown(rows, cfg.candidates, top))
    return StageOutput(model, metrics)
