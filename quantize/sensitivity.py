"""Which layers want more bits: each linear's output error under each candidate scheme.

    rows = sensitivity(model, ["int4-g64", "int8", "fp8", "nvfp4"], blocks)   # dsc.quantize.sensitivity

Layer by layer, as calibration runs (dsc.quantize.calibrate: one float pass per decoder layer,
its outputs feed the next), the Gram matrix G of every linear's input gives, with no further pass,
the relative output error of rounding that linear to nearest on a candidate grid:
‖X (W − Ŵ)ᵀ‖² / ‖X Wᵀ‖² = Σ (ΔG)⊙Δ / Σ (WG)⊙W over the calibration tokens. The linears with the
largest error on the cheapest candidate are the ones to give more bits; the `sensitivity` stage
writes the table and a `schemes:` block that does so, ready for the `rtn` / `gptq` / `fp` stages.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from dsc.errors import FieldError
from dsc.quantize.calibrate import capture, forward, observe, placed
from dsc.quantize.fp import FloatGrid
from dsc.quantize.grid import Grid
from dsc.quantize.search import output_error
from dsc.structure import describe

_INT = re.compile(r"int([348])(?:-g(\d+))?(-asym)?")


def parse_scheme(name: str, field: str = "candidates") -> Grid | FloatGrid:
    """`int4-g64`, `int8`, `int3-g128-asym`, `fp8`, `fp8-block`, `nvfp4`, `mxfp4` → its grid."""
    if name in ("fp8", "fp8-block", "nvfp4", "mxfp4"):
        return FloatGrid.named(name)
    m = _INT.fullmatch(name)
    if m is None:
        raise FieldError(field, f"{name!r} is no scheme: use int4-g64, int8, int3-g128-asym, fp8, fp8-block, nvfp4 "
                                "or mxfp4")
    return Grid(int(m[1]), int(m[2]) if m[2] else None, m[3] is None)


def to_group(name: str) -> dict:
    """A scheme name as a stage's `schemes:` entry (without targets)."""
    grid = parse_scheme(name)
    if isinstance(grid, FloatGrid):
        return {"scheme": name}
    return {"scheme": "int", "bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric}


@torch.no_grad()
def sensitivity(model: nn.Module, candidates: list[str], blocks: torch.Tensor, batch_size: int = 8,
                names: list[str] | None = None, device: torch.device | None = None) -> list[dict]:
    """One row per (linear in `names` — default: every linear in the decoder layers — and candidate
    the linear's width takes): {"linear", "scheme", "error"} with the relative output error."""
    grids = {c: parse_scheme(c) for c in candidates}
    structure = describe(model)
    layers = model.get_submodule(structure.family.layers)
    device = device or next(model.parameters()).device
    inputs = capture(model, layers, blocks, batch_size, device)
    rows = []
    for layer in structure.layers:
        prefix = layer.path + "."
        linears = {n: m for n, m in layer.module.named_modules() if isinstance(m, nn.Linear)
                   and (names is None or prefix + n in names)}
        with placed(layer.module, device):
            seen = observe(layer.module, inputs, linears)
            for st in seen.stats:
                gram = st.gram_mean
                for n in st.linears:
                    w = linears[n].weight.detach().float()
                    signal = float(((w @ gram) * w).sum()) or 1.0
                    for c, grid in grids.items():
                        try:
                            grid.group(w.shape[1], prefix + n)
                        except FieldError:
                            continue  # this width does not take the candidate's groups
                        rows.append({"linear": prefix + n, "scheme": c,
                                     "error": float(output_error(w, grid.rtn(w), gram)) / signal})
            inputs = forward(layer.module, inputs)
    return rows


def suggest(rows: list[dict], cheap: str, better: str, top: int) -> dict:
    """The `top` linears with the largest error on `cheap`, as a `schemes:` entry giving them `better`."""
    on_cheap = sorted((r for r in rows if r["scheme"] == cheap), key=lambda r: -r["error"])[:top]
    names = [r["linear"] for r in on_cheap]
    return {"targets": names, **to_group(better)} if names else {}


def markdown(rows: list[dict], candidates: list[str], suggestion: dict) -> str:
    table = {}
    for r in rows:
        table.setdefault(r["linear"], {})[r["scheme"]] = r["error"]
    cheap = candidates[0]
    order = sorted(table, key=lambda n: -table[n].get(cheap, 0.0))
    lines = ["# Quantization sensitivity", "",
             "Relative output error ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² of round-to-nearest on each scheme, over the calibration "
             f"tokens, each linear fed the float model's inputs; sorted by {cheap}.", "",
             "| linear | " + " | ".join(candidates) + " |", "|---|" + "---|" * len(candidates)]
    for n in order:
        lines.append(f"| {n} | " + " | ".join(f"{table[n][c]:.2e}" if c in table[n] else "–" for c in candidates)
                     + " |")
    if suggestion:
        lines += ["", f"Give the {len(suggestion['targets'])} most sensitive linears {candidates[-1]}: add to the "
                  "stage", "", "```yaml", "schemes:", f"  - targets: [{', '.join(suggestion['targets'])}]"]
        lines += [f"    {k}: {'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in suggestion.items() if k != "targets"]
        lines.append("```")
    return "\n".join(lines) + "\n"
