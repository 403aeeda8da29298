"""`export: {format: gguf}`: dsc's GGUF reloads in transformers to the logits of the model it came
from, grids are stored bit-exactly (codes and float16 scales), the tokenizer round-trips, the
runner treats the file as an artifact, and (where llama-cpp-python is installed) llama.cpp computes
what dsc measured."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, make_model, make_moe
from dsc import llamacpp
from dsc.errors import DscInputError, FieldError, RecipeError
from dsc.export import ExportConfig, export_gguf
from dsc.export import gguf as G
from dsc.models import load_checkpoint, save_model
from dsc.quantize import Grid, RTNConfig, apply_rtn

needs_llama = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (dsc[llama])")


def _qwen3(vocab: int, head_dim: int = 128):
    """A tiny Qwen3. head_dim 128 (Qwen3's own): transformers' GGUF reader does not read
    `qwen3.attention.key_length` (llama.cpp does) and builds every Qwen3 GGUF with its default 128."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def _model(family: str, tokenizer):
    return _qwen3(len(tokenizer)) if family == "qwen3" else make_model(family, len(tokenizer))


def _reload(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _quantized(model, tokenizer, tmp_path, **grid):
    """A model through the rtn stage and its checkpoint, as the runner hands it to export."""
    model = apply_rtn(model, RTNConfig(**grid), None).model
    save_model(model, tokenizer, tmp_path / "ck")
    return load_checkpoint(tmp_path / "ck").eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float_export_reloads_to_the_same_logits(family, tokenizer, tmp_path):
    model = _model(family, tokenizer)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    assert info["tensor_types"] == {"f32": len(info["requantized"]) + sum(info["tensors_by_origin"].values())}
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(_reload(tmp_path / "m.gguf"), ids), _logits(model, ids), atol=1e-5, rtol=0)
    # gguf-py's reader sees the architecture, shapes and the tokenizer
    summary = G.read_summary(tmp_path / "m.gguf")
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    assert summary["fields"]["general.architecture"] == arch
    assert summary["tensors"]["token_embd.weight"] == ("F32", [32, len(tokenizer)])
    assert summary["fields"]["tokenizer.ggml.model"] == "gpt2"
    assert summary["fields"]["tokenizer.ggml.pre"] == "gpt-2"
    assert json.loads(json.dumps(summary["fields"]["dsc.version"]))
    assert ("output.weight" in summary["tensors"]) == (family == "qwen2")  # tied heads stay tied


def test_tokenizer_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    export_gguf(make_model("llama", len(tokenizer)), tokenizer, tmp_path / "m.gguf")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ("the cat sat on the mat", "Hello, world! 12345", "  spaces\tand\nlines"):
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (back.bos_token, back.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


@pytest.mark.parametrize("family,grid,kind", [
    ("llama", dict(bits=4, group_size=32), "Q4_0"),
    ("llama", dict(bits=4, group_size=64), "Q4_0"),  # a group of 64: two blocks with the same scale
    ("qwen2", dict(bits=4, group_size=32, symmetric=False), "Q4_1"),
    ("qwen3", dict(bits=8, group_size=None), "Q8_0"),
])
def test_grids_are_stored_bit_exactly(family, grid, kind, tokenizer, tmp_path):
    if grid.get("group_size") == 64:
        model = make_model(family, len(tokenizer))
        model.config.intermediate_size = 64  # inputs of 32 (q/k/v/o, gate/up) take no group of 64: down only
        grid = {**grid, "targets": ["down_proj"]}
    else:
        model = _model(family, tokenizer)
    model = _quantized(model, tokenizer, tmp_path, scale_dtype="float16", **grid)
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert info["grid_tensors_checked"] == info["tensors_by_origin"]["grid"] > 0
    summary = G.read_summary(tmp_path / "m.gguf")
    assert kind in {t for t, _ in summary["tensors"].values()}
    # the file's dequantized weights are dsc's grid values, bit for bit (gguf-py's reference code)
    from gguf import GGUFReader

    state = model.state_dict()
    plan = {t.name: t for t in G.plan(model, "auto", "q8_0", False).tensors}
    for t in GGUFReader(str(tmp_path / "m.gguf")).tensors:
        if plan[t.name].how != "grid" or (".attn_q." in t.name or ".attn_k." in t.name) and family == "llama":
            continue
        w = state[plan[t.name].source]
        assert torch.equal(torch.from_numpy(G.dequantize(t.data, t.tensor_type.name.lower(), w.shape)), w.float())
    # and transformers' GGUF reader computes what the dsc model computes (embedding Q8_0: compare with it stored so)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(2))
    export_gguf(model, tokenizer, tmp_path / "f.gguf", ExportConfig(embedding="f32"))
    torch.testing.assert_close(_logits(_reload(tmp_path / "f.gguf"), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_float16_scales_are_rounded_in_the_search():
    w = torch.randn(8, 64)
    for sym in (True, False):
        grid = Grid(4, 32, sym, "float16")
        scale, zero = grid.params(w)
        assert torch.equal(scale.half().float(), scale)
        if not sym:
            assert torch.equal((-(zero + 8) * scale).half().float(), -(zero + 8) * scale)  # Q4_1's block minimum
    assert not torch.equal(Grid(4, 32, True).params(w)[0].half().float(), Grid(4, 32, True).params(w)[0])


def test_grids_gguf_cannot_hold_are_refused_or_requantized(tokenizer, tmp_path):
    model = _quantized(make_model("llama", len(tokenizer)), tokenizer, tmp_path, bits=3, group_size=16)
    with pytest.raises(FieldError) as err:
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert err.value.path == "requantize" and "3-bit" in err.value.message
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", ExportConfig(requantize=True))
    assert info["requantized"] and all(e > 0 for e in info["requantized"].values())
    assert set(info["tensor_types"]) == {"f32", "q4_0", "q8_0"}
    # float32 scales: the fix names scale_dtype
    model = _quantized(make_model("llama", len(tokenizer)), tokenizer, tmp_path / "b", bits=4, group_size=32)
    with pytest.raises(FieldError, match="scale_dtype: float16"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")


def test_float_weights_to_block_types_and_fallback(tokenizer, tmp_path):
    model = make_model("llama", len(tokenizer))
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(64, 32, bias=False)  # fine: 64 inputs
    info = export_gguf(model, tokenizer, tmp_path / "q.gguf", ExportConfig(weights="q4_0", embedding="q8_0"))
    assert info["tensor_types"]["q4_0"] == 14 and info["tensor_types"]["q8_0"] == 1
    assert _reload(tmp_path / "q.gguf") is not None
    if (SHARED / "models" / "stories260K").is_dir():  # intermediate 172: no multiple of 32
        from transformers import AutoTokenizer

        src = SHARED / "models" / "stories260K"
        stories, tok = load_checkpoint(src), AutoTokenizer.from_pretrained(src)
        info = export_gguf(stories, tok, tmp_path / "s.gguf", ExportConfig(weights="q8_0"))
        assert sorted(info["fallback_f16"]) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(5)]
        summary = G.read_summary(tmp_path / "s.gguf")
        assert summary["fields"]["tokenizer.ggml.model"] == "llama"  # sentencepiece-style BPE
        back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
        text = "Once upon a time, there was a little girl."
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_pruned_model_exports(tokenizer, tmp_path):
    from dsc.context import Context
    from dsc.prune import PruneConfig
    from dsc.stages import StageOutput  # noqa: F401
    from dsc.registry import STAGES

    model = make_model("llama", len(tokenizer))
    ctx = Context.create(tokenizer, {}, device="cpu")
    pruned = STAGES["prune"].apply(model, PruneConfig(heads=0.5, channels=0.5, importance="magnitude"), ctx).model
    assert pruned.config.num_attention_heads == 2 and pruned.config.intermediate_size == 32
    export_gguf(pruned, tokenizer, tmp_path / "p.gguf", ExportConfig(embedding="f32"))
    ids = torch.randint(0, len(tokenizer), (1, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(_reload(tmp_path / "p.gguf"), ids), _logits(pruned, ids), atol=1e-5, rtol=0)


def test_unsupported_family_is_refused(tokenizer, tmp_path):
    with pytest.raises(DscInputError, match="supported families: deepseek_v2, deepseek_v3, llama, "
                                            "mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        export_gguf(make_moe("olmoe", len(tokenizer)), tokenizer, tmp_path / "m.gguf")


def test_export_file_name_is_checked():
    with pytest.raises(DscInputError, match="plain file name ending in .gguf"):
        ExportConfig.parse({"file": "../x.gguf"}, "stages[0].export")


# ---- in a run ----------------------------------------------------------------------------------

def _recipe(model_dir, text_file, out, stages):
    from test_run import recipe_dict

    return recipe_dict(model_dir, text_file, out, stages)


def test_export_stage_is_an_artifact(llama_dir, text_file, tmp_path):
    from dsc.recipe import validate
    from dsc.runner import run_recipe

    out = tmp_path / "out"
    raw = _recipe(llama_dir, text_file, out, [{"rtn": {"group_size": 32, "scale_dtype": "float16"}},
                                               {"export": {"file": "lite.gguf"}}])
    run_recipe(validate(raw, base_dir=tmp_path))
    published = out / "export" / "lite.gguf"
    stage = json.loads((out / "stages" / "01-export" / "stage.json").read_text())
    assert published.is_file() and list(stage["artifacts"]) == ["lite.gguf"]
    assert os.path.samefile(published, out / "stages" / "01-export" / "export" / "lite.gguf")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"][1]["metrics"]["grid_tensors_checked"] == 14
    assert "## Exports" in (out / "report.md").read_text()
    assert G.read_summary(published)["fields"]["dsc.stage"].startswith("stages[1]")
    # a published file edited in place is not trusted: the export is rebuilt from the checkpoint
    mtime = (out / "stages" / "00-rtn" / "stage.json").stat().st_mtime_ns
    with open(published, "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01" if fh.read(1) != b"\x01" else b"\x02")
    run_recipe(validate(raw, base_dir=tmp_path))
    assert (out / "stages" / "00-rtn" / "stage.json").stat().st_mtime_ns == mtime  # the rtn stage is kept
    fresh = json.loads((out / "stages" / "01-export" / "stage.json").read_text())
    assert fresh["artifacts"] == stage["artifacts"]  # the same bytes again
    assert os.path.samefile(published, out / "stages" / "01-export" / "export" / "lite.gguf")
    # a recipe without exports leaves no OUT/export behind
    run_recipe(validate({**raw, "stages": raw["stages"][:1]}, base_dir=tmp_path), fresh=True)
    assert not (out / "export").exists()


def test_skipped_evaluation_is_retried_alone(llama_dir, text_file, tmp_path, monkeypatch):
    """A llama.cpp evaluation skipped for want of llama-cpp-python runs again on the next run, and
    only it: the stages after it are finished work the retry does not touch."""
    from dsc.recipe import validate
    from dsc.runner import run_recipe

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    ev = {"context_length": 32, "prompt_length": 16, "decode_tokens": 4, "repeats": 1}
    out = tmp_path / "out"
    raw = _recipe(llama_dir, text_file, out, [{"export": {"embedding": "f32"}},
                                               {"evaluate": {**ev, "runtime": "llama.cpp", "if_missing": "skip"}},
                                               {"rtn": {"group_size": 32}}, {"evaluate": ev}])
    run_recipe(validate(raw, base_dir=tmp_path))
    stamp = {d.name: (d / "stage.json").stat().st_mtime_ns for d in (out / "stages").iterdir()}
    assert "skipped" in json.loads((out / "stages" / "01-evaluate" / "metrics.json").read_text())
    # the same recipe again: stage 1 is tried again (and skips again here), the export before it and
    # the stages after it are kept
    run_recipe(validate(raw, base_dir=tmp_path))
    after = {d.name: (d / "stage.json").stat().st_mtime_ns for d in (out / "stages").iterdir()}
    assert after["01-evaluate"] != stamp["01-evaluate"]
    kept = ("00-export", "02-rtn", "03-evaluate")
    assert {k: after[k] for k in kept} == {k: stamp[k] for k in kept}
    monkeypatch.undo()
    if llamacpp.available():  # with llama-cpp-python: the retry measures the file
        run_recipe(validate(raw, base_dir=tmp_path))
        metrics = json.loads((out / "stages" / "01-evaluate" / "metrics.json").read_text())
        assert metrics["model"]["perplexity"] > 1 and "skipped" not in metrics
        assert {d.name: (d / "stage.json").stat().st_mtime_ns for d in (out / "stages").iterdir()
                if d.name in kept} == {k: stamp[k] for k in kept}


def test_recipe_rules_for_exports(llama_dir, text_file, tmp_path):
    from dsc.recipe import validate

    with pytest.raises(RecipeError) as err:
        validate(_recipe(llama_dir, text_file, tmp_path / "o", [
            {"evaluate": {"runtime": "llama.cpp", "context_length": 32}}, {"export": {}}, {"export": {}},
            {"rtn": {"group_size": 32}}, {"evaluate": {"runtime": "llama.cpp", "context_length": 32}}]),
                 base_dir=tmp_path)
    paths = {p.path for p in err.value.problems}
    assert {"stages[0].evaluate.runtime", "stages[2].export.file", "stages[4].evaluate.runtime"} <= paths


def _cpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    llm = llamacpp.load(path, 64, 2)
    try:
        return torch.from_numpy(llamacpp.logits(llm, ids[0].tolist()))
    finally:
        llm.close()


# ---- llama.cpp ---------------------------------------------------------------------------------

@needs_llama
@pytest.mark.parametrize("grid", [None, dict(bits=4, group_size=32)])
def test_llama_cpp_computes_what_dsc_measured(grid, tokenizer, tmp_path):
    model = make_model("llama", len(tokenizer))
    if grid:
        model = _quantized(model, tokenizer, tmp_path, scale_dtype="float16", **grid)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(4))
    theirs = _cpp_logits(tmp_path / "m.gguf", ids)
    ours = _logits(model, ids)[0]
    # F32: the same arithmetic up to summation order; Q4_0: llama.cpp rounds activations to Q8_0 blocks
    tol = 1e-3 if grid is None else 5e-2
    assert (theirs - ours).abs().max() < tol * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


@needs_llama
def test_evaluate_in_llama_cpp(llama_dir, text_file, tmp_path):
    from dsc.recipe import validate
    from dsc.runner import run_recipe

    ev = {"context_length": 32, "prompt_length": 16, "decode_tokens": 4, "repeats": 1}
    out = tmp_path / "out"
    raw = _recipe(llama_dir, text_file, out, [{"evaluate": ev}, {"export": {"embedding": "f32"}},
                                               {"evaluate": {**ev, "runtime": "llama.cpp", "threads": 2}}])
    run_recipe(validate(raw, base_dir=tmp_path))
    m = json.loads((out / "metrics.json").read_text())
    hf_row, cpp = m["stages"][0]["metrics"]["model"], m["stages"][2]["metrics"]
    assert cpp["model"]["tokens_scored"] == hf_row["tokens_scored"]
    assert cpp["model"]["perplexity"] == pytest.approx(hf_row["perplexity"], rel=1e-4)  # the same F32 model
    assert cpp["teacher"]["perplexity"] == pytest.approx(hf_row["perplexity"], rel=1e-4)
    assert cpp["model"]["decode_tokens_per_s"] > 0 and cpp["model"]["runtime"].startswith("llama.cpp")
    tables = m["evaluations"]
    assert len(tables) == 2 and tables[1]["protocol"]["runtime"] == "llama.cpp"


def _moe(family: str, tokenizer):
    """A tiny Qwen MoE with experts in every layer (llama.cpp's qwen2moe / qwen3moe have no dense layers)."""
    from transformers import AutoModelForCausalLM

    model = make_moe(family, len(tokenizer))
    config = model.config
    config.mlp_only_layers = []
    # transformers' GGUF reader ignores `expert_feed_forward_length` (llama.cpp reads it) and builds the
    # family's default expert widths: the tiny models take those (multiples of GGUF's 32-weight blocks too)
    defaults = type(config)()
    config.moe_intermediate_size = defaults.moe_intermediate_size
    if family == "qwen2_moe":
        config.shared_expert_intermediate_size = defaults.shared_expert_intermediate_size
    if family == "qwen3_moe":
        config.norm_topk_prob = True  # what llama.cpp's qwen3moe computes
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_export_reloads_and_keeps_expert_grids(family, tokenizer, tmp_path):
    model = _moe(family, tokenizer)
    export_gguf(model, tokenizer, tmp_path / "f.gguf", ExportConfig(embedding="f32"))
    summary = G.read_summary(tmp_path / "f.gguf")
    width = model.config.moe_intermediate_size
    assert summary["tensors"]["blk.0.ffn_gate_exps.weight"] == ("F32", [32, width, 4])  # (H, I, E): GGUF's order
    assert summary["fields"][f"{family.replace('_', '')}.expert_count"] == 4
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(_reload(tmp_path / "f.gguf"), ids), _logits(model, ids), atol=1e-5, rtol=0)
    # routed experts on a dsc grid: stored as Q4_0 blocks, decoded bit-exactly (checked by the export itself)
    quant = _quantized(model, tokenizer, tmp_path, bits=4, group_size=32, scale_dtype="float16")
    info = export_gguf(quant, tokenizer, tmp_path / "q.gguf", ExportConfig(embedding="f32"))
    types = {n: t for n, (t, _) in G.read_summary(tmp_path / "q.gguf")["tensors"].items()}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.3.ffn_down_exps.weight"] == "Q4_0"
    assert info["grid_tensors_checked"] >= 4 * 7
    torch.testing.assert_close(_logits(_reload(tmp_path / "q.gguf"), ids), _logits(quant, ids), atol=1e-5, rtol=0)


def test_moe_with_dense_layers_is_refused(tokenizer, tmp_path):
    with pytest.raises(DscInputError, match="dense layers among them"):
        export_gguf(make_moe("qwen3_moe", len(tokenizer)), tokenizer, tmp_path / "m.gguf")


@needs_llama
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_llama_cpp_runs_the_moe_export(family, tokenizer, tmp_path):
    """Mixtral (llama.cpp's llama architecture with experts) has no transformers GGUF reader: llama.cpp only."""
    moe = make_moe("mixtral", len(tokenizer)) if family == "mixtral" else _moe(family, tokenizer)
    if family == "mixtral":
        moe.config.intermediate_size = 64
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        moe = AutoModelForCausalLM.from_config(moe.config).eval()
    model = _quantized(moe, tokenizer, tmp_path, bits=4, group_size=32, scale_dtype="float16")
    export_gguf(model, tokenizer, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(6))
    theirs = _cpp_logits(tmp_path / "m.gguf", ids)
    ours = _logits(model, ids)[0]
    assert (theirs - ours).abs().max() < 5e-2 * ours.abs().max()  # Q4_0 × Q8_0 activations in llama.cpp
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_untied_lm_head_quantized_when_asked(tokenizer, tmp_path):
    model = _quantized(make_model("qwen2", len(tokenizer)), tokenizer, tmp_path, bits=4, group_size=32,
                       scale_dtype="float16", ignore=[])
    info = export_gguf(model, tokenizer, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    types = {n: t for n, (t, _) in G.read_summary(tmp_path / "m.gguf")["tensors"].items()}
    assert types["output.weight"] == "Q4_0" and types["token_embd.weight"] == "F32"
    assert info["grid_tensors_checked"] == 15  # 7 linears × 2 layers + the head, each decoded bit-exactly
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_logits(_reload(tmp_path / "m.gguf"), ids), _logits(model, ids), atol=1e-5, rtol=0)


# ---- DeepSeek-V2 / V3 (llama.cpp's deepseek2) ------------------------------------------------------

def _dsv3(model_dir: Path, **config):
    """tiny-deepseek-v3 (trained MLA + group-routed experts), with config fields overridden."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    c = AutoConfig.from_pretrained(model_dir)
    for key, value in config.items():
        setattr(c, key, value)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=c).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_deepseek_v3_export_layout(tiny_dsv3_dir, tmp_path):
    """No transformers GGUF reader reads deepseek2: the layout, the metadata and the absorbed MLA
    tensors are checked here, what llama.cpp computes below."""
    model, tok = _dsv3(tiny_dsv3_dir)
    quant = _quantized(model, tok, tmp_path, bits=4, group_size=32, scale_dtype="float16")
    info = export_gguf(quant, tok, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    assert info["architecture"] == "deepseek2"
    summary = G.read_summary(tmp_path / "m.gguf")
    f, tensors = summary["fields"], summary["tensors"]
    c = model.config
    assert (f["deepseek2.attention.head_count_kv"], f["deepseek2.attention.kv_lora_rank"]) == (1, 32)
    assert (f["deepseek2.attention.key_length"], f["deepseek2.attention.value_length"]) == (32 + 16, 32)
    assert (f["deepseek2.attention.key_length_mla"], f["deepseek2.attention.value_length_mla"]) == (32, 32)
    assert f["deepseek2.attention.q_lora_rank"] == 64 and f["deepseek2.rope.dimension_count"] == 16
    assert (f["deepseek2.leading_dense_block_count"], f["deepseek2.expert_count"], f["deepseek2.expert_used_count"],
            f["deepseek2.expert_shared_count"]) == (1, 8, 2, 1)
    assert (f["deepseek2.expert_group_count"], f["deepseek2.expert_group_used_count"]) == (2, 1)
    assert f["deepseek2.expert_weights_scale"] == pytest.approx(2.5) and f["deepseek2.expert_weights_norm"] is True
    assert f["deepseek2.expert_gating_func"] == 2  # sigmoid
    # dense first layer, MoE after it; routers and the correction bias in F32
    assert tensors["blk.0.ffn_gate.weight"] == ("Q4_0", [128, 384]) and "blk.0.ffn_gate_inp.weight" not in tensors
    assert tensors["blk.1.ffn_gate_exps.weight"] == ("Q4_0", [128, 96, 8])
    assert tensors["blk.1.ffn_gate_inp.weight"] == ("F32", [128, 8])
    assert tensors["blk.1.ffn_gate_shexp.weight"] == ("Q4_0", [128, 96])
    # kv_b split as llama.cpp absorbs it: v_b keeps the grid (Q4_0), k_b holds its values transposed
    assert tensors["blk.1.attn_v_b.weight"] == ("Q4_0", [32, 32, 4])
    assert tensors["blk.1.attn_k_b.weight"] == ("F32", [16, 32, 4])
    assert info["tensors_by_origin"]["grid-values"] == 4 and info["grid_tensors_checked"] == 41
    from gguf import GGUFReader

    data = {t.name: t.data for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    kv_b = quant.model.layers[1].self_attn.kv_b_proj.weight.detach().reshape(4, 16 + 32, 32)
    assert torch.equal(torch.from_numpy(np.array(data["blk.1.attn_k_b.weight"])), kv_b[:, :16].transpose(1, 2))
    bias = quant.model.layers[2].mlp.gate.e_score_correction_bias.detach()
    assert torch.equal(torch.from_numpy(np.array(data["blk.2.exp_probs_b.bias"])), bias)


def test_deepseek_routing_llama_cpp_cannot_compute_is_refused(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    config = DeepseekV2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2,
                              topk_group=1, topk_method="group_limited_greedy", moe_intermediate_size=32,
                              kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=32,
                              v_head_dim=32, max_position_embeddings=64)
    with pytest.raises(DscInputError, match="scores a group by its best expert"):
        export_gguf(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "m.gguf")


@needs_llama
@pytest.mark.parametrize("variant", ["v3", "v3-rope-halves", "v3-yarn", "v3-q4_0", "v2"])
def test_llama_cpp_runs_deepseek(variant, tiny_dsv3_dir, tmp_path):
    """MLA (absorbed), shared + group-routed experts with the correction bias, dense first layer:
    llama.cpp's logits are dsc's. v3-rope-halves: a checkpoint whose RoPE part rotates halves
    (`rope_interleave: false`), reordered for llama.cpp; v3-yarn: DeepSeek-V3's long-context RoPE,
    measured past its original context; v2: softmax routing, one q_proj (no q low rank)."""
    length = 48
    if variant == "v2":
        from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV2Config

        tok = AutoTokenizer.from_pretrained(tiny_dsv3_dir)
        config = DeepseekV2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                                  moe_intermediate_size=32, first_k_dense_replace=1, q_lora_rank=None,
                                  kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                                  num_experts_per_tok=2, topk_method="greedy", n_group=1, topk_group=1,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    elif variant == "v3-yarn":
        length = 300  # past original_max_position_embeddings: where YaRN's interpolation and mscale act
        model, tok = _dsv3(tiny_dsv3_dir, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    else:
        model, tok = _dsv3(tiny_dsv3_dir, **({"rope_interleave": False} if variant == "v3-rope-halves" else {}))
    if variant == "v3-q4_0":
        model = _quantized(model, tok, tmp_path, bits=4, group_size=32, scale_dtype="float16")
    export_gguf(model, tok, tmp_path / "m.gguf", ExportConfig(embedding="f32"))
    ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(4))
    llm = llamacpp.load(tmp_path / "m.gguf", 512, 2)
    try:
        theirs = torch.from_numpy(llamacpp.logits(llm, ids[0].tolist()))
    finally:
        llm.close()
    ours = _logits(model, ids)[0]
    if variant == "v3-q4_0":  # llama.cpp rounds activations to Q8_0 blocks; a flipped expert choice shows
        assert (theirs - ours).abs().max() < 0.2 * ours.abs().max()
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
    else:  # float: the same arithmetic up to summation order (YaRN vs no YaRN differ by 60 % here)
        assert (theirs - ours).abs().max() < 2e-3 * ours.abs().max()
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.98
