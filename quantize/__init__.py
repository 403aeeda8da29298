"""dsc.quantize — weight quantization that saves in formats transformers and vLLM load:
AWQ (activation-aware scales and clipping), GPTQ (AWQ + GPTQ) and round-to-nearest at 3/4/8 bits, group-wise or
per channel; INT8 weight-only and W8A8 with SmoothQuant; FP8 (per channel, 128×128
blocks), NVFP4 and MXFP4. Calibration runs one decoder layer at
a time. Fused MoE experts are quantized per expert (dsc.quantize.experts). Saved as
compressed-tensors (dsc.quantize.ct); `dsc.quantize.cpu` gives int8 models a CPU path on int8 kernels."""
from dsc.quantize.config import AWQConfig, FloatConfig, GPTQConfig, Int8Config, RTNConfig, SensitivityConfig
from dsc.quantize.fp import FloatGrid
from dsc.quantize.grid import Grid
from dsc.quantize.stage import apply_awq, apply_float, apply_gptq, apply_int8, apply_rtn, apply_sensitivity

__all__ = ["AWQConfig", "FloatConfig", "FloatGrid", "GPTQConfig", "Grid", "Int8Config", "RTNConfig", "SensitivityConfig",
           "apply_awq", "apply_float", "apply_gptq", "apply_int8", "apply_rtn", "apply_sensitivity"]
