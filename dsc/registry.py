"""The stage registry: one literal dict. Grepping a stage name lands here, then on its code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsc.config import Config
from dsc import prune
from dsc.stages import cast, evaluate


@dataclass(frozen=True)
class Stage:
    config: type[Config]
    apply: Callable  # apply(model, cfg, ctx) -> StageOutput
    changes_model: bool  # True: the runner checkpoints the model after the stage
    summary: str


STAGES: dict[str, Stage] = {
    "evaluate": Stage(evaluate.EvaluateConfig, evaluate.apply, False,
                      "perplexity (stated protocol), parameters, bytes, speed and memory, next to the teacher"),
    "cast": Stage(cast.CastConfig, cast.apply, True, "store weights in bfloat16 / float16"),
    "prune": Stage(prune.PruneConfig, prune.apply, True,
                   "structured pruning of heads (GQA-aware), MLP channels and layers into a smaller model"),
}
