"""dsc.distill — recovery training on one shared loop: knowledge distillation from the teacher
(KL on logits — forward, reverse, JSD, optionally over the teacher's top-k — hidden-state matching
with learned projections, LM loss) and LoRA / QLoRA through peft, merged back into a plain model.
Runs in one process or under torchrun / accelerate launch with DDP or FSDP."""
from dsc.distill.config import DistillConfig, KDConfig, LoraConfig, TrainConfig
from dsc.distill.objective import Objective
from dsc.distill.stage import apply, apply_lora, train_student

__all__ = ["DistillConfig", "KDConfig", "LoraConfig", "Objective", "TrainConfig", "apply", "apply_lora",
           "train_student"]
