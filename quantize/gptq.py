"""GPTQ (Frantar et al. 2023): round a weight column by column, each column's error spread onto
the columns not yet rounded, weighted by the inverse Hessian of the layer's output error.

The Hessian of ‖X Wᵀ − X Ŵᵀ‖² in a row of W is 2·XᵀX: the Gram matrix the calibration pass
already keeps (dsc.quantize.calibrate), so GPTQ costs no extra pass over the data. As in the
reference implementation: dead inputs (zero diagonal) are fixed to zero, the diagonal is damped by
`damp` × its mean, the upper Cholesky factor of H⁻¹ drives the updates, and columns are processed
in blocks of `block_size` whose error is pushed onto the rest of the matrix once per block (lazy
batch updates).

Grids: per-(row, group) scales. Without act-order they are taken lazily, from the partly updated
weights when GPTQ reaches a group's first column (the reference behaviour). With act-order
(columns visited by decreasing Hessian diagonal) the scales are *static*: taken once from the
original weights, groups kept contiguous in the original column order, so the checkpoint is the
standard group-quantized one (no `g_idx`; llm-compressor's `actorder: static`). Float grids
(FP8 blocks, NVFP4's per-tensor scale, MXFP4) always use static scales: theirs span more than a
row's group. Rows are independent given H, so linears that read one input (q/k/v, gate/up) are
rounded in one stacked call.
"""
from __future__ import annotations

import torch

from dsc.quantize.grid import Grid, Quantized, grid_params


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean diag(H); more damping if H is not
    positive definite in float32."""
    n = h.shape[0]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    mean = h.diagonal().mean().clamp(min=1e-12)
    for factor in (1, 10, 100, 1000):
        try:
            lower = torch.linalg.cholesky(h + damp * factor * mean * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("GPTQ: the Hessian stays singular after 1000× damping")


@torch.no_grad()
def gptq(w: torch.Tensor, gram: torch.Tensor, grid: Grid, damp: float = 0.01, block_size: int = 128,
         act_order: bool = True, static: Quantized | None = None) -> tuple[torch.Tensor, Quantized]:
    """GPTQ-round `w` (out, in) on `grid` for inputs with Gram matrix `gram` (in, in). Returns the
    rounded weight (float32, on the grid) and its grid parameters. `static`: scales to use (e.g.
    from a clipping search) instead of taking them from the weights."""
    dtype, w = w.dtype, w.float().clone()
    out, n = w.shape
    h = gram.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    gs = grid.group(n)
    lazy = static is None and not act_order and isinstance(grid, Grid) and grid.group_size is not None
    q_params = static if static is not None else grid_params(w.to(dtype), grid)
    scale, zero = q_params.scale.clone(), q_params.zero.clone()
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_factor(h, damp)
    q = torch.zeros_like(w)
    block = max(block_size // gs, 1) * gs if lazy else block_size  # lazy scales: whole groups per block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if lazy and col % gs == 0:  # the group's scale from its (updated) weights
                fresh = grid_params(w1[:, i:i + gs].to(dtype), grid)
                scale[:, g], zero[:, g] = fresh.scale[:, 0], fresh.zero[:, 0]
            s, z = scale[:, g:g + 1], zero[:, g:g + 1]
            qc = grid.fake(w1[:, i:i + 1], s, z)[:, 0]
            q[:, i1 + i] = qc
            e = (w1[:, i] - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return q, Quantized(q_params.grid, scale, zero, q_params.global_scale)
