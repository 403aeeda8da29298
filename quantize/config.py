"""Schemas of the quantization stages: `rtn`, `awq`, `gptq`, `int8` and `fp` (FP8, NVFP4, MXFP4)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dsc.config import Config, StageConfig, check_device, check_regexes


class TargetsConfig(StageConfig):
    """Which linears a stage quantizes. A pattern is a class name ("Linear"), a module name or
    its last components ("mlp.down_proj"), or a regex over the full name ("re:.*\\.o_proj");
    one that matches nothing is an error. MoE models' fused routed experts ("mlp.experts") count as
    linears: "Linear" takes them, and an `ignore` such as "re:.*mlp\\.experts" keeps them in float."""

    targets: list[str] = Field(default_factory=lambda: ["Linear"], description="modules to quantize (fused MoE "
                                                                               "experts count as linears)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="modules left in float "
                                                                               "(the LM head by default)")
    format: Literal["auto", "pack-quantized", "int-quantized"] = Field(
        "auto", description="compressed-tensors format written by save: pack-quantized (codes packed into "
                            "int32, what llm-compressor writes for W4A16 and vLLM serves), int-quantized (one int8 "
                            "per weight); auto: pack-quantized for symmetric weight-only, else int-quantized")

    scale_dtype: Literal["weight", "float16"] = Field(
        "weight", description="float16: every scale is rounded to a float16 value while it is searched (asymmetric "
                              "grids: 7 significant bits), so an `export: {format: gguf}` stores the grid bit-exactly "
                              "as Q4_0 / Q4_1 / Q8_0 blocks; weight: scales in the weights' dtype")

    @field_validator("targets", "ignore")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        return check_regexes(v, prefix="re:")


class GridConfig(TargetsConfig):
    bits: Literal[3, 4, 8] = Field(4, description="bits per weight")
    group_size: int | None = Field(128, gt=0, description="input columns sharing a scale (null: one scale per "
                                                          "output channel); must divide every target's inputs")
    symmetric: bool = Field(True, description="symmetric grid (no zero point); false: asymmetric with an "
                                              "integer zero point per group (saved int-quantized: one byte per "
                                              "weight, see `format`)")

    @model_validator(mode="after")
    def _loadable(self):
        if not self.symmetric and self.format == "pack-quantized":
            raise ValueError("asymmetric pack-quantized checkpoints do not load back in transformers (their packed "
                             "zero points are refused: llm-compressor issue #1618); use symmetric: true, or "
                             "format: auto (int-quantized)")
        return self


class CalibrationConfig(StageConfig):
    data: str | None = Field(None, description="calibration data source (default: the recipe's first)")
    split: Literal["calibration", "train", "eval", "all"] = Field("calibration", description="split to calibrate on")
    num_samples: int = Field(64, gt=0, description="calibration blocks (sequences of the source's block_size)")
    batch_size: int = Field(8, gt=0, description="calibration blocks per forward pass")
    propagate: bool = Field(True, description="feed each layer the outputs of the already quantized layers before "
                                              "it (false: the float model's)")
    calibration_device: str | None = Field(None, description="device the layers are calibrated on, one at a time "
                                                             "(default: the recipe's device); e.g. cuda for a model "
                                                             "kept in CPU memory")

    @field_validator("calibration_device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return check_device(v, allow_auto=False)


# The activation modes each floating-point scheme takes, its default first.
FLOAT_ACTIVATIONS = {"fp8": ("dynamic", "static", "none"), "fp8-block": ("dynamic", "none"),
                     "nvfp4": ("static", "none"), "mxfp4": ("dynamic", "none")}


def float_mode(scheme: str, activations: str | None) -> str:
    """`activations` (None: the scheme's default), checked against what `scheme` takes."""
    mode = activations or FLOAT_ACTIVATIONS[scheme][0]
    if mode not in FLOAT_ACTIVATIONS[scheme]:
        raise ValueError(f"activations: {mode} is not a {scheme} scheme; use one of {FLOAT_ACTIVATIONS[scheme]}")
    return mode


class SchemeGroup(Config):
    """Another grid for some of a stage's linears: one compressed-tensors config group of its own.
    `scheme: int` is an integer grid (bits, group_size, symmetric); the others are floating-point."""

    targets: list[str] = Field(description="linears this group takes (patterns as in the stage's `targets`; the "
                                           "first group that matches a linear takes it)")
    scheme: Literal["int", "fp8", "fp8-block", "nvfp4", "mxfp4"] = Field("int", description="the grid")
    bits: Literal[3, 4, 8] = Field(4, description="int: bits per weight")
    group_size: int | None = Field(128, gt=0, description="int: input columns per scale (null: per channel)")
    symmetric: bool = Field(True, description="int: symmetric grid")
    activations: Literal["dynamic", "static", "none"] | None = Field(
        None, description="inputs quantized at run time, as in `fp` (int: dynamic only at 8 bits, per token); "
                          "default: none for int, else the scheme's (static for nvfp4, else dynamic)")

    @field_validator("targets")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one target")
        return check_regexes(v, prefix="re:")

    @model_validator(mode="after")
    def _valid(self):
        mode = self.act_mode
        if self.scheme == "int" and mode != "none" and not (mode == "dynamic" and self.bits == 8):
            raise ValueError("integer activations are int8 per token (dynamic) with bits: 8, or none")
        return self

    @property
    def act_mode(self) -> str:
        if self.scheme == "int":
            return self.activations or "none"
        return float_mode(self.scheme, self.activations)


class MixedSchemes(Config):
    schemes: list[SchemeGroup] = Field(default_factory=list, description="other grids for some linears (a "
                                       "non-uniform recipe, e.g. 8-bit for sensitive layers, FP8 attention + W4 MLP); "
                                       "the linears no group takes use the stage's own")


class RTNConfig(GridConfig, MixedSchemes):
    """Round-to-nearest on the grid: the baseline every quantizer is measured against."""


class AWQSearch(Config):
    """The knobs of AWQ's per-channel scale search."""

    duo_scaling: bool = Field(True, description="scale candidates x̄^r / w̄^(1−r) (false: x̄^r, the paper's)")
    n_grid: int = Field(20, ge=2, description="points of the scale-exponent and clipping searches")
    loss: Literal["module", "linear"] = Field(
        "module", description="what the scale search scores for norm-fed groups (q/k/v, gate/up): module: the "
                              "attention block's / MLP's output on `loss_samples` blocks (AutoAWQ's objective); "
                              "linear: the group's own outputs on every calibration token (faster). A single "
                              "linear (o, down) is always scored exactly on every token")
    loss_samples: int = Field(8, gt=0, description="calibration blocks the module loss replays")


class AWQConfig(GridConfig, CalibrationConfig, AWQSearch):
    """Activation-aware weight quantization: per-channel scales and clipping searched on calibration data."""

    clip: bool = Field(True, description="search a clipping ratio per (row, group); q/k are never clipped")


class GPTQKnobs(Config):
    dampening: float = Field(0.01, gt=0, le=1, description="λ added to the Hessian's diagonal, as a fraction of "
                                                           "its mean")
    block_size: int = Field(128, gt=0, description="columns per lazy batch update")
    act_order: bool = Field(True, description="round columns by decreasing Hessian diagonal, with static groups "
                                              "(scales from the original weights), so the saved format stays the "
                                              "standard one (llm-compressor's actorder: static)")


class GPTQConfig(GridConfig, CalibrationConfig, AWQSearch, GPTQKnobs, MixedSchemes):
    """GPTQ: each weight column rounded in turn, its error spread onto the columns not yet rounded
    through the inverse Hessian of the layer's output error (the calibration Gram matrix)."""

    awq_scales: bool = Field(False, description="search and fold AWQ's per-channel scales first (AWQ + GPTQ; "
                                                "the search knobs are AWQ's: duo_scaling, n_grid, loss)")
    clip: bool = Field(False, description="take each (row, group)'s scale from AWQ's clipping search (q/k "
                                          "excepted) instead of its range")

    @model_validator(mode="after")
    def _one_grid_for_scales(self):
        if self.awq_scales and self.schemes:
            raise ValueError("awq_scales searches one grid per scale group: leave out `schemes`, or awq_scales")
        return self


class FloatConfig(TargetsConfig, CalibrationConfig, GPTQKnobs, MixedSchemes):
    """Floating-point weights (and activations): FP8 E4M3, NVFP4, MXFP4, saved as compressed-tensors
    float-quantized / nvfp4-pack-quantized / mxfp4-pack-quantized (llm-compressor's FP8_DYNAMIC,
    FP8_BLOCK, NVFP4, MXFP4 schemes)."""

    scheme: Literal["fp8", "fp8-block", "nvfp4", "mxfp4"] = Field(
        "fp8", description="fp8: E4M3 weights, one scale per output channel; fp8-block: 128×128 weight blocks "
                           "(DeepSeek-V3's format); nvfp4: E2M1 in groups of 16 with E4M3 scales and a global "
                           "scale; mxfp4: E2M1 in groups of 32 with power-of-two scales")
    activations: Literal["dynamic", "static", "none"] | None = Field(
        None, description="inputs quantized at run time (default: static for nvfp4, else dynamic): dynamic: fp8 per token (per 128-group with "
                               "fp8-block), mxfp4 per 32; static: one scale per tensor from calibration (fp8), "
                               "nvfp4's global input scale (it needs one); none: weight-only")
    gptq: bool = Field(False, description="round with GPTQ on calibration data (else to nearest)")

    @model_validator(mode="after")
    def _scheme(self):
        float_mode(self.scheme, self.activations)
        if self.format != "auto":
            raise ValueError(f"format: {self.format} is an integer format; {self.scheme} is saved in its own "
                             "(leave format out)")
        if self.scale_dtype != "weight":
            raise ValueError("scale_dtype applies to integer grids; leave it out")
        return self

    @property
    def act_mode(self) -> str:
        return float_mode(self.scheme, self.activations)

    @property
    def needs_data(self) -> bool:
        return self.gptq or self.act_mode == "static" or any(g.act_mode == "static" for g in self.schemes)


class Int8Config(TargetsConfig, CalibrationConfig):
    """INT8: weight-only per channel, or W8A8 (per-channel weights, dynamic per-token activations)
    with SmoothQuant."""

    mode: Literal["weight_only", "w8a8"] = Field("w8a8", description="weight_only: int8 weights, float "
                                                                     "activations; w8a8: activations too")
    smoothing: float | None = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength α for w8a8 "
                                                                 "(null: no smoothing)")
    backend: Literal["compressed-tensors", "bitsandbytes"] = Field(
        "compressed-tensors", description="compressed-tensors (any device; saved for transformers and vLLM) or "
                                          "bitsandbytes LLM.int8 (CUDA only, weight_only)")

    @model_validator(mode="after")
    def _backend(self):
        if self.backend == "bitsandbytes" and self.mode != "weight_only":
            raise ValueError("backend bitsandbytes runs LLM.int8 (int8 weights, mixed-precision outliers): "
                             "use mode: weight_only with it")
        return self

    @property
    def needs_data(self) -> bool:
        return self.mode == "w8a8" and self.smoothing is not None and self.backend == "compressed-tensors"


class SensitivityConfig(CalibrationConfig):
    """Each linear's output error under candidate schemes, on calibration data: which layers to give
    more bits. Writes sensitivity.md / sensitivity.json (under OUT/export/); the model is unchanged."""

    targets: list[str] = Field(default_factory=lambda: ["Linear"], description="linears to measure (as in `rtn`)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="linears left out")
    candidates: list[str] = Field(default_factory=lambda: ["int4-g64", "int8", "fp8"],
                                  description="schemes to score, cheapest first: int4-g64, int8 (per channel), "
                                              "int3-g128-asym, fp8, fp8-block, nvfp4, mxfp4")
    top: int = Field(8, ge=0, description="how many of the most sensitive linears (on the first candidate) the "
                                          "suggested `schemes:` entry gives the last candidate")
    file: str = Field("sensitivity.md", pattern=r"^[\w.-]+\.md$",
                      description="the report's name in OUT/export/ (the rows go to the same name in .json)")

    @field_validator("candidates")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        from dsc.quantize.sensitivity import parse_scheme

        if not v:
            raise ValueError("name at least one candidate")
        for name in v:
            parse_scheme(name)
        return v

    @property
    def format(self) -> str:
        return "report"
