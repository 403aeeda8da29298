"""The transformers adapter (`dsc.hf`) against both calling conventions dsc is tested on:
`past_key_values` (transformers 5.0–5.23) and `cache` (5.24+, the old name deprecated). The
installed release is exercised directly; the other one through a wrapper that speaks it exactly,
so zero-shot context sharing and the decode loop are checked under both on any install."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import pytest
import torch
from packaging.version import Version

from conftest import make_model
from dsc import hf
from dsc.evaluation import speed
from dsc.zeroshot import loglikelihoods, shares_contexts

INSTALLED = "cache" if Version(hf.version()) >= Version("5.24.0.dev0") else "past_key_values"


@dataclass
class OldOutput:  # 5.23's CausalLMOutputWithPast: no `cache` field
    logits: torch.Tensor
    past_key_values: object = None


@dataclass
class NewOutput:  # 5.24's: no `past_key_values` field (the real class keeps a deprecated alias)
    logits: torch.Tensor
    cache: object = None


class OldConvention(torch.nn.Module):
    """The model as transformers 5.0–5.23 presents it: `past_key_values` in and out."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, past_key_values=None, use_cache=None, logits_to_keep=0):
        out = self.inner(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                         **({hf.cache_argument(self.inner): past_key_values} if past_key_values is not None else {}))
        return OldOutput(out.logits, hf.output_cache(out) if use_cache else None)


class NewConvention(OldConvention):
    """The model as transformers 5.24+ presents it: `cache` in and out."""

    def forward(self, input_ids, cache=None, use_cache=None, logits_to_keep=0):
        out = super().forward(input_ids, past_key_values=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)
        return NewOutput(out.logits, out.past_key_values)


class NoCache(torch.nn.Module):
    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        return NewOutput(torch.zeros(1))


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_model("llama", len(tokenizer))


def test_installed_release_convention(llama):
    """The real model of the installed release takes the cache under the name this release uses:
    a transformers release that drops both names fails here, not silently in zero-shot scoring."""
    assert hf.cache_argument(llama) == INSTALLED
    assert hf.supports_logits_to_keep(llama)
    out = llama(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert hf.output_cache(out).get_seq_length() == 3


@pytest.mark.parametrize("wrap, name", [(OldConvention, "past_key_values"), (NewConvention, "cache")])
def test_each_convention_is_spoken(llama, wrap, name):
    model = wrap(llama)
    assert hf.cache_argument(model) == name
    assert hf.cache_kwargs(model, "C") == {name: "C"}
    out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert hf.output_cache(out).get_seq_length() == 3
    assert hf.keep_logits(model, 1) == {"logits_to_keep": 1}


def test_no_cache_is_an_error_not_a_guess():
    assert hf.cache_argument(NoCache()) is None and not shares_contexts(NoCache())
    with pytest.raises(TypeError, match="takes no KV cache"):
        hf.cache_kwargs(NoCache(), object())
    with pytest.raises(TypeError, match="carries no KV cache"):
        hf.output_cache(NewOutput(torch.zeros(1)))


def test_without_cache_drops_both_names():
    assert hf.without_cache({"cache": 1, "past_key_values": 2, "position_ids": 3}) == {"position_ids": 3}


@pytest.mark.parametrize("wrap", [OldConvention, NewConvention])
def test_zero_shot_sharing_under_both_conventions(tokenizer, llama, wrap, monkeypatch):
    """Shared contexts are used (asserted) and score what the installed model scores one by one."""
    import dsc.zeroshot as zs

    pairs = [("The sun was", c) for c in (" warm", " blue")] + [("The sky was", c) for c in (" blue", " warm")]
    requests = [(tokenizer(c)["input_ids"], tokenizer(k, add_special_tokens=False)["input_ids"]) for c, k in pairs]
    shared = []
    original = zs._shared_batch
    monkeypatch.setattr(zs, "_shared_batch", lambda *a: shared.append(len(a[2])) or original(*a))
    model = wrap(llama)
    assert shares_contexts(model)
    got = loglikelihoods(model, requests, batch_size=8)
    assert shared == [2], "the shared-context path was not taken"
    monkeypatch.setattr(zs, "shares_contexts", lambda m: False)
    alone = loglikelihoods(llama, requests, batch_size=1)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, alone)) < 1e-4


def _said_by_transformers(fn) -> tuple[object, list[str]]:
    """fn()'s result and what transformers said meanwhile: its log records and Python warnings
    (deprecate_kwarg warns through `warnings`, warning_once through its logger)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        logger.removeHandler(handler)
    said = records + [str(w.message) for w in caught]
    return result, [r for r in said if "past_key_values" in r or "deprecated" in r.lower()]


@pytest.mark.parametrize("wrap", [None, OldConvention, NewConvention])
def test_decode_loop_under_both_conventions(llama, wrap):
    """The speed loop decodes with the cache under either name, without transformers' deprecation
    warning for the old one on the installed release."""
    model = wrap(llama) if wrap else llama
    result, deprecations = _said_by_transformers(
        lambda: speed(model, 300, batch_size=1, prompt_length=4, decode_tokens=3, repeats=1))
    assert result["decode_tokens_per_s"] > 0
    if wrap is None:
        assert not deprecations, deprecations


def test_the_old_name_is_what_warns(llama):
    """The check above can fail: passing the old name to a 5.24+ model warns, and it is seen."""
    if INSTALLED != "cache":
        pytest.skip("the installed transformers takes past_key_values itself")
    out = llama(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    _, deprecations = _said_by_transformers(
        lambda: llama(input_ids=torch.tensor([[3]]), past_key_values=hf.output_cache(out), use_cache=True))
    assert deprecations
