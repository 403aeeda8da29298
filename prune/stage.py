"""`prune`: structured pruning into a genuinely smaller model whose config.json is true.

    plan = dsc.prune.plan(model, cfg, ctx)   # data: print it, save it
    dsc.prune.apply_plan(model, describe(model), plan)
"""
from __future__ import annotations

from dsc.errors import FieldError
from dsc.fingerprint import write_json
from dsc.stages import StageOutput
from dsc.structure import describe
from dsc.prune.config import PruneConfig
from dsc.prune.importance import compute, sequential_expert_scores
from dsc.prune.cut import apply_plan
from dsc.prune.plan import Plan, expert_budget, make_plan
from dsc.prune.reconstruct import reconstruct


def _needs_data(cfg: PruneConfig) -> bool:
    width = bool(cfg.heads or cfg.channels or cfg.latent) and cfg.importance in ("activation", "taylor", "obs")
    experts = bool(cfg.experts) and (cfg.expert_importance != "random" or cfg.expert_merge == "merge")
    latent = bool(cfg.latent)  # even magnitude / random: the latent norms are rescaled by measured energy
    return width or experts or latent or (bool(cfg.layers) and cfg.layer_importance == "block")


def _blocks(cfg: PruneConfig, ctx):
    return ctx.data[cfg.data or ctx.data.default()].blocks(cfg.split)[: cfg.num_samples]


def plan(model, cfg: PruneConfig, ctx) -> Plan:
    """Score the model and choose the cut, without changing it."""
    structure = describe(model)
    kinds = cuttable(structure, cfg) if cfg.ratio else []
    scoring = cfg.per_kind(0.5, kinds) if cfg.ratio else cfg  # scores for every kind a global ratio may cut
    blocks = None
    if _needs_data(scoring):
        blocks = _blocks(cfg, ctx)
    scores = compute(model, structure, scoring, blocks)
    if cfg.experts and cfg.sequential and cfg.expert_importance != "random" and not cfg.ratio:
        scores.experts = sequential_expert_scores(model, structure, cfg, blocks, expert_budget(model, structure, cfg))
    if not cfg.ratio:
        return make_plan(model, structure, scores, cfg)
    return _global(model, structure, scores, cfg, kinds)


def cuttable(structure, cfg: PruneConfig) -> list[str]:
    """The kinds of a global ratio this model has: others are skipped with a note, not an error."""
    family = structure.family
    has = {"heads": family.fixed_head_dim and not family.qkv and not family.head_norm, "channels": True,
           "layers": len(structure.layers) > 1, "experts": bool(structure.sparse()), "latent": family.mla}
    kinds = [k for k in cfg.kinds if has[k]]
    if not kinds:
        raise FieldError("kinds", f"{family.name} cannot cut any of {cfg.kinds}: "
                         f"it can cut {[k for k, ok in has.items() if ok]}")
    return kinds


def _global(model, structure, scores, cfg: PruneConfig, kinds: list[str]) -> Plan:
    """Bisect the one per-kind fraction whose plan removes `ratio` of the non-embedding parameters
    (plans are cheap: scores are computed once). Rounding makes the result the closest reachable."""
    lo, hi, best, best_f = 0.0, 0.99, None, 0.0
    for _ in range(24):
        mid = (lo + hi) / 2
        candidate = make_plan(model, structure, scores, cfg.per_kind(mid, kinds))
        removed = candidate.summary()["removed_fraction_non_embedding"]
        if best is None or abs(removed - cfg.ratio) < abs(best.summary()["removed_fraction_non_embedding"] - cfg.ratio):
            best, best_f = candidate, mid
        lo, hi = (mid, hi) if removed < cfg.ratio else (lo, mid)
    achieved = best.summary()["removed_fraction_non_embedding"]
    skipped = [k for k in cfg.kinds if k not in kinds]
    best.notes.append(f"global ratio {cfg.ratio}: {achieved:.4f} removed with fraction {best_f:.4f} of "
                      f"{', '.join(kinds)}" + (f"; skipped (not in this model): {', '.join(skipped)}" if skipped else ""))
    return best


def _reconstructs(cfg: PruneConfig, ctx, chosen: Plan) -> bool:
    """Whether the refit runs: on when asked (the default) and something it refits was cut. A run
    without data sources skips the default with a note, and refuses an explicit `reconstruct: true`."""
    if not (chosen.keep_heads or chosen.keep_channels or chosen.keep_expert_channels):
        return False
    if not cfg.reconstruct:
        if cfg.importance == "obs":
            chosen.notes.append("importance obs without reconstruct: obs chooses the units the refit repairs "
                                "best, and its plain cut can be far worse than activation's (docs/benchmarks.md)")
            ctx.log.warning("prune: %s", chosen.notes[-1], extra={"event": "obs_without_reconstruct"})
        return False
    if ctx.data.sources:
        return True
    if "reconstruct" in cfg.model_fields_set:
        raise FieldError("reconstruct", "the least-squares refit needs calibration data and this run has no data "
                         "sources: add one under `data:` or set `reconstruct: false`")
    chosen.notes.append("reconstruct skipped: the run has no data sources (add one under `data:` for the refit)")
    ctx.log.warning("prune: %s", chosen.notes[-1], extra={"event": "reconstruct_skipped"})
    return False


def apply(model, cfg: PruneConfig, ctx) -> StageOutput:
    chosen = plan(model, cfg, ctx)
    if _reconstructs(cfg, ctx, chosen):
        reconstruct(model, describe(model), chosen, _blocks(cfg, ctx), cfg.batch_size, cfg.reconstruct_damp, ctx.log)
    else:
        apply_plan(model, describe(model), chosen)
    if ctx.stage_dir is not None:
        write_json(ctx.stage_dir / "plan.json", chosen.to_dict())
    ctx.log.info("pruned: %d → %d non-embedding parameters (%.1f%% removed)", chosen.params_non_embedding_before,
                 chosen.params_non_embedding_after, 100 * chosen.summary()["removed_fraction_non_embedding"],
                 extra={"event": "pruned", **{k: v for k, v in chosen.config.items() if k != "layer_types"}})
    return StageOutput(model, {"plan": chosen.summary()})
