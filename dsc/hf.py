"""transformers behind one adapter: every call into transformers and every calling convention dsc
relies on lives here, so a release that renames or moves something is fixed in this file alone.

Conventions that changed between the releases dsc is tested on (see `constraints.txt`):
- transformers 5.24 renamed the forward argument and the output field `past_key_values` to
  `cache` (the old name still works there, with a deprecation warning, until 5.40 / 6.0).
  `cache_argument` / `cache_kwargs` / `output_cache` speak whichever name the model offers.
- `logits_to_keep` (only the last N positions get logits) is offered by the causal-LM heads of
  most families; `keep_logits` asks for it only where the model's forward takes it.

Loading goes through `dsc.models` (the one loader); it calls the `Auto*` wrappers below.
"""
from __future__ import annotations

import inspect
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")  # newest first: 5.24+ and 5.0–5.23


def version() -> str:
    import transformers

    return transformers.__version__


# -- loading and building ---------------------------------------------------------------------------
def causal_lm_from_pretrained(location: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, **kwargs)


def causal_lm_from_config(config, **kwargs):
    """A fresh model of `config` (random weights, or what the caller loads into it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, **kwargs)


def tokenizer_from_pretrained(location: str, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, **kwargs)


def config_for_model(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def causal_lm_model_types() -> list[str]:
    """Every model_type that has a causal-LM head (names only: nothing is imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # internals: only here

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def config_class(model_type: str):
    """The config class of `model_type` (imports that one family's configuration module)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # internals: only here

    return CONFIG_MAPPING[model_type]


def generation_config(**fields):
    from transformers import GenerationConfig

    return GenerationConfig(**fields)


def bitsandbytes_config(**fields):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**fields)


def revert_weight_conversion(model, state: dict) -> dict:
    """Checkpoint names and layouts of `state` (the in-memory names), as save_pretrained writes them."""
    from transformers.core_model_loading import revert_weight_conversion as revert  # internals: only here

    return revert(model, state)


def quiet_progress_bars() -> None:
    """No transformers progress bars (weight loading) in a job's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def log_through(handler) -> None:
    """transformers' log records go to `handler` (a JSON log) instead of its own stderr handler."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)


# -- calling conventions ----------------------------------------------------------------------------
def forward_params(model) -> frozenset[str]:
    """Named parameters of `model.forward` (empty for a forward of only *args / **kwargs)."""
    params = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def cache_argument(model) -> str | None:
    """The forward argument that takes a KV cache (`cache` or `past_key_values`), or None."""
    params = forward_params(model)
    return next((name for name in CACHE_NAMES if name in params), None)


def cache_kwargs(model, cache) -> dict[str, Any]:
    """`{name: cache}` under the name `model.forward` takes."""
    name = cache_argument(model)
    if name is None:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache (neither of {CACHE_NAMES})")
    return {name: cache}


def output_cache(out):
    """The KV cache a forward with use_cache=True returned, under either field name."""
    for name in CACHE_NAMES:
        cache = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if cache is not None:
            return cache
    raise TypeError(f"{type(out).__name__} carries no KV cache (neither of {CACHE_NAMES}): was use_cache=True?")


def supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in forward_params(model)


def keep_logits(model, n: int) -> dict[str, int]:
    """`{"logits_to_keep": n}` where the model takes it: logits for the last n positions only."""
    return {"logits_to_keep": n} if supports_logits_to_keep(model) else {}


def without_cache(kwargs: dict) -> dict:
    """Decoder-layer keyword arguments captured in a forward, minus the KV cache (replayed layer
    by layer, the layers must not append to one)."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
