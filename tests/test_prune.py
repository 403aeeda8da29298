"""Structured pruning: every cut reloads with from_pretrained and reproduces the in-memory logits,
GQA stays valid, the plan's counts are the saved model's; activation/Taylor beat magnitude/random."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_moe
from dsc import Context, TeacherSource, TextSource, apply_stage
from dsc.errors import DscInputError, FieldError
from dsc.evaluation import param_counts, perplexity
from dsc.prune import PruneConfig, plan

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
CUTS = {  # name: config
    "heads per group": dict(heads=0.5),
    "kv groups": dict(heads=0.5, head_mode="groups"),
    "channels": dict(channels=0.4),
    "layers": dict(layers=0.5),
    "everything": dict(heads=0.5, channels=0.25, layers=0.25, importance="taylor"),
}


def tiny(family: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cls(**common, **extra)).eval()


@pytest.fixture
def ctx(tokenizer, text_file):
    return Context.create(tokenizer, {"t": TextSource(path=str(text_file), block_size=32,
                                                      splits={"calibration": 0.5, "eval": 0.5})})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", CUTS, ids=list(CUTS))
def test_cut_saves_reloads_and_matches(family, cut, tokenizer, ctx, tmp_path):
    out = apply_stage("prune", tiny(family, len(tokenizer)), PruneConfig(**CUTS[cut]), ctx)
    again = assert_reloads(out, len(tokenizer), tmp_path)
    assert again.config.num_hidden_layers == 4 - round(4 * CUTS[cut].get("layers", 0))


def assert_reloads(out, vocab: int, folder):
    """The pruned model counts what its plan says, saves, reloads with from_pretrained to the
    same logits, and generates (the KV cache follows renumbered layers)."""
    from transformers import AutoModelForCausalLM

    pruned, summary = out.model, out.metrics["plan"]
    assert summary["params_after"] == param_counts(pruned)["params"] < summary["params_before"]
    pruned.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert param_counts(again)["params"] == summary["params_after"]
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, again(ids).logits, rtol=0, atol=1e-5)
        again.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    return again


def test_gqa_counts(tokenizer, ctx):
    model = tiny("llama", len(tokenizer))  # 4 heads, 2 KV heads
    per_group = apply_stage("prune", model, PruneConfig(heads=0.5), ctx).model.config  # one query head per group
    assert (per_group.num_attention_heads, per_group.num_key_value_heads) == (2, 2)
    groups = apply_stage("prune", tiny("llama", len(tokenizer)), PruneConfig(heads=0.5, head_mode="groups"), ctx)
    assert (groups.model.config.num_attention_heads, groups.model.config.num_key_value_heads) == (2, 1)


def test_plan_is_data_and_does_not_touch_the_model(tokenizer, ctx):
    model = tiny("llama", len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = plan(model, PruneConfig(channels=0.5, layers=0.25), ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(p.drop_layers) == 1 and all(len(v) == 32 for v in p.keep_channels.values())
    json.dumps(p.to_dict())
    assert p.summary()["removed_fraction_non_embedding"] > 0


def test_targets_and_ignore(tokenizer, ctx):
    model = tiny("llama", len(tokenizer))
    p = plan(model, PruneConfig(layers=0.5, layer_importance="random", ignore=[r"layers\.(0|1)$"]), ctx)
    assert set(p.drop_layers) == {2, 3}
    with pytest.raises(FieldError, match="ignore: pattern 'nothing' matches no layer"):
        plan(model, PruneConfig(layers=0.5, ignore=["nothing"]), ctx)


def test_bad_configs_fail_validation():
    from dsc.recipe import validate

    with pytest.raises(DscInputError, match=r"stages\[0\]\.prune\.channels: must be in \[0, 1\), got 1.5"):
        validate({"teacher": "org/m", "stages": [{"prune": {"channels": 1.5}}], "output": "x"})
    with pytest.raises(DscInputError, match="nothing to prune"):
        validate({"teacher": "org/m", "stages": [{"prune": {}}], "output": "x"})


def test_unsupported_family_names_the_supported_ones(tokenizer, ctx):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(DscInputError, match="supported: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe"):
        plan(model, PruneConfig(channels=0.5), ctx)


def test_importance_quality_floor(stories_dir):
    """On trained weights (stories260K), data-aware importance keeps far more quality than
    magnitude or random at the same cut (heads + channels, no recovery)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ctx = Context.create(tok, {"gen": TeacherSource(num_sequences=48, length=127, block_size=128,
                                                    splits={"calibration": 0.5, "eval": 0.5})},
                         teacher=teacher, seed=0)
    stream = ctx.data["gen"].stream("eval")
    ppl = {}
    for importance in ("activation", "taylor", "magnitude", "random"):
        model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
        cfg = PruneConfig(heads=0.5, channels=0.4, importance=importance, num_samples=24)
        pruned = apply_stage("prune", model, cfg, ctx).model
        ppl[importance] = perplexity(pruned, stream, 128, 128)["perplexity"]
    base = perplexity(teacher, stream, 128, 128)["perplexity"]
    print({"teacher": base, **ppl})
    assert max(ppl["activation"], ppl["taylor"]) < min(ppl["magnitude"], ppl["random"])


