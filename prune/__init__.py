"""dsc.prune — structured pruning into a genuinely smaller model whose config.json is true:
attention heads (GQA-aware), MLP channels, whole layers, and routed MoE experts (fused expert
tensors and router rows), for the Llama family (Llama, Mistral, Qwen2/3), Mixtral, Qwen2/3-MoE
and GPT-NeoX (channels and layers). A plan is data; applying it cuts the tensors."""
from dsc.prune.config import PruneConfig
from dsc.prune.cut import apply_plan
from dsc.prune.plan import Plan, make_plan
from dsc.prune.stage import apply, plan

__all__ = ["Plan", "PruneConfig", "apply", "apply_plan", "make_plan", "plan"]
