"""The evaluate stage's numbers against independent computations."""
from __future__ import annotations


import pytest
import torch

from conftest import make_model, reference_perplexity
from dsc import Context, TextSource, apply_stage
from dsc.evaluation import param_counts, perplexity, weight_bytes, windows
from dsc.stages.evaluate import EvaluateConfig


@pytest.mark.parametrize("ctx_len,stride,batch", [(64, 64, 1), (64, 64, 3), (64, 16, 2), (50, 50, 4)])
def test_perplexity_matches_transformers_loss(tiny_dir, ctx_len, stride, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    stream = torch.randint(0, model.config.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    ours = perplexity(model, stream, ctx_len, stride, batch_size=batch)
    ref, count = reference_perplexity(model, stream, ctx_len, stride)
    assert ours["tokens_scored"] == count
    assert ours["perplexity"] == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("n,ctx_len,stride,scored", [(100, 32, 32, 96), (96, 32, 32, 93), (100, 32, 8, 99),
                                                     (7, 32, 32, 6)])
def test_tokens_scored(tokenizer, n, ctx_len, stride, scored):
    """Each token is scored once, given the tokens before it in its window: a window with no
    context loses its first token (stride == context), overlapping windows lose only the first."""
    model = make_model("llama", len(tokenizer))
    stream = torch.randint(0, len(tokenizer), (n,), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, stream, ctx_len, stride)["tokens_scored"] == scored
    wins = windows(n, ctx_len, stride)
    assert sum(w[2] for w in wins) == n and all(e - b <= ctx_len for b, e, _ in wins)


def test_param_counts_tied_and_untied(tokenizer):
    tied, untied = make_model("llama", len(tokenizer)), make_model("qwen2", len(tokenizer))
    emb = len(tokenizer) * 32
    for model, n_emb in ((tied, emb), (untied, 2 * emb)):
        unique = {p.data_ptr(): p.numel() for p in model.parameters()}
        counts = param_counts(model)
        assert counts["params"] == sum(unique.values())
        assert counts["params"] - counts["params_non_embedding"] == n_emb


def test_cast_halves_bytes_and_keeps_quality(stories_dir, tmp_path):
    """On trained weights, bfloat16 storage halves the bytes and moves perplexity < 1 %."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tok = AutoTokenizer.from_pretrained(stories_dir)
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 40)
    ctx = Context.create(tok, {"story": TextSource(path=str(text), block_size=128, splits={"eval": 1.0})},
                         teacher=model, device="cpu")
    cfg = EvaluateConfig(context_length=128, speed=False, teacher=False)
    before = apply_stage("evaluate", model, cfg, ctx).metrics["model"]
    lite = apply_stage("cast", model, {"dtype": "bfloat16"}, ctx).model
    after = apply_stage("evaluate", lite, cfg, ctx).metrics["model"]
    assert after["weight_bytes"] == before["weight_bytes"] // 2 == weight_bytes(lite)
    assert abs(after["perplexity"] / before["perplexity"] - 1) < 0.01
    assert before["perplexity"] < 20  # trained weights read simple English well


def test_cast_in_memory_equals_checkpoint(llama_dir, tmp_path, tokenizer):
    """What the next stage measures is what is saved: RoPE buffers are not cast, weights are."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ctx = Context.create(tokenizer, {})
    lite = apply_stage("cast", model, {"dtype": "bfloat16"}, ctx).model
    lite.save_pretrained(tmp_path / "lite")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lite", dtype="auto").eval()
    ids = torch.randint(0, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lite(ids).logits, again(ids).logits)
    assert lite.model.embed_tokens.weight.dtype == torch.bfloat16


def test_apply_stage_leaves_the_teacher_alone(llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ctx = Context.create(tokenizer, {}, teacher=teacher)
    lite = apply_stage("cast", teacher, {"dtype": "float16"}, ctx).model
    assert lite is not teacher and ctx.teacher() is teacher
    assert teacher.model.embed_tokens.weight.dtype == torch.float32


def test_evaluate_measures_teacher_with_same_protocol(llama_dir, tokenizer, text_file):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    student = make_model("llama", len(tokenizer), seed=1)
    ctx = Context.create(tokenizer, {"t": TextSource(path=str(text_file), block_size=32)}, teacher=teacher)
    cfg = EvaluateConfig(context_length=32, prompt_length=16, decode_tokens=4, repeats=1)
    m = apply_stage("evaluate", student, cfg, ctx).metrics
    assert m["teacher"]["protocol"] == m["model"]["protocol"]
    assert m["teacher"]["perplexity"] != m["model"]["perplexity"]
    assert m["model"]["prefill_tokens_per_s"] > 0 and m["model"]["peak_memory_bytes"] >= m["model"]["weight_bytes"]
    again = apply_stage("evaluate", student, cfg, ctx).metrics
    assert again["teacher"] is m["teacher"]  # measured once per protocol


def test_context_length_beyond_model_is_input_error(llama_dir, tokenizer, text_file):
    from transformers import AutoModelForCausalLM

    from dsc.errors import DscInputError

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ctx = Context.create(tokenizer, {"t": TextSource(path=str(text_file), block_size=32)})
    with pytest.raises(DscInputError, match="context_length: 512 exceeds"):
        apply_stage("evaluate", model, EvaluateConfig(context_length=512, teacher=False), ctx)