def test_block_importance_drops_the_most_redundant_layer(stories_dir):
    """Depth: block influence picks, without trying, the layer whose removal hurts least
    (checked against every single-layer cut of stories260K)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ctx = Context.create(tok, {"gen": TeacherSource(num_sequences=48, length=127, block_size=128,
                                                    splits={"calibration": 0.5, "eval": 0.5})}, teacher=teacher)
    stream = ctx.data["gen"].stream("eval")
    n = teacher.config.num_hidden_layers
    each = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
        keep = [rf"layers\.{j}$" for j in range(n) if j != i]
        cut = apply_stage("prune", model, PruneConfig(layers=1 / n, layer_importance="random", ignore=keep), ctx)
        each.append(perplexity(cut.model, stream, 128, 128)["perplexity"])
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    chosen = apply_stage("prune", model, PruneConfig(layers=1 / n), ctx)
    assert chosen.metrics["plan"]["drop_layers"] == [min(range(n), key=each.__getitem__)]


@pytest.mark.parametrize("kinds", [["heads", "channels"], ["channels"], ["layers"]])
def test_global_ratio_reaches_the_target(tokenizer, ctx, kinds):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)  # wider than the tiny model, so rounding leaves room to hit the target
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=10,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)).eval()
    p = plan(model, PruneConfig(ratio=0.3, kinds=kinds, importance="magnitude", layer_importance="random"), ctx)
    assert abs(p.summary()["removed_fraction_non_embedding"] - 0.3) < 0.06
    assert not ({"heads", "channels", "layers"} - set(kinds)) & {
        k for k, changed in (("heads", bool(p.keep_heads)), ("channels", bool(p.keep_channels)),
                             ("layers", bool(p.drop_layers))) if changed}


def tiny_moe(family: str, vocab: int, seed: int = 0):
    return make_moe(family, vocab, seed)


MOE_CUTS = {
    "experts": dict(experts=0.5),
    "experts by frequency": dict(experts=0.5, expert_importance="frequency"),
    "heads": dict(heads=0.5),
    "layers + experts": dict(layers=0.25, experts=0.5, layer_importance="random"),
}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("cut", MOE_CUTS, ids=list(MOE_CUTS))
def test_moe_cut_saves_reloads_and_matches(family, cut, tokenizer, ctx, tmp_path):
    out = apply_stage("prune", tiny_moe(family, len(tokenizer)), PruneConfig(**MOE_CUTS[cut]), ctx)
    again = assert_reloads(out, len(tokenizer), tmp_path)
    if "experts" in MOE_CUTS[cut]:
        key = "num_local_experts" if family == "mixtral" else "num_experts"
        assert getattr(again.config, key) == 2 and again.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2


def test_dense_layers_of_an_moe_keep_their_kind(tokenizer, ctx, tmp_path):
    """qwen2-moe says which layers are dense by index: dropping layers restates it."""
    from transformers import AutoModelForCausalLM

    model = tiny_moe("qwen2_moe", len(tokenizer))  # layer 1 is dense
    ignore = [r"layers\.(1|2|3)$"]  # drop layer 0: the dense layer becomes layer 0
    out = apply_stage("prune", model, PruneConfig(layers=0.25, layer_importance="random", ignore=ignore,
                                                  channels=0.5), ctx)
    out.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.mlp_only_layers == [0] and again.config.intermediate_size == 24
    assert not hasattr(again.model.layers[0].mlp, "experts") and hasattr(again.model.layers[1].mlp, "experts")


def test_experts_kept_are_the_most_used(tokenizer, ctx):
    """Router usage: the experts kept in each layer are those with the most routing weight on the
    calibration data, recomputed here from the router's own outputs."""
    model = tiny_moe("mixtral", len(tokenizer))
    usage = {i: torch.zeros(4) for i in range(4)}

    def record(i):
        def hook(mod, args, out):
            usage[i].index_add_(0, out[2].reshape(-1), out[1].reshape(-1).float())
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(record(i)) for i, layer in enumerate(model.model.layers)]
    blocks = ctx.data["t"].blocks("calibration")[:32]
    with torch.no_grad():
        for k in range(0, len(blocks), 4):
            model(blocks[k:k + 4])
    for h in hooks:
        h.remove()
    p = plan(model, PruneConfig(experts=0.5, expert_importance="usage"), ctx)
    for i, u in usage.items():
        assert p.keep_experts[i] == sorted(torch.argsort(u, descending=True)[:2].tolist())


