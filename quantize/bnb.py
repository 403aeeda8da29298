"""The bitsandbytes adapter: every bitsandbytes call of dsc is here. LLM.int8 for the `int8`
stage (int8 weights, the outlier feature dimensions computed in 16-bit; Dettmers et al. 2022) and
NF4 for QLoRA's frozen base. CUDA only; models are reloaded through transformers'
BitsAndBytesConfig, whose serialization saves and reloads them."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dsc import hf
from dsc.errors import FieldError
from dsc.models import load_quantized


def unavailable(what: str) -> str | None:
    """Why `what` (e.g. "LLM.int8") cannot run here, or None."""
    if not torch.cuda.is_available():
        return f"{what} needs a CUDA device (bitsandbytes' kernels); this machine has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return f"{what} needs bitsandbytes: pip install 'dsc[gpu]'"
    return None


def reload(model, **quant):
    """`model` saved and loaded back on the current CUDA device with BitsAndBytesConfig(**quant);
    the float copy leaves accelerator memory first."""
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model.to("cpu")
        return load_quantized(Path(tmp), hf.bitsandbytes_config(**quant), dtype, {"": torch.cuda.current_device()})


def nf4(model):
    """NF4 with double quantization and bf16 compute: QLoRA's base."""
    return reload(model, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype=torch.bfloat16)


def int8_model(model, cfg, ctx):
    """`model` with its linears in LLM.int8 (the ignored modules stay in float)."""
    why = unavailable("bitsandbytes LLM.int8")
    if why:
        raise FieldError("backend", f"{why}: use backend: compressed-tensors (int8 on any device)")
    return reload(model, load_in_8bit=True, llm_int8_skip_modules=[p.removeprefix("re:") for p in cfg.ignore])
