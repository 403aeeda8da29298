"""The stage registry: one literal dict. Grepping a stage name lands here, then on its code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsc.config import StageConfig
from dsc import distill, export, prune, quantize
from dsc.stages import cast, evaluate


@dataclass(frozen=True)
class Stage:
    config: type[StageConfig]  # the contract the core reads (dsc.config.StageConfig)
    apply: Callable  # apply(model, cfg, ctx) -> StageOutput
    changes_model: bool  # True: the runner checkpoints the model after the stage
    summary: str
    distributed: bool = False  # True: under torchrun every process runs it (others: rank 0 alone)
    # What weights the stage takes and gives, checked across the recipe at `dsc validate`:
    # float, grid (3/4/8-bit integer weights, compressed-tensors), int8 (the int8 stage's W8 / W8A8) or
    # fp (FP8 / NVFP4 / MXFP4).
    takes: tuple[str, ...] = ("float",)
    gives: str | None = "float"  # None: what it took (evaluate)
    artifact: bool = False  # True: the stage writes files (ctx.artifact_dir), published under OUT/export/

    def __post_init__(self):
        if not issubclass(self.config, StageConfig):
            raise TypeError(f"{self.config.__name__} must derive from dsc.config.StageConfig")


STAGES: dict[str, Stage] = {
    "evaluate": Stage(evaluate.EvaluateConfig, evaluate.apply, False,
                      "perplexity (stated protocol), parameters, bytes, speed and memory, next to the teacher",
                      takes=("float", "grid", "int8", "fp"), gives=None),
    "cast": Stage(cast.CastConfig, cast.apply, True, "store weights in bfloat16 / float16"),
    "prune": Stage(prune.PruneConfig, prune.apply, True,
                   "structured pruning of heads (GQA-aware), MLP channels and layers into a smaller model"),
    "distill": Stage(distill.DistillConfig, distill.apply, True,
                     "knowledge distillation from the teacher: KL on logits, hidden-state matching, LM loss",
                     distributed=True),
    "lora": Stage(distill.LoraConfig, distill.apply_lora, True,
                  "LoRA (or QLoRA) recovery fine-tuning with the distillation or LM loss, merged into the model",
                  distributed=True),
    "qat": Stage(distill.QATConfig, distill.apply_qat, True,
                 "quantization-aware distillation: weights trained through their 3/4/8-bit quantizer by the teacher",
                 distributed=True, takes=("float", "grid"), gives="grid"),
    "rtn": Stage(quantize.RTNConfig, quantize.apply_rtn, True,
                 "round-to-nearest weight quantization on a 3/4/8-bit grid (the baseline of every quantizer)",
                 gives="grid"),
    "awq": Stage(quantize.AWQConfig, quantize.apply_awq, True,
                 "AWQ 4-bit (3/8) weight quantization: activation-aware scales and clipping, layer by layer",
                 gives="grid"),
    "gptq": Stage(quantize.GPTQConfig, quantize.apply_gptq, True,
                  "GPTQ 4-bit (3/8) weight quantization: error feedback through the calibration Hessian; "
                  "awq_scales: AWQ + GPTQ", gives="grid"),
    "fp": Stage(quantize.FloatConfig, quantize.apply_float, True,
                "floating-point weights and activations: FP8 (per channel, 128×128 blocks), NVFP4, MXFP4",
                gives="fp"),
    "sensitivity": Stage(quantize.SensitivityConfig, quantize.apply_sensitivity, False,
                         "each linear's output error under candidate schemes: which layers to give more bits "
                         "(a report and a ready `schemes:` entry; the model is unchanged)", artifact=True,
                         takes=("float",), gives=None),
    "int8": Stage(quantize.Int8Config, quantize.apply_int8, True,
                  "INT8: weight-only per channel, or W8A8 with SmoothQuant and dynamic per-token activations",
                  gives="int8"),
    "export": Stage(export.ExportConfig, export.apply, False,
                    "write the model for a runtime: GGUF for llama.cpp / ollama, dsc's grids stored exactly",
                    takes=("float", "grid", "int8", "fp"), gives=None, artifact=True),
}