def test_too_few_experts_for_top_k(tokenizer, ctx):
    with pytest.raises(FieldError, match="fewer than the 2 each token is routed to"):
        plan(tiny_moe("mixtral", len(tokenizer)), PruneConfig(experts=0.75), ctx)


def test_gpt_neox_channels_and_layers(tokenizer, ctx, tmp_path):
    """A family with other module names (fused query_key_value, dense_h_to_4h)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=256)).eval()
    out = apply_stage("prune", model, PruneConfig(channels=0.5, layers=0.25, importance="taylor"), ctx)
    out.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.config.intermediate_size, again.config.num_hidden_layers) == (32, 3)
    assert param_counts(again)["params"] == out.metrics["plan"]["params_after"]
    ids = torch.randint(0, len(tokenizer), (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out.model(ids).logits, again(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(FieldError, match="heads: gpt-neox derives its head size"):
        plan(model, PruneConfig(heads=0.5), ctx)


@pytest.mark.parametrize("head_mode", ["per_group", "groups"])
def test_cut_equals_masking_the_same_units(tokenizer, ctx, head_mode):
    """Functional check of the cut: the pruned model computes exactly what the original computes
    with the dropped heads' o_proj columns, dropped channels' down_proj columns and dropped
    layers' outputs zeroed (a zero-output layer is the identity on the residual stream)."""
    import copy

    original = tiny("llama", len(tokenizer))
    cfg = PruneConfig(heads=0.5, head_mode=head_mode, channels=0.5, layers=0.25, importance="random", reconstruct=False,
                      layer_importance="random", seed=3)
    p = plan(original, cfg, ctx)
    masked = copy.deepcopy(original)
    hd = original.config.head_dim
    for i, layer in enumerate(masked.model.layers):
        o, down = layer.self_attn.o_proj.weight.data, layer.mlp.down_proj.weight.data
        if i in p.drop_layers:
            o.zero_(), down.zero_()
            continue
        for h in set(range(original.config.num_attention_heads)) - set(p.keep_heads[i]):
            o[:, h * hd:(h + 1) * hd] = 0
        down[:, sorted(set(range(64)) - set(p.keep_channels[i]))] = 0
    pruned = apply_stage("prune", original, cfg, ctx).model
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=0, atol=1e-5)


def test_biases_and_multi_head_attention(tokenizer, ctx, tmp_path):
    """Biased projections, one KV head per query head (group size 1), channel multiples."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, max_position_embeddings=256)).eval()
    out = apply_stage("prune", model, PruneConfig(heads=0.5, channels=0.3, channel_multiple=16), ctx)
    assert (out.model.config.num_attention_heads, out.model.config.num_key_value_heads) == (2, 2)
    assert out.model.config.intermediate_size == 32  # 64 · 0.7 = 44.8, down to a multiple of 16
    assert out.metrics["plan"]["params_after"] == param_counts(out.model)["params"]
    out.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, len(tokenizer), (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out.model(ids).logits, again(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(FieldError, match="channel_multiple: 128 exceeds the MLP width"):
        plan(again, PruneConfig(channels=0.5, channel_multiple=128), ctx)


def test_global_ratio_skips_kinds_the_model_lacks(tokenizer, ctx):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=256)).eval()
    p = plan(neox, PruneConfig(ratio=0.2, importance="magnitude"), ctx)  # default kinds: heads, channels
    assert p.keep_channels and not p.keep_heads and "skipped (not in this model): heads" in p.notes[-1]
    moe = tiny_moe("mixtral", len(tokenizer))
    p = plan(moe, PruneConfig(ratio=0.6, kinds=["experts"]), ctx)  # more than routing allows: clamps at top-k
    assert p.config["num_local_experts"] == 2
    with pytest.raises(FieldError, match="kinds: olmoe cannot cut any of"):  # q/k norms span all heads
        plan(tiny_moe("olmoe", len(tokenizer)), PruneConfig(ratio=0.3, kinds=["heads"]), ctx)
