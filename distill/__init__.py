"""dsc.distill — knowledge distillation and LoRA recovery on one training loop. Stages land here."""
