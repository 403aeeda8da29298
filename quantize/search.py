"""The searches of AWQ and SmoothQuant, on a group of linears that read one input.

The losses here are output errors over every calibration token, computed from the input's
Gram matrix G = XᵀX / n (in, in) (the module-output loss is dsc.quantize.layerwise's): for a
weight change Δ (out, in), mean ‖X Δᵀ‖² = Σ (Δ G) ⊙ Δ.

AWQ (Lin et al. 2024): scaling input channel j of the weights by s_j and dividing the input by
s_j leaves the float output unchanged but moves quantization error away from channels with
large activations. s = x̄^r / w̄^(1−r) (x̄: mean |x| per channel; w̄: mean of |w| relative to its
group's max, "duo scaling"; without it s = x̄^r), normalized so √(max·min) = 1; r is searched on
a grid and s = 1 (plain round-to-nearest) is always a candidate, so the chosen scale never does
worse than RTN on this loss. Clipping then shrinks each (row, group) range by a searched ratio.
"""
from __future__ import annotations

from typing import Callable

import torch

from dsc.quantize.grid import Grid


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Mean squared output error Σ (Δ G) ⊙ Δ of replacing `w` (out, in) by `w_hat`."""
    delta = w - w_hat
    return ((delta @ gram) * delta).sum()


def _weight_profile(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """w̄ (in,): mean over rows of |w| relative to the max |w| of its (row, group)."""
    g = w.abs().reshape(w.shape[0], -1, grid.group(w.shape[1]))  # (out, G, gs)
    rel = g / g.amax(-1, keepdim=True).clamp(min=1e-8)
    return rel.reshape(w.shape).mean(0)


def gram_loss(w: torch.Tensor, gram: torch.Tensor, grid: Grid) -> Callable[[torch.Tensor], float]:
    """Loss of a scale s: the group's own output error on every calibration token (from G)."""
    w = w.float()
    return lambda s: float(output_error(w, grid.rtn(w * s) / s, gram))


def awq_scale(w: torch.Tensor, x_mean: torch.Tensor, grid: Grid, loss: Callable[[torch.Tensor], float],
              n_grid: int = 20, duo: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-input-channel scale s (in,) for the stacked weights `w` (out, in) of a group; `loss(s)`
    scores quantizing the group with scale s (s = 1: plain round-to-nearest)."""
    ones = torch.ones_like(x_mean)
    base = loss(ones)
    best, best_s, best_r = base, ones, None
    x_mean = x_mean.clamp(min=1e-6)
    w_mean = _weight_profile(w.float(), grid).clamp(min=1e-6) if duo else None
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / w_mean.pow(1 - r) if duo else x_mean.pow(r)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        value = loss(s)
        if value < best:
            best, best_s, best_r = value, s, r
    return best_s, {"ratio": best_r, "loss_rtn": base, "loss": best}


def clip_ratios(w: torch.Tensor, gram: torch.Tensor, grid: Grid, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) shrink ratio (out, G) of the quantization range that minimizes that
    group's own output error Δ_g G_gg Δ_gᵀ (cross-group terms are left out, as AWQ does)."""
    gs = grid.group(w.shape[1])
    blocks = torch.stack([gram[i:i + gs, i:i + gs] for i in range(0, w.shape[1], gs)])  # (G, gs, gs)
    return clip_blocks(w, blocks, grid, n_grid, max_shrink)


def clip_blocks(w: torch.Tensor, blocks: torch.Tensor, grid: Grid, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """clip_ratios from the diagonal blocks (G, gs, gs) of the Gram matrix alone."""
    w = w.float()
    out, n = w.shape[0], blocks.shape[0]
    best_loss = torch.full((out, n), float("inf"), device=w.device)
    best = torch.ones(out, n, device=w.device)
    for i in range(int(max_shrink * n_grid)):
        ratio = 1 - i / n_grid
        delta = (w - grid.fake(w, *grid.params(w, ratio))).reshape(out, n, -1)
        loss = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def smooth_scale(w: torch.Tensor, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023): s = max|x|^α / max|w|^(1−α) per input channel, which
    moves activation outliers into the weights before both are quantized to 8 bits."""
    w_max = w.float().abs().amax(0).clamp(min=1e-5)
    return (x_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
