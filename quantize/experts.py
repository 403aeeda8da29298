"""Fused routed experts (transformers 5): gate_up_proj (E, 2I, H), each expert's gate rows first then
its up rows (the modeling code's `chunk(2, dim=-1)`), and down_proj (E, H, I). Each expert is
quantized as its two linears would be: group-wise along its input dimension (H for gate_up, I for
down), on the grid the stage's linears use, one scale (and zero point) per (expert, row, group).

Each expert reads only the tokens the router sends it, so its statistics are its own: a hook on
the experts module's forward(hidden_states (T, H), top_k_index (T, k), top_k_weights) picks them
and recomputes down's input h = act(x gateᵀ) ⊙ (x upᵀ) (n_e, I). Gram matrices are kept
block-diagonal, one (gs, gs) block per group: E·in·gs floats instead of E·in² (about 1 GB a layer
for DeepSeek-V3's 256 experts at group 128, where full ones would take 57 GB). Clipping needs only
those blocks; the up→down scale search scores with them too, leaving the cross-group terms out
as clipping does (exact for per-channel grids, whose one block is the whole matrix).

An up→down scale is exact per expert: dividing expert e's up rows by s_e divides h by s_e, and
its down columns take s_e back. An expert that no calibration token reached is rounded to
nearest and named in the stage's metrics (`experts_rtn_fallback`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsc.quantize.grid import Grid, Quantized
from dsc.quantize.rounding import Rounding
from dsc.quantize.search import awq_scale

ATTR = "dsc_quantized_experts"  # the record on a quantized experts module, as compressed-tensors marks linears


@dataclass
class QuantizedExperts:
    """What a fused experts module became: scales and zero points of gate_up_proj (E, 2I, G_H) and
    down_proj (E, H, G_I), and the experts no calibration token reached (rounded to nearest)."""

    grid: Grid
    gate_up: Quantized
    down: Quantized
    no_tokens: tuple[int, ...] = ()


def is_fused(module: nn.Module) -> bool:
    """Routed experts stored as 3-D parameters, the layout this file handles."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3


