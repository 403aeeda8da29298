"""`prune`: structured pruning into a genuinely smaller model whose config.json is true.

    plan = dsc.prune.plan(model, cfg, ctx)   # data: print it, save it
    dsc.prune.apply_plan(model, describe(model), plan)
"""
from __future__ import annotations

import torch

from dsc.errors import FieldError
from dsc.fingerprint import write_json
from dsc.stages import StageOutput
from dsc.structure import BIAS_FLAGS, describe
from dsc.quantize.progress import atomic_save
from dsc.prune.config import PruneConfig
from dsc.prune.importance import compute, sequential_expert_scores
from dsc.prune.cut import apply_plan
from dsc.prune.plan import Plan, add_bias_flags, expert_budget, make_plan
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
    depth = cfg.reconstruct_depth and chosen.drop_layers
    if not (chosen.keep_heads or chosen.keep_channels or chosen.keep_expert_channels or chosen.keep_latent or depth):
        return False
    if not cfg.reconstruct:
        if cfg.importance == "obs":
            chosen.notes.append("importance obs without reconstruct: obs chooses the units the refit repairs "
                                "best, and its plain cut can be far worse than activation's (docs/benchmarks.md)")
            ctx.log.warning("prune: %s", chosen.notes[-1], extra={"event": "obs_without_reconstruct"})
        return False
    if ctx.data.sources:
        return True
    asked = [k for k in ("reconstruct", "reconstruct_depth", "reconstruct_bias") if k in cfg.model_fields_set]
    if asked:
        raise FieldError(asked[0], "the least-squares refit needs calibration data and this run has no data "
                         "sources: add one under `data:` or set `reconstruct: false`")
    chosen.notes.append("reconstruct skipped: the run has no data sources (add one under `data:` for the refit)")
    ctx.log.warning("prune: %s", chosen.notes[-1], extra={"event": "reconstruct_skipped"})
    return False


def check_bias(cfg: PruneConfig, structure) -> None:
    """Before any work: `reconstruct_bias` needs a config flag for the projections the cut refits."""
    if not cfg.reconstruct_bias:
        return
    flags = BIAS_FLAGS.get(structure.model_type, {})
    can = {"heads": "attention_bias" in flags, "channels": "mlp_bias" in flags}
    asked = [k for k in can if getattr(cfg, k) or (cfg.ratio and k in cfg.kinds)]
    if not any(can[k] for k in asked):
        has = ", ".join(f"{t} ({', '.join(f)})" for t, f in BIAS_FLAGS.items())
        raise FieldError("reconstruct_bias", f"{structure.model_type} has no config flag that gives the projection "
                         f"refit after cutting {' or '.join(asked) or 'this'} a bias (o_proj for heads, down_proj for "
                         f"channels), so the compensation would not reload; set reconstruct_bias: false "
                         f"(known flags: {has})")


def bias_targets(cfg: PruneConfig, structure, chosen: Plan) -> tuple[str, ...]:
    """The refit projections that get an intercept; turns on the config flags that give them one."""
    if not cfg.reconstruct_bias:
        return ()
    flags = BIAS_FLAGS.get(structure.model_type, {})
    wanted = {"o_proj": ("attention_bias", bool(chosen.keep_heads)),
              "down_proj": ("mlp_bias", bool(chosen.keep_channels))}
    refits = {k: flag for k, (flag, cut) in wanted.items() if cut and flag in flags}
    if not refits:
        raise FieldError("reconstruct_bias", f"the plan cuts no heads or dense-MLP channels whose refit "
                         f"{structure.model_type} can give a bias: set reconstruct_bias: false")
    add_bias_flags(structure, chosen, sorted(set(refits.values())))
    return tuple(refits)


def _planned(model, cfg: PruneConfig, ctx) -> Plan:
    """The plan, or the one a killed run saved in its work folder (the refit resumes against it)."""
    saved = ctx.work_dir / "plan.pt" if ctx.work_dir is not None else None
    if saved is not None and saved.is_file():
        ctx.log.info("prune: resuming with the saved plan", extra={"event": "resume", "what": "plan"})
        return torch.load(saved, weights_only=False)
    chosen = plan(model, cfg, ctx)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(chosen, saved)
    return chosen


def apply(model, cfg: PruneConfig, ctx) -> StageOutput:
    structure = describe(model)  # of the unpruned model: planning leaves it as it is
    check_bias(cfg, structure)
    chosen = _planned(model, cfg, ctx)
    if _reconstructs(cfg, ctx, chosen):
        reconstruct(model, structure, chosen, _blocks(cfg, ctx), cfg.batch_size, cfg.reconstruct_damp, ctx.log,
                    depth=cfg.reconstruct_depth, bias=bias_targets(cfg, structure, chosen), work_dir=ctx.work_dir)
    else:
        apply_plan(model, structure, chosen)
    if ctx.stage_dir is not None:
        write_json(ctx.stage_dir / "plan.json", chosen.to_dict())
    ctx.log.info("pruned: %d → %d non-embedding parameters (%.1f%% removed)", chosen.params_non_embedding_before,
                 chosen.params_non_embedding_after, 100 * chosen.summary()["removed_fraction_non_embedding"],
                 extra={"event": "pruned", **{k: v for k, v in chosen.config.items() if k != "layer_types"}})
    return StageOutput(model, {"plan": chosen.summary()})
