"""The compressed-tensors adapter: every compressed-tensors call of dsc is in this file.

A quantized dsc model in memory is what transformers builds when it loads a compressed-tensors
checkpoint: float weights that lie on the grid, with `quantization_scheme`, `weight_scale` and
`weight_zero_point` on every quantized linear and status DECOMPRESSED (weights are not
re-quantized each forward; W8A8's dynamic per-token activation quantization does run). Saving
packs the integer codes (`weight_packed` int32 for 4-bit, int8 `weight` for W8A8), writes
`quantization_config` into config.json exactly as llm-compressor does, and restores the model.

Fused MoE experts (transformers 5 keeps each layer's routed experts as two 3-D tensors, which are
no nn.Linear and which compressed-tensors does not quantize) are marked with a
dsc.quantize.experts.QuantizedExperts record instead. They are saved the way llm-compressor saves
MoE models and transformers 5.23 loads them: one pack-quantized linear per expert and projection
under the checkpoint's own per-expert names (`mlp.experts.3.gate_proj.weight_packed`,
`weight_scale`, `weight_shape`; Mixtral: `block_sparse_moe.experts.3.w1…`), found by running the
model's conversion mapping backwards; on load transformers' CompressedTensorsDequantize unpacks
them and fuses them again, so the reloaded experts are floats on the very same grid. What that
loader reads decides the rest:
- it reads only `weight_packed` for experts: experts stay weight-only pack-quantized even when the
  linears are W8A8 (int-quantized), under a second config group that targets them;
- it passes no zero point to the unpacking: experts on an asymmetric grid, and experts left in
  float (`ignore`), are saved as the fused float tensors (an extra safetensors shard), which load
  as they are. Asymmetric experts are then no smaller on disk than float ones (stage metrics say so).
A per-expert float `weight` in a compressed-tensors checkpoint does not load in transformers 5.23
(its dequantize step returns nothing for it), which is why float experts are never split.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from dsc import hf
from dsc.quantize.experts import ATTR, QuantizedExperts, is_fused
from dsc.quantize.fp import FloatGrid
from dsc.quantize.grid import Grid, Quantized

EXPERTS_TARGET = "re:.*\\.experts\\.\\d+\\..*"  # the per-expert linears of the checkpoint (no module in memory)


PRESETS = {"fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "nvfp4": "NVFP4", "mxfp4": "MXFP4"}


@lru_cache(maxsize=None)
def _preset(name: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(PRESETS[name], ["Linear"])


def _args(grid: Grid | FloatGrid):
    from compressed_tensors.quantization import QuantizationArgs

    if isinstance(grid, FloatGrid):
        return _preset(grid.name).weights
    return QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.symmetric,
                            strategy="channel" if grid.group_size is None else "group", group_size=grid.group_size)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor scale for a tensor whose largest |value| is `amax` (generate_gparam)."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    return generate_gparam(-amax.reshape(1), amax.reshape(1)).float()


def float_scale(amax: torch.Tensor, grid: FloatGrid, global_scale: torch.Tensor | None) -> torch.Tensor:
    """The scale compressed-tensors takes for groups whose largest |value| is `amax` — before NVFP4's
    division by the global scale (rounded to E4M3 there; a power of two for MXFP4)."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scale, _ = calculate_qparams(-amax, amax, _args(grid), global_scale=global_scale)
    return scale.float()


def round_float(x: torch.Tensor, grid: FloatGrid) -> torch.Tensor:
    """`x` (already divided by its scale) clamped and rounded to the grid's element type, as float32."""
    from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
    from compressed_tensors.quantization.utils.helpers import calculate_range

    lo, hi = calculate_range(_args(grid), x.device)
    return round_to_quantized_type_args(x, _args(grid), lo, hi).float()


