"""dsc: turn a Hugging Face causal LM into a Lite model from one YAML recipe.

Python API (the same code paths as the CLI):

    import dsc
    recipe = dsc.load_recipe("recipes/v3_to_lite.yaml")
    run_dir = dsc.run_recipe(recipe, output="runs/demo")

    ctx = dsc.Context.create(tokenizer, {"wiki": dsc.TextSource(path=...)})
    out = dsc.apply_stage("evaluate", model, dsc.STAGES["evaluate"].config(data="wiki"), ctx)
"""
from __future__ import annotations

__version__ = "0.1.0"

from dsc.context import Context  # noqa: E402
from dsc.data.sources import DatasetsSource, JsonlSource, ParquetSource, TeacherSource, TextSource  # noqa: E402
from dsc.errors import DscError, DscInputError, ExitCode  # noqa: E402
from dsc.models import save_model  # noqa: E402
from dsc.recipe import Recipe, load_recipe, validate  # noqa: E402
from dsc.registry import STAGES  # noqa: E402
from dsc.runner import run_recipe  # noqa: E402


def apply_stage(name: str, model, config, ctx: Context):
    """Run one stage on an in-memory model; returns StageOutput(model, metrics)."""
    if name not in STAGES:
        from dsc.errors import did_you_mean

        raise DscInputError("stage", f"unknown stage {name!r}{did_you_mean(name, STAGES)}")
    if isinstance(config, dict):
        config = STAGES[name].config.parse(config, name)
    if STAGES[name].changes_model and ctx.teacher_is(model):
        import copy

        model = copy.deepcopy(model)  # stages may edit in place; the context's teacher stays intact
    return STAGES[name].apply(model, config, ctx)


__all__ = ["Context", "DatasetsSource", "DscError", "DscInputError", "ExitCode", "JsonlSource", "ParquetSource",
           "Recipe", "STAGES", "TeacherSource", "TextSource", "apply_stage", "load_recipe", "run_recipe", "save_model",
           "validate"]
