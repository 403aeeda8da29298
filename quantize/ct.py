"""The compressed-tensors adapter: every compressed-tensors call of dsc is in this file.

A quantized dsc model in memory is what transformers builds when it loads a compressed-tensors
checkpoint: float weights that lie on the grid, with `quantization_scheme`, `weight_scale` and
`weight_zero_point` on every quantized linear and status DECOMPRESSED (weights are not
re-quantized each forward; W8A8's dynamic per-token activation quantization does run). Saving
packs the integer codes (`weight_packed` int32 for 4-bit, int8 `weight` for W8A8), writes
`quantization_config` into config.json exactly as llm-compressor does, and restores the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsc.quantize.layerwise import Quantized


def _args(q: Quantized):
    from compressed_tensors.quantization import QuantizationArgs

    grid = q.grid
    return QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.symmetric,
                            strategy="channel" if grid.group_size is None else "group", group_size=grid.group_size)


def _token_int8():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def attach(model: nn.Module, done: dict[str, Quantized], activations: bool, fmt: str) -> None:
    """Mark the linears in `done` (full module name → its grid and parameters) as quantized,
    in place. `activations`: quantize their inputs to int8 per token at run time (W8A8)."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    first = next(iter(done.values()))
    if fmt == "auto":  # asymmetric packed zero points do not load in transformers (llm-compressor #1618)
        fmt = "int-quantized" if activations or not first.grid.symmetric else "pack-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=_args(first),
                                input_activations=_token_int8() if activations else None, format=fmt)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for name, q in done.items():
        module = model.get_submodule(name)
        module.weight_scale.data.copy_(q.scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(q.zero.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.DECOMPRESSED


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())


def stored_bits(model: nn.Module) -> dict[str, int]:
    """Bits per stored weight of each quantized linear's weight (state-dict name → bits)."""
    return {f"{name}.weight": m.quantization_scheme.weights.num_bits for name, m in model.named_modules()
            if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is not None}


def qparam_names(model: nn.Module) -> set[str]:
    """Names of the quantization parameters (scales, zero points) of quantized linears."""
    return {f"{name}.{p}" for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None
            for p, _ in m.named_parameters(recurse=False) if p != "weight" and p != "bias"}


def describe(model: nn.Module) -> dict | None:
    """The scheme of a quantized model as plain data (for reports), or None."""
    for m in model.modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None:
            w, a = scheme.weights, scheme.input_activations
            return {"weights": f"int{w.num_bits} {w.strategy}" + (f" g{w.group_size}" if w.group_size else "")
                    + ("" if w.symmetric else " asym"), "activations": f"int{a.num_bits} {a.strategy}" if a else None,
                    "format": scheme.format}
    return None


@torch.no_grad()
def save_pretrained(model: nn.Module, dest: Path) -> None:
    """model.save_pretrained in compressed-tensors form; the model in memory is left as it was."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    try:
        model.save_pretrained(dest)
        compressor.update_config(str(dest))
    finally:
        compressor.decompress_model(model)