FLOAT_FORMATS = {"fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def _input_args(grid: Grid | FloatGrid, mode: str | None):
    """Input-activation args: None (weight-only); "dynamic": int8 per token (W8A8), FP8 per token
    (per 128-group with 128×128 weight blocks), MXFP4 per 32; "static": one scale per tensor from
    calibration (FP8), NVFP4's global input scale (its groups of 16 are scaled at run time)."""
    from compressed_tensors.quantization import QuantizationArgs

    if mode is None:
        return None
    if not isinstance(grid, FloatGrid):
        return _token_int8()
    if mode == "static" and grid.kind == "fp8":
        return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    return _preset(grid.name).input_activations


def _token_int8():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def _format(grid: Grid | FloatGrid, activations: str | None, fmt: str) -> str:
    if isinstance(grid, FloatGrid):
        return FLOAT_FORMATS[grid.kind]
    if fmt == "auto":  # asymmetric packed zero points do not load in transformers (llm-compressor #1618)
        return "int-quantized" if activations or not grid.symmetric else "pack-quantized"
    return fmt


def attach(model: nn.Module, done: dict[str, Quantized | QuantizedExperts], activations: str | bool | None = None,
           fmt: str = "auto", modes: dict | None = None) -> None:
    """Mark the linears in `done` (full module name → its grid and parameters) as quantized,
    in place, and record the fused experts' grids on them. `activations`: how the linears' inputs
    are quantized at run time (None: weight-only; "dynamic"; "static": scales in `Quantized.input_scale`);
    `modes`: grid → that, per grid. One config group per grid: `["Linear"]` when there is one,
    the linears' names when several (a non-uniform recipe)."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    for name, q in done.items():
        if isinstance(q, QuantizedExperts):
            setattr(model.get_submodule(name), ATTR, q)
    done = {n: q for n, q in done.items() if isinstance(q, Quantized)}
    activations = "dynamic" if activations is True else (activations or None)
    grids = list(dict.fromkeys(q.grid for q in done.values()))
    groups = {}
    for i, grid in enumerate(grids):
        mode = (modes or {}).get(grid, activations)
        names = [n for n, q in done.items() if q.grid == grid]
        groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(grids) == 1 else names, weights=_args(grid),
            input_activations=_input_args(grid, mode), format=_format(grid, mode, fmt))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]
    config = QuantizationConfig(config_groups=groups, ignore=ignore, quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for name, q in done.items():
        _set_params(model.get_submodule(name), q)
        model.get_submodule(name).quantization_status = QuantizationStatus.DECOMPRESSED


def _set_params(module: nn.Module, q: Quantized) -> None:
    """Copy what dsc computed into the parameters compressed-tensors made: effective scales become
    the stored ones (NVFP4: × the global scale, an E4M3 value; blocks: one row per 128)."""
    scale = q.scale
    if q.global_scale is not None:
        scale = (scale * q.global_scale).to(torch.float8_e4m3fn).float()
        module.weight_global_scale.data.copy_(q.global_scale.reshape(module.weight_global_scale.shape))
    if getattr(q.grid, "block", None):
        scale = scale[:: q.grid.block[0]]
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point") and not isinstance(q.grid, FloatGrid):
        module.weight_zero_point.data.copy_(q.zero.reshape(module.weight_zero_point.shape))
    for attr in ("input_scale", "input_global_scale"):
        if hasattr(module, attr) and q.input_scale is not None:
            getattr(module, attr).data.copy_(q.input_scale.reshape(getattr(module, attr).shape))


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())


def _experts(model: nn.Module) -> dict[str, tuple[nn.Module, QuantizedExperts | None]]:
    return {n: (m, getattr(m, ATTR, None)) for n, m in model.named_modules() if is_fused(m)}


@contextmanager
def _as_built(model: nn.Module):
    """Run as if `model` had been built in memory, not loaded by transformers 5.23, which on a
    model it loaded from a compressed-tensors checkpoint (1) keeps expert converters extended with
    the quantizer's dequantize step, which fail run backwards ("Undefined Operation encountered!"),
    and (2) ignores the state_dict given to save_pretrained (it asks the quantizer, which returns
    none). Without them transformers falls back to the family's plain mapping and the given state."""
    loaded = {k: model.__dict__.pop(k) for k in ("_weight_conversions", "hf_quantizer") if k in model.__dict__}
    try:
        yield
    finally:
        model.__dict__.update(loaded)


def _split(model: nn.Module, key: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """`t` (E, rows, ·), laid out as the fused parameter `key`, cut into the checkpoint's per-expert
    linears (their names without `.weight` → their rows) by transformers' conversion mapping run
    backwards (what save_pretrained does to float experts); None where the family's checkpoints keep
    experts fused. Only rows and experts move, so scales and packed codes split like weights."""
    with _as_built(model):
        out = hf.revert_weight_conversion(model, {key: t})
    if key in out or not all(k.endswith(".weight") for k in out):
        return None
    return {k.removesuffix(".weight"): v for k, v in out.items()}


def packed(model: nn.Module, name: str, q: QuantizedExperts) -> bool:
    """Whether the experts module `name` is saved compressed (see the module docstring)."""
    probe = torch.zeros(q.gate_up.scale.shape[0], 2, 1)
    return q.grid.symmetric and _split(model, f"{name}.gate_up_proj", probe) is not None


def stored_bits(model: nn.Module) -> dict[str, int]:
    """Bits per stored weight of each quantized linear's weight and of each fused expert tensor
    saved packed (state-dict name → bits)."""
    bits = {f"{name}.weight": m.quantization_scheme.weights.num_bits for name, m in model.named_modules()
            if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is not None}
    for name, (_, q) in _experts(model).items():
        if q is not None and packed(model, name, q):
            bits.update({f"{name}.gate_up_proj": q.grid.bits, f"{name}.down_proj": q.grid.bits})
    return bits


def experts_qparam_bytes(model: nn.Module) -> int:
    """Bytes of the fused experts' saved scales (`weight_scale`, in the weights' dtype, and the
    `weight_shape` pair per expert linear): storage that is not in the state dict in memory."""
    total = 0
    for name, (module, q) in _experts(model).items():
        if q is not None and packed(model, name, q):
            size = module.gate_up_proj.element_size()
            total += (q.gate_up.scale.numel() + q.down.scale.numel()) * size + 3 * 2 * 8 * q.gate_up.scale.shape[0]
    return total


def linear_grid(module: nn.Module) -> Quantized | None:
    """The grid a quantized linear's weight lies on, with its scale and zero point (out, G) in
    float32, read off the compressed-tensors attributes; None for a float linear."""
    scheme = getattr(module, "quantization_scheme", None)
    args = scheme.weights if scheme is not None else None
    if args is None or args.type != "int":  # floating-point grids (FP8, NVFP4, MXFP4): no integer codes
        return None
    grid = Grid(args.num_bits, args.group_size if args.strategy == "group" else None, bool(args.symmetric))
    scale = module.weight_scale.detach().float().cpu().reshape(module.weight.shape[0], -1)
    zp = getattr(module, "weight_zero_point", None)
    zero = zp.detach().float().cpu().reshape(scale.shape) if zp is not None and not args.symmetric \
        else torch.zeros_like(scale)
    return Quantized(grid, scale, zero)


def qparam_names(model: nn.Module) -> set[str]:
    """Names of the quantization parameters (scales, zero points) of quantized linears."""
    return {f"{name}.{p}" for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None
            for p, _ in m.named_parameters(recurse=False) if p != "weight" and p != "bias"}


def _weights(args) -> str:
    if args.type != "int":
        name = {8: "fp8 e4m3", 4: "fp4 e2m1"}.get(args.num_bits, f"float{args.num_bits}")
        return f"{name} {args.strategy}" + (f" {args.block_structure[0]}x{args.block_structure[1]}"
                                            if args.block_structure else f" g{args.group_size}" if args.group_size
                                            else "")
    return (f"int{args.num_bits} {args.strategy}" + (f" g{args.group_size}" if args.group_size else "")
            + ("" if args.symmetric else " asym"))


def _acts(a) -> str | None:
    if a is None:
        return None
    kind = f"int{a.num_bits}" if a.type == "int" else {8: "fp8", 4: "fp4"}.get(a.num_bits, f"float{a.num_bits}")
    return f"{kind} {a.strategy}" + ("" if a.dynamic in (True, "local") else " static")


def describe(model: nn.Module) -> dict | None:
    """The scheme of a quantized model as plain data (for reports), or None; a non-uniform model
    lists each scheme with the number of linears on it under `groups`."""
    schemes: dict[tuple, dict] = {}
    for m in model.modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            one = {"weights": _weights(scheme.weights), "activations": _acts(scheme.input_activations),
                   "format": scheme.format}
            schemes.setdefault(tuple(one.values()), {**one, "linears": 0})["linears"] += 1
    if not schemes:
        return None
    groups = list(schemes.values())
    found = {k: v for k, v in groups[0].items() if k != "linears"}
    if len(groups) > 1:
        found["groups"] = groups
    experts = [(n, q) for n, (_, q) in _experts(model).items() if q is not None]
    if experts:
        name, q = experts[0]
        stored = ("pack-quantized, one linear per expert" if packed(model, name, q) else
                  "floats on the grid, fused (no smaller on disk: transformers cannot load per-expert zero points)")
        found["experts"] = {"weights": _weights(_args(q.grid)), "activations": None, "saved_as": stored}
    return found


def _compressed(w: torch.Tensor, q: Quantized) -> dict[str, torch.Tensor]:
    """Packed codes (E, rows, ⌈in·bits/32⌉) int32 and scales (E, rows, G) of a fused weight on its grid."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    flat = w.detach().reshape(-1, w.shape[-1]).cpu()
    scale = q.scale.reshape(flat.shape[0], -1).cpu()
    codes = q.grid.codes(flat, scale, q.zero.reshape(scale.shape).cpu()).reshape(w.shape)
    return {"weight_packed": pack_to_int32(codes, q.grid.bits), "weight_scale": q.scale.to(w.dtype).cpu()}


def _expert_tensors(model: nn.Module, state: dict) -> tuple[dict, dict, list]:
    """Pop the fused expert tensors from `state`; return the per-expert compressed tensors under
    the checkpoint's names, the fused tensors that stay float, and the grids saved packed."""
    compressed, floats, grids = {}, {}, []
    for name, (_, q) in _experts(model).items():
        keep = q is not None and packed(model, name, q)
        for param, part in (("gate_up_proj", q and q.gate_up), ("down_proj", q and q.down)):
            key = f"{name}.{param}"
            w = state.pop(key)
            if not keep:
                floats[key] = w.detach().contiguous().cpu()
                continue
            for suffix, t in _compressed(w, part).items():
                for base, v in _split(model, key, t).items():
                    compressed[f"{base}.{suffix}"] = v.contiguous()
                    if suffix == "weight_scale":
                        compressed[f"{base}.weight_shape"] = torch.tensor([v.shape[0], w.shape[2]])
        grids += [q.grid] if keep else []
    return compressed, floats, grids


def _experts_group(dest: Path, q_args) -> None:
    """Give the packed experts a config group of their own when the linears' group would not load
    them (transformers reads experts only as weight-only pack-quantized)."""
    path = Path(dest) / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    first = qc["config_groups"]["group_0"]
    same = {k: first["weights"].get(k) for k in ("num_bits", "strategy", "group_size", "symmetric")} == \
        {k: getattr(q_args, k) for k in ("num_bits", "strategy", "group_size", "symmetric")}
    if (first.get("format") or qc.get("format")) == "pack-quantized" and not first.get("input_activations") and same:
        return
    qc["config_groups"]["group_1"] = {"targets": [EXPERTS_TARGET], "weights": q_args.model_dump(mode="json"),
                                      "input_activations": None, "output_activations": None,
                                      "format": "pack-quantized"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add_shard(dest: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as one more safetensors shard of the checkpoint in `dest`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dest, index = Path(dest), Path(dest) / "model.safetensors.index.json"
    if index.is_file():
        data, name = json.loads(index.read_text()), "model-fused-experts.safetensors"
    else:  # one file: it becomes the first of two shards
        first = "model-00001-of-00002.safetensors"
        os.replace(dest / "model.safetensors", dest / first)
        with safe_open(dest / first, "pt") as f:
            data = {"metadata": {"total_size": (dest / first).stat().st_size},  # an upper bound: header included
                    "weight_map": dict.fromkeys(f.keys(), first)}
        name = "model-00002-of-00002.safetensors"
    save_file(tensors, dest / name, metadata={"format": "pt"})
    data["weight_map"].update(dict.fromkeys(tensors, name))
    data.setdefault("metadata", {})["total_size"] = data["metadata"].get("total_size", 0) + \
        sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def unpacked(model: nn.Module) -> None:
    """A model just loaded from a packed checkpoint is still COMPRESSED (transformers unpacks it on
    its first forward): unpack it now, so that saving packs it exactly once. compressed-tensors
    unpacks FP4 codes to bfloat16 whatever the model's dtype: they are cast back to it (exact)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    if any(getattr(m, "quantization_status", None) == QuantizationStatus.COMPRESSED for m in model.modules()):
        ModelCompressor.from_pretrained_model(model).decompress_model(model)
    _cast_back(model)


def _cast_back(model: nn.Module) -> None:
    dtype = model.get_input_embeddings().weight.dtype
    for m in model.modules():
        w = getattr(m, "weight", None)
        if getattr(m, "quantization_scheme", None) is not None and w is not None and w.dtype != dtype:
            w.data = w.data.to(dtype)


def _expert_grid(folder: Path) -> Grid | None:
    """The grid of the packed experts of a checkpoint dsc saved (None: none packed)."""
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    groups = list((qc.get("config_groups") or {}).values())
    group = next((g for g in groups if g.get("targets") == [EXPERTS_TARGET]), groups[0] if groups else None)
    w = (group or {}).get("weights")
    if not w or (group.get("format") or qc.get("format")) != "pack-quantized" or not w.get("symmetric"):
        return None
    return Grid(w["num_bits"], w.get("group_size"), True)


def _read(folder: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in keys & set(f.keys())})
    return out


@torch.no_grad()
def restore_experts(model: nn.Module, folder: Path) -> int:
    """After from_pretrained of a checkpoint that dsc saved: re-attach each fused experts module's
    record (transformers fuses the packed experts back into plain floats and forgets their scales),
    read from the checkpoint's per-expert `weight_scale`s, so that weight_bytes counts them at their
    bits and the next save packs them again. Returns the number of experts modules restored."""
    grid, restored = _expert_grid(folder), 0
    for name, (module, q) in _experts(model).items() if grid is not None else ():
        parts = []
        for param in ("gate_up_proj", "down_proj"):
            w = getattr(module, param)
            rows = torch.arange(w.shape[0] * w.shape[1], dtype=torch.float64).reshape(*w.shape[:2], 1)
            where = _split(model, f"{name}.{param}", rows)  # per-expert linear → its rows in the fused tensor
            scales = _read(folder, {f"{base}.weight_scale" for base in where or {}})
            if q is not None or where is None or len(scales) != len(where):
                break
            scale = torch.empty(rows.numel(), grid.group_size and w.shape[2] // grid.group_size or 1)
            for base, index in where.items():
                scale[index.flatten().long()] = scales[f"{base}.weight_scale"].float()
            scale = scale.reshape(*w.shape[:2], -1).to(w.device)
            parts.append(Quantized(grid, scale, torch.zeros_like(scale)))
        if len(parts) == 2:
            setattr(module, ATTR, QuantizedExperts(grid, *parts))
            restored += 1
    return restored


@torch.no_grad()
def save_pretrained(model: nn.Module, dest: Path) -> None:
    """model.save_pretrained in compressed-tensors form; the model in memory keeps its weights."""
    from compressed_tensors.compressors import ModelCompressor

    unpacked(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    try:
        if not _experts(model):
            model.save_pretrained(dest)
            compressor.update_config(str(dest))
            return
        state = model.state_dict()
        compressed, floats, grids = _expert_tensors(model, state)
        with _as_built(model):
            model.save_pretrained(dest, state_dict={**state, **compressed})
        compressor.update_config(str(dest))
        if grids:
            _experts_group(dest, _args(grids[0]))
        if floats:
            _add_shard(dest, floats)
    finally:
        compressor.decompress_model(model)
        _cast_back(model)
