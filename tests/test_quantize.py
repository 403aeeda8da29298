"""Quantization: grid arithmetic, scale folding from structure, AWQ / RTN / INT8 quality floors on
trained weights, compressed-tensors save → load → same logits, the CPU int8 kernels, errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from dsc import Context
from dsc.data.pipeline import TokenData
from dsc.errors import FieldError
from dsc.models import save_model
from dsc.quantize import (AWQConfig, GPTQConfig, Grid, Int8Config, RTNConfig, apply_awq, apply_gptq, apply_int8,
                          apply_rtn)
from dsc.quantize import ct
from dsc.quantize.calibrate import capture, observe
from dsc.quantize.layerwise import _fold, _groups
from dsc.structure import describe

from conftest import make_model


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, True), (4, 16, False), (3, None, True), (8, None, True)])
def test_grid_codes_and_values(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.rand(24, 1)
    grid = Grid(bits, group, symmetric)
    scale, zero = grid.params(w)
    codes = grid.codes(w, scale, zero)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    per_group = codes.reshape(24, scale.shape[1], -1).float()
    expected = ((per_group - zero[..., None]) * scale[..., None]).reshape(w.shape)
    assert torch.equal(grid.fake(w, scale, zero), expected)
    if symmetric:
        assert torch.all(zero == 0)
    assert torch.equal(grid.fake(expected, scale, zero), expected)  # values on the grid stay put
    err = (grid.fake(w, scale, zero) - w).abs().reshape(24, scale.shape[1], -1)
    assert torch.all(err <= scale[..., None] * 0.5 + 1e-6) or not symmetric


def test_group_that_does_not_divide_is_a_clear_error():
    with pytest.raises(FieldError, match=r"group_size: 128 does not divide the 576 inputs of q_proj.*64"):
        Grid(4, 128, True).group(576, "q_proj")


def _mha_llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("gqa", [False, True])
def test_scale_groups_come_from_structure_and_folding_keeps_outputs(gqa):
    model = make_model("llama", 64) if gqa else _mha_llama()
    structure = describe(model)
    layer = structure.layers[0]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture(model, model.model.layers, ids, 2, torch.device("cpu"))
    linears = {n: m for n, m in layer.module.named_modules() if isinstance(m, torch.nn.Linear)}
    seen = observe(layer.module, inputs, linears)
    stats, outputs = seen.stats, seen.outputs
    groups = {tuple(g.linears): g for g in _groups(layer, stats)}
    prev = {k: (None if g.prev is None else next(n for n, m in layer.module.named_modules() if m is g.prev))
            for k, g in groups.items()}
    assert prev == {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
                    ("self_attn.o_proj",): None if gqa else "self_attn.v_proj",
                    ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm",
                    ("mlp.down_proj",): "mlp.up_proj"}
    before = outputs[0][0][0]
    for g in groups.values():
        if g.prev is not None:
            _fold(g, linears, torch.rand(g.stats.gram.shape[0]) * 4 + 0.25)
    after = layer.module(*inputs[0][0], **inputs[0][1])
    torch.testing.assert_close(after[0] if isinstance(after, tuple) else after, before, atol=1e-5, rtol=1e-4)


def _ctx(tokenizer, blocks):
    ctx = Context.create(tokenizer, {}, device="cpu")
    ctx.data.put(TokenData("calib", blocks.reshape(-1), blocks.shape[1], {}, ""))
    return ctx


def _on_grid(model):
    for name, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.detach().float()
        scale = m.weight_scale.detach().float()
        zero = getattr(m, "weight_zero_point", torch.zeros_like(scale)).float()
        args = m.quantization_scheme.weights
        grid = Grid(args.num_bits, args.group_size, args.symmetric)
        assert torch.equal(grid.fake(w, scale, zero), w), name


STAGES = {
    "rtn-w4-g16": (apply_rtn, RTNConfig(group_size=16)),
    "awq-w4-g16": (apply_awq, AWQConfig(group_size=16, split="all", num_samples=4, batch_size=2)),
    "awq-w3-channel": (apply_awq, AWQConfig(bits=3, group_size=None, split="all", num_samples=4, batch_size=2)),
    "awq-w4-asym": (apply_awq, AWQConfig(group_size=16, symmetric=False, split="all", num_samples=4, batch_size=2)),
    "int8-weight-only": (apply_int8, Int8Config(mode="weight_only")),
    "int8-w8a8": (apply_int8, Int8Config(split="all", num_samples=4, batch_size=2)),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_save_load_same_logits(name, tokenizer, tmp_path):
    apply, cfg = STAGES[name]
    model = make_model("qwen2", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits = model(ids).logits
    out = apply(model, cfg, _ctx(tokenizer, ids))
    _on_grid(model)
    assert out.metrics["quantized_linears"] == 14  # 7 per layer; the LM head stays float
    save_model(model, tokenizer, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (cfg.bits if hasattr(cfg, "bits") else 8, getattr(cfg, "group_size", None))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        logits, again = model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, float_logits, atol=1e-4)  # it did quantize
    save_model(reloaded, tokenizer, tmp_path / "again")  # a reloaded model saves the same way
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, logits,
                                   atol=1e-5, rtol=0)


def test_four_bit_checkpoint_is_packed(tokenizer, tmp_path):
    model = make_model("qwen2", len(tokenizer))
    save_model(model, tokenizer, tmp_path / "float")
    apply_rtn(model, RTNConfig(group_size=16), None)
    save_model(model, tokenizer, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape == (64, 32 // 8)  # 8 4-bit codes per int32
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "q") < size(tmp_path / "float")


# ---- quality floors on trained weights (stories260K), seeded -------------------------------------

@pytest.fixture(scope="module")
def stories(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # its own stories: the text it was trained on looks like these
        text = model.generate(torch.ones(48, 1, dtype=torch.long), do_sample=True, max_new_tokens=128,
                              min_new_tokens=128, attention_mask=torch.ones(48, 1, dtype=torch.long))
    return model, tok, text[:32], text[32:]


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp().item()


def _quantized_ppl(stories, apply, cfg):
    model, tok, calib, held_out = stories
    q = copy.deepcopy(model)
    apply(q, cfg, _ctx(tok, calib))
    return _ppl(q, held_out)


# stories260K: hidden 64, MLP 172 (= 4 × 43): down_proj takes no group size, so grouped runs leave it out.
@pytest.mark.parametrize("grid", [dict(group_size=32, ignore=["lm_head", "down_proj"]),
                                  dict(group_size=None, symmetric=False), dict(bits=3, group_size=None)])
def test_awq_beats_rtn_on_trained_weights(stories, grid):
    awq = _quantized_ppl(stories, apply_awq, AWQConfig(**grid, split="all", num_samples=32))
    rtn = _quantized_ppl(stories, apply_rtn, RTNConfig(**grid))
    base = _ppl(stories[0], stories[3])
    assert base < awq < rtn
    assert (awq - base) < 0.8 * (rtn - base), (base, awq, rtn)  # at least a fifth of RTN's damage avoided


@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_int8_within_one_percent_of_float(stories, mode):
    base = _ppl(stories[0], stories[3])
    got = _quantized_ppl(stories, apply_int8, Int8Config(mode=mode, split="all", num_samples=32))
    assert abs(got / base - 1) < 0.01, (base, got)


def test_cpu_int8_kernels_follow_the_int8_model(stories):
    from dsc.quantize.cpu import int8_kernels

    model, tok, calib, held_out = stories
    q = copy.deepcopy(model)
    apply_int8(q, Int8Config(split="all", num_samples=32), _ctx(tok, calib))
    reference = _ppl(q, held_out)
    assert int8_kernels(q) == 35
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
    assert abs(_ppl(q, held_out) / reference - 1) < 0.01


# ---- errors ------------------------------------------------------------------------------------

def test_pattern_matching_nothing_is_an_error(tokenizer):
    model = make_model("llama", len(tokenizer))
    with pytest.raises(FieldError, match=r"targets: 'q_prj' matches no module"):
        apply_rtn(model, RTNConfig(group_size=16, targets=["q_prj"]), None)


def test_tied_head_cannot_be_quantized(tokenizer):
    model = make_model("llama", len(tokenizer))  # tie_word_embeddings=True
    with pytest.raises(FieldError, match="ignore: lm_head shares its weight with the input embedding"):
        apply_rtn(model, RTNConfig(group_size=16, ignore=[]), None)


def test_regex_targets_and_ignore(tokenizer):
    model = make_model("qwen2", len(tokenizer))
    out = apply_rtn(model, RTNConfig(group_size=16, targets=["re:.*mlp\\..*"], ignore=["lm_head", "down_proj"]), None)
    assert out.metrics["quantized_linears"] == 4
    assert ct.describe(model)["weights"] == "int4 group g16"


def test_fused_moe_experts_are_not_skipped_silently(tokenizer):
    from test_prune import tiny_moe

    model = tiny_moe("mixtral", len(tokenizer))
    out = apply_rtn(model, RTNConfig(group_size=16), None)  # fused experts are quantized (tests/test_moe_quantize.py)
    assert out.metrics["quantized_experts"] == 4 * 4
    model = tiny_moe("mixtral", len(tokenizer))
    experts = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    out = apply_rtn(model, RTNConfig(group_size=16, ignore=["lm_head", "re:.*mlp\\.experts", "re:.*mlp\\.gate"]), None)
    assert out.metrics["quantized_linears"] >= 8 and "quantized_experts" not in out.metrics
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, experts)  # ignored: left in float


# ---- in a recipe -------------------------------------------------------------------------------

def test_recipe_quantizes_resumes_and_publishes_a_loadable_model(llama_dir, text_file, tmp_path):
    from test_run import EVAL, recipe_dict

    from dsc.recipe import validate
    from dsc.runner import run_recipe

    out = tmp_path / "out"
    calib = {"split": "train", "num_samples": 4, "batch_size": 2}
    stages = [{"evaluate": EVAL}, {"awq": {"group_size": 16, **calib}}, {"evaluate": EVAL}]
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, stages), base_dir=tmp_path))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    rows = json.loads((out / "metrics.json").read_text())["evaluations"][0]["rows"]
    assert rows[-1]["weight_bytes"] < 0.6 * rows[0]["weight_bytes"]  # 4-bit linears; embedding stays float
    assert rows[-1]["params"] == rows[0]["params"]  # scales and zero points are bytes, not parameters
    # resume from the quantized checkpoint: appended stages run on what stage 1 saved
    more = stages + [{"evaluate": {**EVAL, "teacher": False}}]
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, more), base_dir=tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["stages"][-1]["metrics"]["model"]["perplexity"]
    assert last == pytest.approx(metrics["stages"][2]["metrics"]["model"]["perplexity"], rel=1e-6)
    lite = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ckpt = AutoModelForCausalLM.from_pretrained(out / "stages" / "01-awq" / "model").eval()
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(lite(ids).logits, ckpt(ids).logits)


def test_recipe_w8a8_measured_on_int8_kernels(llama_dir, text_file, tmp_path):
    from test_run import EVAL, recipe_dict

    from dsc.recipe import validate
    from dsc.runner import run_recipe

    out = tmp_path / "out"
    stages = [{"int8": {"split": "train", "num_samples": 4, "batch_size": 2}},
              {"evaluate": {**EVAL, "int8_kernels": True, "teacher": False}},
              {"evaluate": {**EVAL, "teacher": False}}]
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, stages), base_dir=tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())["stages"]
    fast, ct_model = metrics[1]["metrics"]["model"], metrics[2]["metrics"]["model"]
    assert fast["runtime"] == "cpu int8 kernels" and fast["params"] == ct_model["params"]
    assert fast["weight_bytes"] == ct_model["weight_bytes"]
    assert fast["perplexity"] == pytest.approx(ct_model["perplexity"], rel=0.02)


@pytest.mark.parametrize("quantizer,cfg", [(apply_awq, AWQConfig(group_size=16, split="all", num_samples=4,
                                                                     batch_size=2)),
                                           (apply_gptq, GPTQConfig(group_size=16, split="all", num_samples=4,
                                                                   batch_size=2))], ids=["awq", "gptq"])
def test_calibration_killed_mid_model_resumes_after_the_last_layer(tokenizer, tmp_path, monkeypatch, quantizer, cfg):
    """A crash during layer 1 keeps layer 0's work; the rerun equals an uninterrupted run."""
    import dsc.quantize.stage as stage

    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    reference = make_model("qwen2", len(tokenizer))
    quantizer(reference, cfg, _ctx(tokenizer, ids))

    ctx = _ctx(tokenizer, ids)
    ctx.work_dir = tmp_path / "work"
    real, calls = stage.quantize_layer, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "quantize_layer", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        quantizer(make_model("qwen2", len(tokenizer)), cfg, ctx)
    assert json.loads((ctx.work_dir / "layers" / "meta.json").read_text()) == {"layer": 0}
    calls.clear()
    model = make_model("qwen2", len(tokenizer))
    quantizer(model, cfg, ctx)
    assert len(calls) == 1  # only layer 1 was calibrated again
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
