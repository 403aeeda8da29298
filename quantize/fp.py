"""Floating-point grids: FP8 E4M3 (per channel or 128×128 blocks), NVFP4 and MXFP4.

A `FloatGrid` has the interface of the integer `Grid` (dsc.quantize.grid) — `group`, `params`,
`fake`, `rtn` — so every per-layer algorithm (round-to-nearest, GPTQ, AWQ's scales) runs on it
unchanged. What differs is the element type and how scales are taken; both follow
compressed-tensors (its `calculate_qparams` and rounding, called through dsc.quantize.ct), so the
weights dsc computes are the ones its compressors pack and vLLM / transformers read back:

| kind  | elements      | scale per                       | scale stored as                   |
|-------|---------------|---------------------------------|-----------------------------------|
| fp8   | E4M3 (±448)   | output channel, or 128×128 block | weight dtype                      |
| nvfp4 | E2M1 (±6)     | 16 inputs of a row              | E4M3, times a per-tensor FP32 global scale |
| mxfp4 | E2M1 (±6)     | 32 inputs of a row              | E8M0 (a power of two)             |

Scales here are always *effective* (what a code is multiplied by): NVFP4's is its E4M3 scale
divided by the tensor's global scale, which `Quantized.global_scale` keeps for saving. Block
scales (out/128, in/128) are expanded to one per (row, 128-column group), the layout every
algorithm here reads; widths that 128 does not divide are padded as compressed-tensors pads them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsc.errors import FieldError

FP8_MAX, FP4_MAX = 448.0, 6.0
KINDS = {"fp8": (8, None), "fp8-block": (8, 128), "nvfp4": (4, 16), "mxfp4": (4, 32)}


@dataclass(frozen=True)
class FloatGrid:
    kind: str  # "fp8" | "nvfp4" | "mxfp4"
    group_size: int | None  # fp8: None (per channel) or 128 (block); nvfp4 16; mxfp4 32
    block: tuple[int, int] | None = None  # fp8 blocks (rows, columns)
    symmetric: bool = True
    scale_dtype: str | None = None

    @classmethod
    def named(cls, name: str) -> FloatGrid:
        """fp8 (per channel), fp8-block (128×128), nvfp4, mxfp4."""
        if name == "fp8-block":
            return cls("fp8", 128, (128, 128))
        return cls(name, KINDS[name][1])

    @property
    def name(self) -> str:
        return "fp8-block" if self.block else self.kind

    @property
    def bits(self) -> int:
        return 8 if self.kind == "fp8" else 4

    @property
    def element_max(self) -> float:
        return FP8_MAX if self.kind == "fp8" else FP4_MAX

    def group(self, in_features: int, name: str = "") -> int:
        if self.group_size is None:
            return in_features
        if self.block is None and in_features % self.group_size:
            raise FieldError("scheme", f"{self.name} scales groups of {self.group_size} inputs, which does not divide "
                                       f"the {in_features} inputs of {name or 'a layer'}: add it to `ignore`")
        return self.group_size

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.group(in_features))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """(out, G, gs), zero-padded to whole groups (only fp8 blocks may need it)."""
        gs = self.group(w.shape[1])
        pad = -w.shape[1] % gs
        w = w.float()
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        return w.reshape(w.shape[0], -1, gs)

    def global_scale(self, w: torch.Tensor) -> torch.Tensor | None:
        """NVFP4's per-tensor scale (compressed-tensors' generate_gparam); None for the others."""
        if self.kind != "nvfp4":
            return None
        from dsc.quantize import ct

        return ct.global_scale(w.float().abs().amax())

    def params(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0,
               global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective scale and zero point (out, G) of `w` (out, in); `clip` shrinks each range."""
        from dsc.quantize import ct

        amax = self._grouped(w).abs().amax(-1) * clip  # (out, G)
        if self.block is not None:  # one scale per (128 rows, 128 columns): the max over the block's rows
            rows = self.block[0]
            pad = -amax.shape[0] % rows
            blocks = torch.nn.functional.pad(amax, (0, 0, 0, pad)).reshape(-1, rows, amax.shape[1]).amax(1)
            amax = blocks.repeat_interleave(rows, 0)[: w.shape[0]]
        if self.kind == "nvfp4" and global_scale is None:
            global_scale = self.global_scale(w)
        scale = ct.float_scale(amax, self, global_scale)
        if global_scale is not None:
            scale = scale / global_scale
        return scale, torch.zeros_like(scale)

    def fake(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize and dequantize `w` (float32 result) with effective scales (out, G)."""
        from dsc.quantize import ct

        g = w.float()
        gs = -(-g.shape[1] // scale.shape[1])
        pad = scale.shape[1] * gs - g.shape[1]
        if pad:
            g = torch.nn.functional.pad(g, (0, pad))
        g = g.reshape(g.shape[0], scale.shape[1], gs)
        q = ct.round_float(g / scale[..., None], self)
        return (q * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]

    def input_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """Static activation scale for inputs whose largest |value| over calibration is `amax`:
        FP8's per-tensor scale, NVFP4's global input scale."""
        from dsc.quantize import ct

        amax = amax.float().clamp(min=1e-12).reshape(1)
        return ct.global_scale(amax) if self.kind == "nvfp4" else amax / FP8_MAX

    def rtn(self, w: torch.Tensor) -> torch.Tensor:
        return self.fake(w, *self.params(w))