@dataclass
class _Side:
    """Per-expert statistics of one input of the experts (gate_up's x or down's h), width `in`."""

    abs_sum: torch.Tensor  # (E, in) Σ |x| over the expert's tokens
    blocks: torch.Tensor | None  # (E, G, gs, gs) Σ x_gᵀ x_g per group g (None: not kept)

    @classmethod
    def empty(cls, experts: int, width: int, group: int | None, device) -> _Side:
        blocks = None if group is None else torch.zeros(experts, width // group, group, group, device=device)
        return cls(torch.zeros(experts, width, device=device), blocks)

    def add(self, e: int, x: torch.Tensor) -> None:
        self.abs_sum[e] += x.abs().sum(0)
        if self.blocks is not None:
            g = x.reshape(x.shape[0], self.blocks.shape[1], -1)  # (n, G, gs)
            self.blocks[e] += torch.einsum("ngi,ngj->gij", g, g)

    def divide(self, e: int | slice, s: torch.Tensor) -> None:
        """The input became x / s (s: (in,)), after a fold."""
        self.abs_sum[e] /= s
        if self.blocks is not None:
            b = s.reshape(self.blocks.shape[-3], -1)  # (G, gs)
            self.blocks[e] /= b[:, :, None] * b[:, None, :]


@dataclass
class ExpertStats:
    """Streaming statistics of each routed expert's inputs, from the tokens routed to it."""

    counts: torch.Tensor  # (E,) tokens each expert received
    x: _Side  # gate_up's input, width H
    h: _Side  # down's input, width I

    @classmethod
    def empty(cls, experts: nn.Module, grid: Grid | None) -> ExpertStats:
        """`grid`: keep the Gram blocks of its groups (None: only mean |x|)."""
        n, _, hidden = experts.gate_up_proj.shape
        width, device = experts.down_proj.shape[2], experts.gate_up_proj.device
        group = (lambda w: None) if grid is None else grid.group  # noqa: E731
        return cls(torch.zeros(n, dtype=torch.long, device=device), _Side.empty(n, hidden, group(hidden), device),
                   _Side.empty(n, width, group(width), device))

    @classmethod
    def down_grams(cls, experts: nn.Module) -> ExpertStats:
        """Each expert's whole Gram of down_proj's input (what refitting or ordering its channels
        reads); the gate_up side keeps mean |x| only."""
        n, _, hidden = experts.gate_up_proj.shape
        width, device = experts.down_proj.shape[2], experts.gate_up_proj.device
        return cls(torch.zeros(n, dtype=torch.long, device=device), _Side.empty(n, hidden, None, device),
                   _Side.empty(n, width, width, device))

    def down_gram(self, e: int) -> torch.Tensor | None:
        """Expert `e`'s mean down_proj-input Gram (from `down_grams` statistics); None: no tokens reached it."""
        n = int(self.counts[e])
        return self.h.blocks[e, 0] / n if n else None

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = x.reshape(-1, x.shape[-1]).float()  # (T, H)
        index = index.reshape(x.shape[0], -1)  # (T, k)
        for e in index.unique().tolist():
            if not 0 <= e < len(self.counts):  # DeepSeek's padding index
                continue
            xe = x[(index == e).any(-1)]  # (n_e, H)
            gate, up = F.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
            self.counts[e] += xe.shape[0]
            self.x.add(e, xe)
            self.h.add(e, module.act_fn(gate) * up)  # (n_e, I)


def _block_error(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Σ_g Δ_g B_g Δ_gᵀ for Δ (out, in) and blocks (G, gs, gs)."""
    d = delta.reshape(delta.shape[0], blocks.shape[0], -1)  # (out, G, gs)
    return torch.einsum("ogi,gij,ogj->", d, blocks, d)


def routed_loss(experts: nn.Module, stats: ExpertStats, grid: Grid):
    """Summed output error of every expert's gate_up rows quantized with an input scale s (H,),
    each expert over its own tokens (block-diagonal Gram): the routed part of the MoE-norm search."""
    w = experts.gate_up_proj.detach().float()  # (E, 2I, H)
    flat = w.reshape(-1, w.shape[-1])

    def loss(s: torch.Tensor) -> float:
        delta = (flat - grid.rtn(flat * s) / s).reshape(w.shape)
        return float(sum(_block_error(delta[e], stats.x.blocks[e]) for e in range(w.shape[0])))
    return loss


@torch.no_grad()
def scale_inputs(experts: nn.Module, stats: ExpertStats | None, s: torch.Tensor) -> None:
    """The experts' input became x / s (a norm fold): every expert's gate_up columns × s."""
    experts.gate_up_proj.mul_(s.to(experts.gate_up_proj.dtype))
    if stats is not None:
        stats.x.divide(slice(None), s)


@torch.no_grad()
def scale_down(experts: nn.Module, stats: ExpertStats, grid: Grid, n_grid: int, duo: bool) -> list[dict]:
    """AWQ's up→down scale, per expert that received tokens: its up rows / s_e, its down columns × s_e."""
    down, searches = experts.down_proj, []
    for e in range(down.shape[0]):
        n = int(stats.counts[e])
        if n == 0:
            continue
        w, blocks = down[e].float(), stats.h.blocks[e] / n
        loss = lambda s, w=w, blocks=blocks: float(_block_error(w - grid.rtn(w * s) / s, blocks))  # noqa: E731
        s, info = awq_scale(w, stats.h.abs_sum[e] / n, grid, loss, n_grid, duo)
        if info["ratio"] is not None:
            fold_down(experts, e, s, stats)
        searches.append({"linears": [f"experts[{e}].down_proj"], **info})
    return searches


@torch.no_grad()
def fold_down(experts: nn.Module, e: int, s: torch.Tensor, stats: ExpertStats | None = None) -> None:
    """Expert e's up rows / s (I,), its down columns × s: h / s, then × s back; outputs unchanged."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    gate_up[e, down.shape[2]:].div_(s.to(gate_up.dtype)[:, None])
    down[e].mul_(s.to(down.dtype))
    if stats is not None:
        stats.h.divide(e, s)


@torch.no_grad()
def quantize_experts(experts: nn.Module, grid: Grid, stats: ExpertStats | None = None,
                     rounding: Rounding = Rounding()) -> QuantizedExperts:
    """Put every expert's gate_up and down on the grid in place, each with `rounding` on the
    statistics of its own tokens (the clipping search or GPTQ on its Gram blocks); experts that no
    calibration token reached are rounded to nearest."""
    parts = []
    for param, side in ((experts.gate_up_proj, stats and stats.x), (experts.down_proj, stats and stats.h)):
        scales, zeros, outer = [], [], []
        for e in range(param.shape[0]):
            n = 0 if stats is None else int(stats.counts[e])
            blocks = side.blocks[e] / n if n and side.blocks is not None else None
            q = rounding.expert(param.data[e], blocks, grid)
            scales.append(q.scale)
            zeros.append(q.zero)
            outer.append(q.global_scale)
        parts.append(Quantized(grid, torch.stack(scales), torch.stack(zeros),
                               None if outer[0] is None else torch.stack(outer)))
    no_tokens = () if stats is None else tuple(int(e) for e in (stats.counts == 0).nonzero().flatten())
    return QuantizedExperts(grid, parts[0], parts[1], no_tokens)
