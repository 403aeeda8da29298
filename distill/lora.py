"""The peft adapter: wrap a model with a LoRA adapter, merge it back into a plain model. Every
peft call of dsc is in this file (QLoRA's NF4 base comes from dsc.quantize.bnb)."""
from __future__ import annotations

import torch

from dsc.distill.config import LoraConfig
from dsc.errors import FieldError
from dsc.quantize import bnb


def qlora_unavailable() -> str | None:
    """Why QLoRA cannot run here, or None."""
    return bnb.unavailable("nf4 (QLoRA)")


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")


def wrap(model, cfg: LoraConfig, ctx):
    """(peft model, facts for the metrics). With quantize_base: nf4 the base is reloaded in 4-bit."""
    from peft import get_peft_model

    info = {"base_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "quantize_base": cfg.quantize_base}
    if cfg.quantize_base == "nf4":
        why = qlora_unavailable()
        if why:
            raise FieldError("quantize_base", f"{why}: use quantize_base: none (LoRA on the unquantized base)")
        model = _nf4_base(model, cfg, ctx)
    try:
        return get_peft_model(model, _peft_config(cfg)), info
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise FieldError("target_modules", f"{exc}; this model's linear layers are {', '.join(names)} "
                         "(or use all-linear)") from None


def _nf4_base(model, cfg: LoraConfig, ctx):
    """The frozen base reloaded through bitsandbytes NF4 (double quantization, bf16 compute)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(bnb.nf4(model), use_gradient_checkpointing=cfg.gradient_checkpointing)


def merge(peft_model, cfg: LoraConfig):
    """A plain model with the adapter folded into its weights. A 4-bit base is first dequantized
    and the adapter merged into that, so the merged model computes what was trained (merging into
    the original float weights, or re-quantizing after merging, drifts: peft issue #2321)."""
    if cfg.quantize_base != "nf4":
        return peft_model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = get_peft_model_state_dict(peft_model)
    base = peft_model.unload()
    dense = base.dequantize(dtype=base.config.dtype if isinstance(base.config.dtype, torch.dtype) else None)
    again = get_peft_model(dense, _peft_config(cfg))
    set_peft_model_state_dict(again, adapter)
    return again.merge_and_unload()
