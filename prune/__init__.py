"""dsc.prune — structured pruning: attention heads (GQA-aware), MLP channels and whole layers of
dense Llama-family models, planned from importance scores and applied into a smaller model whose
config.json is true. MoE experts and other families come next."""
from dsc.prune.config import PruneConfig
from dsc.prune.plan import Plan, apply_plan, make_plan
from dsc.prune.stage import apply, plan

__all__ = ["Plan", "PruneConfig", "apply", "apply_plan", "make_plan", "plan"]
