"""dsc.distill — recovery training on one shared loop: knowledge distillation from the teacher
(KL on logits — forward, reverse, JSD, optionally over the teacher's top-k — hidden-state matching
with learned projections, LM loss), LoRA / QLoRA through peft merged back into a plain model, and
quantization-aware distillation (`qat`: weights trained through their quantizer).
Runs in one process or under torchrun / accelerate launch with DDP or FSDP."""
from dsc.distill.config import DistillConfig, KDConfig, LoraConfig, QATConfig, TrainConfig
from dsc.distill.objective import Objective
from dsc.distill.qat import apply as apply_qat
from dsc.distill.stage import apply, apply_lora, train_student

__all__ = ["DistillConfig", "KDConfig", "LoraConfig", "Objective", "QATConfig", "TrainConfig", "apply", "apply_lora",
           "apply_qat", "train_student"]
