"""`prune`: structured pruning into a genuinely smaller model whose config.json is true.

    plan = dsc.prune.plan(model, cfg, ctx)   # data: print it, save it
    dsc.prune.apply_plan(model, describe(model), plan)
"""
from __future__ import annotations

from dsc.fingerprint import write_json
from dsc.stages import StageOutput
from dsc.structure import describe
from dsc.prune.config import PruneConfig
from dsc.prune.importance import compute
from dsc.prune.plan import Plan, apply_plan, make_plan


def _needs_data(cfg: PruneConfig) -> bool:
    width = bool(cfg.heads or cfg.channels) and cfg.importance in ("activation", "taylor")
    return width or (bool(cfg.layers) and cfg.layer_importance == "block")


def plan(model, cfg: PruneConfig, ctx) -> Plan:
    """Score the model and choose the cut, without changing it."""
    structure = describe(model)
    blocks = None
    if _needs_data(cfg):
        blocks = ctx.data[cfg.data or ctx.data.default()].blocks(cfg.split)[: cfg.num_samples]
    return make_plan(model, structure, compute(model, structure, cfg, blocks), cfg)


def apply(model, cfg: PruneConfig, ctx) -> StageOutput:
    chosen = plan(model, cfg, ctx)
    apply_plan(model, describe(model), chosen)
    if ctx.stage_dir is not None:
        write_json(ctx.stage_dir / "plan.json", chosen.to_dict())
    ctx.log.info("pruned: %d → %d non-embedding parameters (%.1f%% removed)", chosen.params_non_embedding_before,
                 chosen.params_non_embedding_after, 100 * chosen.summary()["removed_fraction_non_embedding"],
                 extra={"event": "pruned", **chosen.config})
    return StageOutput(model, {"plan": chosen.summary()})
