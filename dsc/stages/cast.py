"""`cast`: store the weights in a narrower float dtype (bfloat16 / float16): half the bytes,
usually the first and cheapest step of a Lite model."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dsc.config import StageConfig
from dsc.stages import StageOutput


class CastConfig(StageConfig):
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the weights")


def apply(model, cfg: CastConfig, ctx) -> StageOutput:
    """Casts parameters and saved buffers. Non-persistent buffers (RoPE inv_freq) keep their
    dtype, exactly as `from_pretrained(dtype=...)` builds them: the model in memory is the
    model on disk."""
    dtype = getattr(torch, cfg.dtype)
    before = next(model.parameters()).dtype
    saved = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in saved and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = cfg.dtype  # save_pretrained writes it; from_pretrained(dtype="auto") reads it
    return StageOutput(model, {"from": str(before).removeprefix("torch."), "to": cfg.dtype})
