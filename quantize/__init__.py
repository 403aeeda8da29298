"""dsc.quantize — weight quantization that saves in formats transformers and vLLM load:
AWQ (activation-aware scales and clipping) and round-to-nearest at 3/4/8 bits, group-wise or
per channel; INT8 weight-only and W8A8 with SmoothQuant. Calibration runs one decoder layer at
a time. Fused MoE experts are quantized per expert (dsc.quantize.experts). Saved as
compressed-tensors (dsc.quantize.ct); `dsc.quantize.cpu` gives int8 models a CPU path on int8 kernels."""
from dsc.quantize.config import AWQConfig, Int8Config, RTNConfig
from dsc.quantize.grid import Grid
from dsc.quantize.stage import apply_awq, apply_int8, apply_rtn

__all__ = ["AWQConfig", "Grid", "Int8Config", "RTNConfig", "apply_awq", "apply_int8", "apply_rtn"]
