"""`rtn`, `awq`, `int8`: quantize the linears of a model in place and mark them for saving.

    dsc.quantize.apply_awq(model, AWQConfig(group_size=64), ctx)      # or apply_rtn / apply_int8

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
from dsc.quantize.config import AWQConfig, GridConfig, Int8Config, RTNConfig, TargetsConfig
from dsc.quantize.grid import Grid
from dsc.quantize.experts import QuantizedExperts, is_fused, quantize_experts
from dsc.quantize.grid import to_grid
from dsc.quantize.layerwise import Plan, quantize_layer
from dsc.quantize.progress import Progress
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


def _grid(cfg: GridConfig, model: nn.Module, names: list[str], experts: list[str] = ()) -> Grid:
    grid = Grid(cfg.bits, cfg.group_size, cfg.symmetric, scale_dtype(cfg))
    for name in names:  # every width is checked before any work is done
        grid.group(model.get_submodule(name).in_features, name)
    for name in experts:
        for param in ("gate_up_proj", "down_proj"):
            grid.group(getattr(model.get_submodule(name), param).shape[2], f"{name}.{param}")
    return grid


def _untied(model: nn.Module, names: list[str]) -> None:
    embedding = model.get_input_embeddings().weight
    for name in names:
        if model.get_submodule(name).weight is embedding:
            raise FieldError("ignore", f"{name} shares its weight with the input embedding "
                                       "(tie_word_embeddings): keep it in ignore")


def _rtn(model: nn.Module, names: list[str], grid: Grid, experts: list[str] = ()) -> dict:
    done = {name: to_grid(model.get_submodule(name).weight, grid) for name in names}
    return {**done, **{name: quantize_experts(model.get_submodule(name), grid) for name in experts}}


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
    done.update(_rtn(model, rest, plan.grid))
    return done, searches


def _capture(model, layers, cfg, ctx, device):
    blocks = ctx.data[cfg.data or ctx.data.default()].blocks(cfg.split)[: cfg.num_samples]
    home = next(model.parameters()).device
    _outside_layers(model, layers, device)
    try:
        return capture(model, layers, blocks, cfg.batch_size, device)
    finally:
        _outside_layers(model, layers, home)


def _finish(model, done: dict, cfg: TargetsConfig, activations: bool, extra: dict) -> StageOutput:
    ct.attach(model, done, activations, cfg.format)
    experts = {n: q for n, q in done.items() if isinstance(q, QuantizedExperts)}
    metrics = {"quantized_linears": len(done) - len(experts), "scheme": ct.describe(model)}
    if experts:
        metrics["quantized_experts"] = sum(q.gate_up.scale.shape[0] for q in experts.values())
    return StageOutput(model, {**metrics, **extra})


def _fallback(done: dict) -> dict:
    """Experts no calibration token reached (rounded to nearest), as `model.layers.2.mlp.experts[5]`."""
    names = [f"{n}[{e}]" for n, q in done.items() if isinstance(q, QuantizedExperts) for e in q.no_tokens]
    return {"experts_rtn_fallback": names} if any(isinstance(q, QuantizedExperts) for q in done.values()) else {}


def apply_rtn(model, cfg: RTNConfig, ctx) -> StageOutput:
    names, experts = select(model, cfg)
    _untied(model, names)
    return _finish(model, _rtn(model, names, _grid(cfg, model, names, experts), experts), cfg, False, {})


def apply_awq(model, cfg: AWQConfig, ctx, round_weights: bool = True) -> StageOutput:
    """AWQ; `round_weights=False` searches and folds the scales and clipping but leaves the weights
    in float, with their grids attached: the start of quantization-aware training."""
    names, experts = select(model, cfg)
    _untied(model, names)
    plan = Plan(_grid(cfg, model, names, experts), "awq", n_grid=cfg.n_grid, duo=cfg.duo_scaling, clip=cfg.clip,
                module_loss=cfg.loss == "module", loss_batches=max(1, -(-cfg.loss_samples // cfg.batch_size)),
                round=round_weights)
    t0 = time.perf_counter()
    done, searches = _layerwise(model, cfg, ctx, names + experts, plan)
    gains = [s["loss"] / s["loss_rtn"] for s in searches if s["loss_rtn"] > 0]
    return _finish(model, done, cfg, False, {
        "seconds": round(time.perf_counter() - t0, 2), "scaled_groups": sum(s["ratio"] is not None for s in searches),
        "searched_groups": len(searches), "mean_loss_vs_rtn": round(sum(gains) / max(len(gains), 1), 4),
        **_fallback(done)})


def apply_int8(model, cfg: Int8Config, ctx) -> StageOutput:
    if cfg.backend == "bitsandbytes":
        from dsc.quantize.bnb import int8_model

        return StageOutput(int8_model(model, cfg, ctx), {"backend": "bitsandbytes LLM.int8"})
    names, experts = select(model, cfg)
    _untied(model, names)
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
