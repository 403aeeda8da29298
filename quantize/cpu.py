"""A CPU path on int8 kernels for int8 models: every linear quantized to int8 per output channel
(by the `int8` stage, either mode) runs on torch's dynamically quantized linear (fbgemm int8
GEMM), built from the very codes and scales the stage chose. fbgemm quantizes its input with one
(asymmetric) scale per tensor; dividing each token by its own max |x| first and multiplying the
output back makes that one scale per token, as in the saved W8A8 scheme (on stories260K:
per-tensor +2.2 % perplexity, per-token +0.2 %). On CPUs with VNNI the full 8-bit input range is
used; elsewhere fbgemm's 7-bit `reduce_range` avoids int16 saturation. bench/bench_quant.py
measures speed and perplexity. This is a run-time form: save the model before converting it.

    dsc.quantize.cpu.int8_kernels(model)   # in place; returns the number of linears converted
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dsc.quantize.grid import Grid


def _eligible(module: nn.Module) -> bool:
    scheme = getattr(module, "quantization_scheme", None)
    w = getattr(scheme, "weights", None)
    return (isinstance(module, nn.Linear) and w is not None and w.num_bits == 8 and w.symmetric
            and w.strategy == "channel")


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


class Int8Linear(nn.Module):
    """y = W x + b with W int8 per output channel and x quantized per token, on fbgemm."""

    def __init__(self, module: nn.Linear, full_range: bool):
        super().__init__()
        scale = module.weight_scale.detach().float().reshape(-1, 1)  # (out, 1)
        codes = Grid(8, None, True).codes(module.weight.detach(), scale, torch.zeros_like(scale))  # (out, in) int8
        scale, zeros = scale.reshape(-1), torch.zeros(scale.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's quantized tensors are deprecated in favour of torchao
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            packer = DynamicLinear(module.in_features, module.out_features, bias_=False, dtype=torch.qint8)
            packer.set_weight_bias(torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0), None)
        self.packed = packer._packed_params  # the prepacked int8 weight
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)
        self.reduce_range = not full_range
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(-1, keepdim=True).clamp(min=1e-8)  # (..., 1): one scale per token
        y = torch.ops.quantized.linear_dynamic(x / peak, self.packed._packed_params, self.reduce_range) * peak
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def int8_kernels(model: nn.Module) -> int:
    """Swap the int8 linears of a float32 CPU model for int8-kernel ones, in place."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"int8_kernels runs float32 models on the CPU; this one is {weight.dtype} on "
                         f"{weight.device}: convert a float32 CPU copy")
    names = [n for n, m in model.named_modules() if _eligible(m)]
    full_range = _has_vnni()
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear(model.get_submodule(name), full_range))
    return len(names)
