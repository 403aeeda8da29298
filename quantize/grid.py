"""Integer grids for weights: the arithmetic every quantizer here shares.

A weight matrix W (out, in) is cut along its input dimension into groups of `group_size`
columns (or one group per row: per-channel). Each (row, group) gets a scale and, when
asymmetric, an integer zero point; a weight is stored as q = clamp(round(w / scale) + zp,
qmin, qmax) and read back as (q − zp) · scale. The convention (signed range, scale from the
range, zero point clamped into it) is compressed-tensors', so what dsc computes is what its
loader and vLLM read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsc.errors import FieldError


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    # "float16": every scale is a float16 value, rounded where it is taken (so searches score the
    # grid as it will be stored): GGUF's Q4_0 / Q4_1 / Q8_0 blocks then hold the grid bit-exactly.
    # Asymmetric scales keep 7 significant bits, so that Q4_1's block minimum −(zero − qmin)·scale is
    # a float16 value too.
    scale_dtype: str | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group(self, in_features: int, name: str = "") -> int:
        """Columns per group for a layer of `in_features` inputs; a width the group does not divide
        is an error (a silent per-channel fallback would change the bytes and quality stated)."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size:
            fits = [g for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0]
            hint = f"a group size that divides it ({', '.join(map(str, fits))}), " if fits else ""
            raise FieldError("group_size", f"{self.group_size} does not divide the {in_features} inputs of "
                                           f"{name or 'a layer'}: use {hint}group_size: null (one scale per "
                                           "output channel), or add that layer to `ignore`")
        return self.group_size

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (out, G) of `w` (out, in) in float32; `clip` (out, G) or a number
        shrinks each group's range before the scale is taken (the clipping search's knob)."""
        g = w.float().reshape(w.shape[0], -1, self.group(w.shape[1]))  # (out, G, gs)
        lo = g.amin(-1).clamp(max=0) * clip
        hi = g.amax(-1).clamp(min=0) * clip
        span = self.qmax - self.qmin
        scale = torch.maximum(-lo, hi) / (span / 2) if self.symmetric else (hi - lo) / span
        scale = self.store(scale.clamp(min=torch.finfo(torch.float32).tiny * 1e3))
        if self.symmetric:
            return scale, torch.zeros_like(scale)
        return scale, torch.round(self.qmin - lo / scale).clamp(self.qmin, self.qmax)

    def store(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` as this grid stores it (see `scale_dtype`); unchanged by default."""
        if self.scale_dtype is None:
            return scale
        if self.scale_dtype != "float16":
            raise ValueError(f"scale_dtype {self.scale_dtype!r}: only float16 is supported")
        tiny = 2.0 ** -14  # float16's smallest normal: below it float16 loses bits
        scale = scale.clamp(min=tiny, max=60000.0)
        if not self.symmetric:  # 7 significant bits: times a 4-bit integer still fits float16's 11
            mant, exp = torch.frexp(scale)
            scale = torch.ldexp(torch.round(mant * 128) / 128, exp)
        return scale.to(torch.float16).float()

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (out, in) as int8, for scale/zero (out, G)."""
        g = w.float().reshape(w.shape[0], scale.shape[1], -1)
        q = torch.round(g / scale[..., None]) + zero[..., None]
        return q.clamp(self.qmin, self.qmax).reshape(w.shape).to(torch.int8)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize `w` (float32 result): the weight the model will compute with."""
        g = w.float().reshape(w.shape[0], scale.shape[1], -1)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(self.qmin, self.qmax)
        return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)

    def rtn(self, w: torch.Tensor) -> torch.Tensor:
        return self.fake(w, *self.params(w))


@dataclass
class Quantized:
    """What one weight became: its grid and per-(row, group) scale and zero point (out, G)."""

    grid: Grid  # or a dsc.quantize.fp.FloatGrid
    scale: torch.Tensor  # effective: what a code is multiplied by
    zero: torch.Tensor
    global_scale: torch.Tensor | None = None  # NVFP4's per-tensor scale (scale = its E4M3 scale / this)
    input_scale: torch.Tensor | None = None  # static activations: FP8's input scale, NVFP4's global input scale


@torch.no_grad()
def grid_params(weight: torch.Tensor, grid: Grid, clip: torch.Tensor | float = 1.0,
                outer: torch.Tensor | None = None) -> Quantized:
    """The grid `to_grid` would put `weight` on, without changing it (scale rounded to its dtype,
    except NVFP4's, whose E4M3 scale over the global one is exact in float32 only). `outer`: NVFP4's
    global scale when it is shared (q/k/v, gate/up: vLLM fuses them), else taken from `weight`."""
    if outer is None and hasattr(grid, "global_scale"):
        outer = grid.global_scale(weight)
    if outer is not None:
        return Quantized(grid, *grid.params(weight, clip, outer), outer)
    scale, zero = grid.params(weight, clip)
    return Quantized(grid, scale.to(weight.dtype).clamp(min=torch.finfo(weight.dtype).tiny).float(), zero)


@torch.no_grad()
def to_grid(weight: nn.Parameter | torch.Tensor, grid: Grid, clip: torch.Tensor | float = 1.0,
            outer: torch.Tensor | None = None) -> Quantized:
    """Put `weight` (out, in) on the grid in place (range shrunk by `clip`); the scale is rounded to
    the weight's dtype first, as it will be stored, so the stored model computes exactly this."""
    q = grid_params(weight, grid, clip, outer)
    weight.copy_(grid.fake(weight, q.scale, q.zero).to(weight.dtype))
    return q
