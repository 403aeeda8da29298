"""`qat`: quantization-aware distillation. The weights train through their quantizer.

Every target linear's weight is reparametrized as fake(w) = (clamp(round(w/s) + z) − z)·s: the
forward pass computes with the weight as it will be stored. Rounding passes gradients straight
through (STE), and the clamp passes none outside the range. The scales s are learned too when
`learn_scales` is set (LSQ: their gradient comes through the same STE).

Training is the shared loop (`train_student`) with the KD objective against the float teacher,
with its budget, checkpoints, resume and DDP/FSDP.

The start (`init`): `awq` searches AWQ's scales and clipping here and folds the scales into the
float weights without rounding them (the best start: measured on stories260K W3 g32 after 100
steps, KL to the teacher 0.145 from awq, 0.169 from rtn, 0.314 from an `awq` stage's already
rounded weights); `rtn` starts from round-to-nearest; `auto` takes the previous stage's grid when
the model brings one (after `rtn` / `awq`), else round-to-nearest.

At the end each weight is replaced by fake(w) with the final scales and attached as
compressed-tensors, exactly as `rtn` / `awq` leave a model. The saved checkpoint reloads with
the logits of the fake-quantized model that was trained.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from dsc.distill.stage import rebuilt, train_student
from dsc.errors import FieldError
from dsc.quantize import ct
from dsc.quantize.grid import Grid, Quantized
from dsc.quantize.stage import check_untied, grid_for, select
from dsc.stages import StageOutput


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class FakeQuant(nn.Module):
    """A parametrization of a linear's weight (out, in) onto `grid` with scale and zero point (out, G)."""

    def __init__(self, grid: Grid, scale: torch.Tensor, zero: torch.Tensor, learn_scale: bool):
        super().__init__()
        self.grid = grid
        self.scale = nn.Parameter(scale.clone().float(), requires_grad=learn_scale)
        self.register_buffer("zero", zero.clone().float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = w.reshape(w.shape[0], self.scale.shape[1], -1)
        s = self.scale.abs().clamp(min=1e-8)[..., None]  # a learned scale must stay positive
        q = torch.clamp(_round_ste(g / s) + self.zero[..., None], self.grid.qmin, self.grid.qmax)
        return ((q - self.zero[..., None]) * s).reshape(w.shape).to(w.dtype)


def _inherited(module: nn.Module, grid: Grid) -> Quantized | None:
    """The compressed-tensors grid a previous stage left on `module`, when it is `grid`."""
    scheme = getattr(module, "quantization_scheme", None)
    w = getattr(scheme, "weights", None)
    if w is None or (w.num_bits, w.group_size, w.symmetric) != (grid.bits, grid.group_size, grid.symmetric):
        return None
    scale = module.weight_scale.detach().float().reshape(module.weight.shape[0], -1)
    zero = getattr(module, "weight_zero_point", None)
    zero = torch.zeros_like(scale) if zero is None else zero.detach().float().reshape(scale.shape)
    return Quantized(grid, scale, zero)


def _start(model: nn.Module, names: list[str], grid: Grid, inherit: bool) -> tuple[dict[str, Quantized], str]:
    """Scales and zero points to start from: the model's own on this grid (a previous stage's, or
    init: awq's) when every target has them, else round-to-nearest's."""
    found = {n: _inherited(model.get_submodule(n), grid) for n in names} if inherit else {}
    if found and all(q is not None for q in found.values()):
        return found, "previous stage"
    return {n: Quantized(grid, *grid.params(model.get_submodule(n).weight.detach())) for n in names}, \
        "round-to-nearest"


def _awq_start(model: nn.Module, cfg, ctx) -> None:
    """AWQ's scales and clipping, searched on calibration blocks and folded in, weights unrounded."""
    from dsc.quantize import AWQConfig
    from dsc.quantize.stage import apply_awq

    grid = {k: getattr(cfg, k) for k in ("bits", "group_size", "symmetric", "targets", "ignore", "format")}
    awq = AWQConfig(**grid, data=cfg.data, split="calibration", num_samples=cfg.calibration_samples)
    apply_awq(model, awq, ctx, round_weights=False)


def _plain(model: nn.Module) -> nn.Module:
    """The model without compressed-tensors' wrappers: the same weights (already on the grid) in a
    fresh instance of its class, so parametrizations and training see plain linears."""
    if not ct.is_quantized(model):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v for k, v in model.state_dict().items() if k not in ct.qparam_names(model)}
    return rebuilt(config, state, "qat: the quantized model's float weights").to(next(model.parameters()).device)


def apply(model, cfg, ctx) -> StageOutput:
    if cfg.parallel == "fsdp":  # FSDP gathers a plain state dict; the parametrized weights are not one
        raise FieldError("parallel", "qat does not run under FSDP yet (its weights are parametrized): use "
                                     "parallel: ddp (or auto) under torchrun / accelerate launch")
    names, experts = select(model, cfg)
    if experts:
        raise FieldError("ignore", f"qat trains nn.Linear weights; fused MoE experts ({experts[0]}, …) are not "
                                   "supported yet: add \"re:.*mlp\\\\.experts\" to ignore (or quantize them with awq "
                                   "afterwards)")
    check_untied(model, names)
    grid = grid_for(cfg, model, names)
    if cfg.init == "awq":
        _awq_start(model, cfg, ctx)
    start, source = _start(model, names, grid, inherit=cfg.init != "rtn")
    source = "awq (searched here, weights left in float)" if cfg.init == "awq" else source
    dtype = next(model.parameters()).dtype
    model = _plain(model).float().requires_grad_(True)
    for name in names:
        q = start[name]
        parametrize.register_parametrization(model.get_submodule(name), "weight",
                                             FakeQuant(grid, q.scale, q.zero, cfg.learn_scales))
    student, metrics = train_student(model, cfg, ctx)  # DDP: every process keeps the model
    done = _export(student, names, grid)
    student = student.to(dtype).eval()
    ct.attach(student, done, False, cfg.format)
    metrics.update(quantized_linears=len(done), start=source, scheme=ct.describe(student))
    return StageOutput(student, metrics)


@torch.no_grad()
def _export(model: nn.Module, names: list[str], grid: Grid) -> dict[str, Quantized]:
    """Bake fake(w) into each weight (scales rounded to the stored dtype first) and drop the
    parametrizations: the plain weights lie on the grid with the learned scales."""
    done = {}
    for name in names:
        module = model.get_submodule(name)
        fq = module.parametrizations.weight[0]
        latent = module.parametrizations.weight.original.detach()
        scale = grid.store(fq.scale.detach().abs().clamp(min=1e-8)).to(latent.dtype).float()
        zero = fq.zero.detach()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.data.copy_(grid.fake(latent, scale, zero).to(module.weight.dtype))
        done[name] = Quantized(grid, scale, zero)
    return done
