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
    experts = bool(cfg.experts) and cfg.expert_importance != "random"
    return width or experts or (bool(cfg.layers) and cfg.layer_importance == "block")


def plan(model, cfg: PruneConfig, ctx) -> Plan:
    """Score the model and choose the cut, without changing it."""
    structure = describe(model)
    scoring = cfg.per_kind(0.5) if cfg.ratio else cfg  # scores for every kind a global ratio may cut
    blocks = None
    if _needs_data(scoring):
        blocks = ctx.data[cfg.data or ctx.data.default()].blocks(cfg.split)[: cfg.num_samples]
    scores = compute(model, structure, scoring, blocks)
    if not cfg.ratio:
        return make_plan(model, structure, scores, cfg)
    return _global(model, structure, scores, cfg)


def _global(model, structure, scores, cfg: PruneConfig) -> Plan:
    """Bisect the one per-kind fraction whose plan removes `ratio` of the non-embedding parameters
    (plans are cheap: scores are computed once). Rounding makes the result the closest reachable."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(24):
        mid = (lo + hi) / 2
        candidate = make_plan(model, structure, scores, cfg.per_kind(mid))
        removed = candidate.summary()["removed_fraction_non_embedding"]
        if best is None or abs(removed - cfg.ratio) < abs(best.summary()["removed_fraction_non_embedding"] - cfg.ratio):
            best = candidate
        lo, hi = (mid, hi) if removed < cfg.ratio else (lo, mid)
    best.notes.append(f"global ratio {cfg.ratio}: per-kind fraction {lo:.4f} over {', '.join(cfg.kinds)}")
    return best


def apply(model, cfg: PruneConfig, ctx) -> StageOutput:
    chosen = plan(model, cfg, ctx)
    apply_plan(model, describe(model), chosen)
    if ctx.stage_dir is not None:
        write_json(ctx.stage_dir / "plan.json", chosen.to_dict())
    ctx.log.info("pruned: %d → %d non-embedding parameters (%.1f%% removed)", chosen.params_non_embedding_before,
                 chosen.params_non_embedding_after, 100 * chosen.summary()["removed_fraction_non_embedding"],
                 extra={"event": "pruned", **chosen.config})
    return StageOutput(model, {"plan": chosen.summary()})
