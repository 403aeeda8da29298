"""The peft (and bitsandbytes, for QLoRA) adapter: wrap a model with a LoRA adapter, merge it back
into a plain model. Every peft / bitsandbytes call of dsc is in this file."""
from __future__ import annotations

import tempfile

import torch

from dsc.distill.config import LoraConfig
from dsc.errors import FieldError


def qlora_unavailable() -> str | None:
    """Why QLoRA cannot run here, or None."""
    if not torch.cuda.is_available():
        return "nf4 (QLoRA) needs a CUDA device (bitsandbytes' 4-bit kernels); this machine has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "nf4 (QLoRA) needs bitsandbytes: pip install 'dsc[gpu]'"
    return None


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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model.to("cpu")  # the full-precision copy must not hold accelerator memory beside the 4-bit one
        base = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                    device_map={"": torch.cuda.current_device()})
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)


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
