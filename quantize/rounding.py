"""How weights go onto their grid: the seam for per-layer algorithms.

Layer-by-layer calibration (dsc.quantize.stage → dsc.quantize.layerwise) is shared by every
quantizer: it captures a layer's inputs, keeps the Gram matrix G = XᵀX / n of each distinct linear
input, folds scales (AWQ, SmoothQuant) and propagates the quantized layer's outputs, with resume
per layer and per-expert routing. What differs between quantizers is this last step, one call:

    rounding.linears(weights, gram, grid, clippable) -> [Quantized, ...]   # weights changed in place
    rounding.expert(weight, blocks, grid, clippable) -> Quantized          # one routed expert

`weights` read one input (q/k/v, gate/up) whose Gram is `gram`; an expert sees only its own tokens,
whose Gram is kept block-diagonal (one (gs, gs) block per group, dsc.quantize.experts). Methods:
- `rtn`: round to nearest (no data);
- `clip`: AWQ's clipping search per (row, group) on G's diagonal blocks, then round to nearest;
- `gptq`: dsc.quantize.gptq (error feedback through H = 2G), optionally on clipped scales.
Grids are dsc.quantize.grid.Grid (integers) or dsc.quantize.fp.FloatGrid (FP8, NVFP4, MXFP4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsc.quantize.gptq import gptq
from dsc.quantize.grid import Grid, Quantized, grid_params, to_grid
from dsc.quantize.search import clip_blocks, clip_ratios, output_error


@dataclass(frozen=True)
class Rounding:
    method: str = "rtn"  # "rtn" | "clip" | "gptq"
    n_grid: int = 20  # clipping search points
    clip: bool = False  # gptq: scales from the clipping search (else from the weights' ranges)
    damp: float = 0.01  # gptq: λ / mean diag(H)
    block_size: int = 128  # gptq: columns per lazy batch update
    act_order: bool = True  # gptq: columns by decreasing diag(H), static groups

    def __post_init__(self):
        if self.method not in ("rtn", "clip", "gptq"):
            raise ValueError(f"unknown rounding {self.method!r}")

    @property
    def needs_gram(self) -> bool:
        return self.method != "rtn"

    def _clips(self, clippable: bool) -> bool:
        return clippable and (self.method == "clip" or (self.method == "gptq" and self.clip))

    @torch.no_grad()
    def linears(self, weights: list[torch.Tensor], gram: torch.Tensor | None, grid: Grid,
                clippable: list[bool], round: bool = True) -> tuple[list[Quantized], dict]:
        """Put `weights` (each (out_i, in), all reading the input whose Gram is `gram`) on `grid` in
        place; `clippable[i]`: weight i may have its range clipped (not q/k: their errors go through
        the softmax). `round=False`: take the grid (clipping included) but leave weights in float.
        Metrics: the output error over the calibration tokens, and round-to-nearest's."""
        before = [w.detach().float().clone() for w in weights] if gram is not None and round else None
        done = self._linears(weights, gram, grid, clippable, round)
        if before is None:
            return done, {}
        error = sum(float(output_error(b, w.float(), gram)) for b, w in zip(before, weights))
        return done, {"error": error, "error_rtn": sum(float(output_error(b, grid.rtn(b), gram)) for b in before)}

    def _linears(self, weights, gram, grid, clippable, round) -> list[Quantized]:
        ratios = [clip_ratios(w, gram, grid, self.n_grid) if self._clips(c) else 1.0
                  for w, c in zip(weights, clippable)]
        outer = shared_global_scale(weights, grid)
        if self.method != "gptq" or not round:
            return [to_grid(w, grid, r, outer) if round else grid_params(w, grid, r, outer)
                    for w, r in zip(weights, ratios)]
        statics = [grid_params(w, grid, r, outer) for w, r in zip(weights, ratios)]
        # per-linear scales when clipped, or on a float grid (NVFP4's global scale and FP8's 128-row blocks
        # belong to one linear); integer scales are per row: GPTQ takes them itself (lazily without act-order)
        clipped = any(torch.is_tensor(r) for r in ratios)
        static = _stack(statics) if clipped or not isinstance(grid, Grid) else None
        stacked = torch.cat([w.float() for w in weights])
        q, params = gptq(stacked, gram, grid, self.damp, self.block_size, self.act_order, static)
        done, row = [], 0
        for w, own in zip(weights, statics):
            rows = slice(row, row + w.shape[0])
            w.copy_(q[rows].to(w.dtype))
            done.append(Quantized(grid, params.scale[rows], params.zero[rows], own.global_scale))
            row += w.shape[0]
        return done

    @torch.no_grad()
    def expert(self, weight: torch.Tensor, blocks: torch.Tensor | None, grid: Grid, clippable: bool = True
               ) -> Quantized:
        """One routed expert's projection (out, in) in place, from its Gram blocks (G, gs, gs) over
        the tokens routed to it (None: no token reached it — round to nearest). GPTQ runs per group
        on its block: the cross-group terms are not kept (exact for per-channel grids: one block)."""
        if blocks is None or self.method == "rtn":
            return to_grid(weight, grid)
        ratio = clip_blocks(weight, blocks, grid, self.n_grid) if self._clips(clippable) else 1.0
        if self.method == "clip":
            return to_grid(weight, grid, ratio)
        static = grid_params(weight, grid, ratio)
        gs = weight.shape[1] // blocks.shape[0]
        q = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        for g in range(blocks.shape[0]):
            cols = slice(g * gs, (g + 1) * gs)
            part = Quantized(grid, static.scale[:, g:g + 1], static.zero[:, g:g + 1], static.global_scale)
            q[:, cols], _ = gptq(weight[:, cols], blocks[g], _OneGroup(grid), self.damp, self.block_size,
                                 self.act_order, part)
        weight.copy_(q.to(weight.dtype))
        return static


@dataclass(frozen=True)
class _OneGroup:
    """`grid` seen by one group's columns, whose scales are given: all its columns are one group."""

    grid: object

    def group(self, in_features: int, name: str = "") -> int:
        return in_features

    def fake(self, w, scale, zero=None):
        return self.grid.fake(w, scale, zero)


def shared_global_scale(weights: list[torch.Tensor], grid) -> torch.Tensor | None:
    """NVFP4: one global scale for linears that read one input (vLLM serves q/k/v and gate/up fused,
    with one global scale, as llm-compressor saves them); None for other grids."""
    if not hasattr(grid, "global_scale") or len(weights) == 1:
        return None
    return grid.global_scale(torch.cat([w.detach().reshape(-1) for w in weights])[None])


def _stack(parts: list[Quantized]) -> Quantized:
    return Quantized(parts[0].grid, torch.cat([p.scale for p in parts]), torch.cat([p.zero for p in parts]))


