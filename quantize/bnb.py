"""The bitsandbytes adapter of the `int8` stage: LLM.int8 (Dettmers et al. 2022), int8 weights
with the outlier feature dimensions computed in 16-bit. CUDA only; saved and reloaded by
transformers' own bitsandbytes serialization."""
from __future__ import annotations

import tempfile

import torch

from dsc.errors import FieldError


def unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "bitsandbytes LLM.int8 needs a CUDA device; this machine has none"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed: pip install 'dsc[gpu]'"
    return None


def int8_model(model, cfg, ctx):
    """`model` reloaded with its linears in LLM.int8 (the ignored modules stay in float)."""
    why = unavailable()
    if why:
        raise FieldError("backend", f"{why}: use backend: compressed-tensors (int8 on any device)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = [p.removeprefix("re:") for p in cfg.ignore]
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model.to("cpu")
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                    device_map={"": torch.cuda.current_device()})
