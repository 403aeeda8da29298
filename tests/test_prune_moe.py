"""Mixtures of experts (DeepSeek-V3 with MLA, Qwen2/3-MoE, Mixtral, OLMoE): every cut saves,
reloads with from_pretrained and reproduces the in-memory logits; the config's routing
constraints hold after every cut; a cut of nothing changes nothing; importance is what it says."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import MOE_FAMILIES, make_moe
from dsc import Context, apply_stage
from dsc.data.pipeline import TokenData
from dsc.errors import FieldError
from dsc.prune import PruneConfig, plan
from dsc.prune import experts as moe_experts
from dsc.structure import describe
from test_prune import assert_reloads

CUTS = {
    "experts": dict(experts=0.5),
    "experts merged": dict(experts=0.5, expert_merge="merge"),
    "experts reconstruction": dict(experts=0.5, expert_importance="reconstruction"),
    "channels": dict(channels=0.5),
    "heads": dict(heads=0.5),
    "latent": dict(latent=0.5),
    "all kinds": dict(experts=0.25, channels=0.25, heads=0.5, layers=0.25, layer_importance="random"),
}


@pytest.fixture
def ctx(tokenizer):
    ctx = Context.create(tokenizer, {}, device="cpu")
    blocks = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    ctx.data.put(TokenData("calib", blocks.reshape(-1), 32, {}, ""))
    return ctx


def routing_is_valid(model) -> None:
    """The saved config describes the tensors and group-limited routing can still pick top_k."""
    c = model.config
    s = describe(model)
    family = s.family
    n = getattr(c, family.experts_key)
    for layer in s.sparse():
        assert layer.moe.experts.gate_up_proj.shape[0] == layer.moe.router.weight.shape[0] == n
        assert layer.moe.width == getattr(c, family.expert_width_key)
        bias = getattr(layer.moe.router, "e_score_correction_bias", None)
        assert bias is None or bias.shape == (n,)
    if c.model_type == "deepseek_v3":
        assert n % c.n_group == 0 and n // c.n_group >= 2 and c.num_experts_per_tok <= c.topk_group * n // c.n_group
        assert all((layer.mlp is not None) == (layer.index < c.first_k_dense_replace) for layer in s.layers)
        assert layer.moe.shared.width == c.moe_intermediate_size * c.n_shared_experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("cut", CUTS, ids=list(CUTS))
def test_cut_saves_reloads_and_routes_validly(family, cut, tokenizer, ctx, tmp_path):
    cfg = PruneConfig(split="all", **CUTS[cut])
    model = make_moe(family, len(tokenizer))
    if family == "olmoe" and cfg.heads:  # q_norm/k_norm span all heads
        with pytest.raises(FieldError, match="q_norm"):
            apply_stage("prune", model, cfg, ctx)
        return
    if family != "deepseek_v3" and cfg.latent:
        with pytest.raises(FieldError, match="latent: .* no multi-head latent attention"):
            apply_stage("prune", model, cfg, ctx)
        return
    if cfg.expert_importance == "reconstruction" and family != "deepseek_v3" and family != "qwen3_moe":
        pytest.skip("reconstruction: DeepSeek-V3 masks, Qwen3-MoE cuts copies; one of each is enough")
    out = apply_stage("prune", model, cfg, ctx)
    again = assert_reloads(out, len(tokenizer), tmp_path)
    routing_is_valid(again)


def test_deepseek_cut_is_even_per_group_and_merges_groups_when_needed(tokenizer, ctx, tmp_path):
    half = plan(make_moe("deepseek_v3", len(tokenizer)), PruneConfig(experts=0.5, split="all"), ctx)
    for keep in half.keep_experts.values():  # 8 experts in 2 groups of 4: two from each
        assert sum(e < 4 for e in keep) == sum(e >= 4 for e in keep) == 2
    assert "n_group" not in half.config
    out = apply_stage("prune", make_moe("deepseek_v3", len(tokenizer)), PruneConfig(experts=0.75, split="all"), ctx)
    assert (out.model.config.n_group, out.model.config.topk_group, out.model.config.n_routed_experts) == (1, 1, 2)
    assert any("n_group and topk_group set to 1" in note for note in out.metrics["plan"]["notes"])
    routing_is_valid(assert_reloads(out, len(tokenizer), tmp_path))


@pytest.mark.parametrize("cut", [dict(experts=0.05), dict(heads=0.1)])
def test_cutting_nothing_changes_nothing(cut, tokenizer, ctx):
    model = make_moe("deepseek_v3", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        out = apply_stage("prune", model, PruneConfig(split="all", **cut), ctx)
        torch.testing.assert_close(out.model(ids).logits, before, rtol=0, atol=0)


def test_reap_is_the_router_weighted_output_norm(tokenizer, ctx):
    """REAP recomputed here from the router's outputs and the experts' own weights."""
    model = make_moe("deepseek_v3", len(tokenizer))
    layer = describe(model).sparse()[0]
    seen = []
    hook = layer.moe.router.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[1], out[2])))
    blocks = ctx.data["calib"].blocks("all")
    with torch.no_grad():
        for k in range(0, len(blocks), 4):
            model(blocks[k:k + 4])
    hook.remove()
    total, count = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    experts = layer.moe.experts
    with torch.no_grad():
        for x, weights, index in seen:
            x = x.reshape(-1, x.shape[-1])
            for t in range(x.shape[0]):
                for w, e in zip(weights[t].tolist(), index[t].tolist()):
                    gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                    total[e] += w * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)).norm()
                    count[e] += 1
    p = plan(model, PruneConfig(experts=0.5, split="all", num_samples=8), ctx)
    reap = (total / count.clamp(min=1)).float()
    assert p.keep_experts[layer.index] == sorted(reap[:4].argsort(descending=True)[:2].tolist() +
                                                  (4 + reap[4:].argsort(descending=True)[:2]).tolist())


def test_masked_routing_is_the_cut_model(tokenizer):
    """Reconstruction scores a removal by masking the expert out of routing: that must be exactly
    the block a cut (with equal groups) builds."""
    model = make_moe("deepseek_v3", len(tokenizer))
    layer = describe(model).sparse()[0]
    block = model.model.layers[layer.index].mlp
    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    keep = [0, 2, 5, 7]
    with torch.no_grad():
        masked = moe_experts._error(block, layer.moe, keep, x, torch.zeros(1, 64, 32))
        cut = copy.deepcopy(block)
        moe_experts.cut(SimpleNamespace(router=cut.gate, experts=cut.experts), keep)
        assert masked == pytest.approx(cut(x).float().pow(2).sum().item(), rel=1e-6)


def test_merge_averages_by_routing_frequency(tokenizer, ctx):
    model = make_moe("mixtral", len(tokenizer))
    before = {i: layer.mlp.experts.gate_up_proj.detach().clone() for i, layer in enumerate(model.model.layers)}
    p = plan(model, PruneConfig(experts=0.5, expert_merge="merge", split="all"), ctx)
    out = apply_stage("prune", model, PruneConfig(experts=0.5, expert_merge="merge", split="all"), ctx)
    for i, layer in enumerate(out.model.model.layers):
        keep, into, freq = p.keep_experts[i], p.merge_experts[i], torch.tensor(p.merge_weights[i])
        for slot, k in enumerate(keep):
            group = [k] + [d for d, t in into.items() if t == k]
            w = freq[group] / freq[group].sum()
            expected = (w[:, None, None] * before[i][group]).sum(0)
            torch.testing.assert_close(layer.mlp.experts.gate_up_proj[slot], expected, rtol=1e-5, atol=1e-6)


def test_reconstruction_needs_a_maskable_router_for_grouped_routing(tokenizer, ctx):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DeepseekV2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=2,
        topk_group=1, num_experts_per_tok=2, topk_method="group_limited_greedy", first_k_dense_replace=1,
        q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4))
    with pytest.raises(FieldError, match="expert_importance"):
        plan(model, PruneConfig(experts=0.5, expert_importance="reconstruction", split="all"), ctx)
    out = apply_stage("prune", model, PruneConfig(experts=0.5, heads=0.5, split="all"), ctx)  # reap: fine
    assert out.model.config.n_routed_experts == 2 and out.model.config.num_attention_heads == 2


# ---- on trained weights: tiny-deepseek-v3 (MLA, 1 shared + 8 routed experts, 2 routing groups) --------

def _ppl(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.exp().item()


@pytest.fixture(scope="module")
def dsv3(tiny_dsv3_dir, dsv3_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dsv3_dir).eval()
    ctx = Context.create(AutoTokenizer.from_pretrained(tiny_dsv3_dir), {}, device="cpu")
    ctx.data.put(TokenData("calib", dsv3_text[0].reshape(-1), 128, {}, ""))
    return model, ctx, dsv3_text[1]


def _pruned_ppl(dsv3, **cut):
    model, ctx, held_out = dsv3
    return _ppl(apply_stage("prune", copy.deepcopy(model), PruneConfig(split="all", **cut), ctx).model, held_out)


@pytest.fixture(scope="module")
def held_out_128(dsv3_text):
    """128 × 128 held-out tokens (seeds 2–5): expert choices differ by a few % in perplexity here."""
    from conftest import sample_stories

    return torch.cat([dsv3_text[1]] + [sample_stories(32, 128, seed) for seed in (3, 4, 5)])


def _pooled_ppl(model, ids):
    with torch.no_grad():
        return torch.tensor([model(ids[i:i + 32], labels=ids[i:i + 32]).loss for i in range(0, len(ids), 32)]).mean().exp().item()


def test_reap_beats_frequency_and_random_with_half_the_experts(dsv3, held_out_128):
    """Half the routed experts removed, layer by layer (sequential: each MoE layer scored with the
    earlier cuts made). Measured on 128 held-out samples: reap 5.077, frequency 5.117, random
    5.171 (mean of 3 seeds); float 4.567. Loads on this model are balanced (max/mean ≈ 1.1), so the
    margins are small: in one pass over the unpruned model REAP does not beat frequency here."""
    model, ctx, _ = dsv3

    def ppl(**cut):
        pruned = apply_stage("prune", copy.deepcopy(model), PruneConfig(experts=0.5, split="all", **cut), ctx).model
        return _pooled_ppl(pruned, held_out_128)

    reap = ppl(expert_importance="reap")
    assert reap < ppl(expert_importance="frequency")
    assert reap < sum(ppl(expert_importance="random", seed=s) for s in range(3)) / 3


@pytest.mark.parametrize("importance", ["reap", "reconstruction"])
def test_expert_importance_knows_which_experts_matter(dsv3, importance):
    """Half the routed experts removed: keeping the experts an importance ranks highest beats
    keeping those it ranks lowest, by a clear margin."""
    model, ctx, held_out = dsv3
    best = _pruned_ppl(dsv3, experts=0.5, expert_importance=importance)
    p = plan(model, PruneConfig(experts=0.5, expert_importance=importance, split="all"), ctx)
    worst = copy.deepcopy(model)
    inverse = {i: [e for e in range(8) if e not in keep] for i, keep in p.keep_experts.items()}
    for layer in describe(worst).sparse():
        moe_experts.cut(layer.moe, inverse[layer.index])
    worst.config.n_routed_experts = 4
    assert best < _ppl(worst, held_out) - 0.1


def test_sequential_scoring_leaves_the_model_as_it_was(dsv3):
    model, ctx, _ = dsv3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [layer.mlp for layer in model.model.layers]
    plan(model, PruneConfig(experts=0.75, expert_importance="reconstruction", split="all"), ctx)
    assert [layer.mlp for layer in model.model.layers] == blocks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(layer.mlp.gate.num_group == 2 for layer in model.model.layers[1:])


def test_mla_heads_by_activation_beat_random(dsv3):
    """A quarter of the MLA heads removed (measured: activation 4.68, random 5.08; float 4.34)."""
    activation = _pruned_ppl(dsv3, heads=0.25)
    assert activation < min(_pruned_ppl(dsv3, heads=0.25, importance="random", seed=s) for s in range(2))


def test_mla_latent_channels_by_activation_beat_magnitude_and_random(dsv3):
    """A quarter of q_lora_rank and kv_lora_rank (64 → 48, 32 → 24: a 25 % smaller KV cache),
    the latent norms rescaled (measured: activation 5.15, random 5.41, magnitude 5.60; float 4.57;
    without the rescaling activation gives 5.34)."""
    model, ctx, held_out = dsv3
    out = apply_stage("prune", copy.deepcopy(model), PruneConfig(latent=0.25, split="all"), ctx)
    assert (out.model.config.q_lora_rank, out.model.config.kv_lora_rank) == (48, 24)
    activation = _ppl(out.model, held_out)
    assert activation < _pruned_ppl(dsv3, latent=0.25, importance="magnitude")
    assert activation < _pruned_ppl(dsv3, latent=0.25, importance="random")


def test_expert_channels_by_activation_beat_magnitude_and_random(dsv3):
    """A quarter of every expert's (and the dense layer's) channels (measured: activation 4.81,
    random 5.27, magnitude 5.59)."""
    activation = _pruned_ppl(dsv3, channels=0.25)
    assert activation < _pruned_ppl(dsv3, channels=0.25, importance="magnitude")
    assert activation < _pruned_ppl(dsv3, channels=0.25, importance="random")


def test_v3_moe_to_lite_recipe_runs_end_to_end(tiny_dsv3_dir, tmp_path):
    """recipes/v3_moe_to_lite.yaml with a small budget: prune experts + MLA heads → recover → dense
    student → AWQ; the published model is the 4-bit Llama student and reloads."""
    import yaml
    from transformers import AutoModelForCausalLM

    from conftest import ROOT, run_cli

    recipe = yaml.safe_load((ROOT / "recipes" / "v3_moe_to_lite.yaml").read_text())
    recipe["teacher"] = str(tiny_dsv3_dir)
    recipe["data"]["generated"].update(num_sequences=96)
    recipe["output"] = str(tmp_path / "run")
    for stage in recipe["stages"]:
        (name, cfg), = stage.items()
        if name == "distill":
            cfg.update(steps=8, save_every=4)
        if name in ("prune", "awq"):
            cfg["num_samples"] = 8
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli("run", path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lite = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert lite.config.model_type == "llama" and lite.config.quantization_config.to_dict()["format"] == "pack-quantized"
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stages" / "01-prune" / "model")
    assert (pruned.config.n_routed_experts, pruned.config.num_attention_heads) == (4, 3)
    assert (tmp_path / "run" / "report.md").read_text().count("after prune") >= 3
    # both deploy to llama.cpp: the recovered MoE as deepseek2, the student's AWQ grid as Q4_0
    from dsc.export import gguf as G

    moe = G.read_summary(tmp_path / "run" / "export" / "v3-moe-lite.gguf")
    assert moe["fields"]["general.architecture"] == "deepseek2" and moe["fields"]["deepseek2.expert_count"] == 4
    student = G.read_summary(tmp_path / "run" / "export" / "lite.gguf")
    assert student["tensors"]["blk.0.ffn_down.weight"][0] == "Q4_0"


def test_prune_experts_moe_recipe(tiny_dsv3_dir, tmp_path):
    """recipes/prune_experts_moe.yaml with a small budget: half the routed experts go, the model
    reloads with a true config, and KD recovery lowers the pruned model's perplexity."""
    import json

    import yaml
    from transformers import AutoConfig

    from conftest import ROOT, run_cli

    recipe = yaml.safe_load((ROOT / "recipes" / "prune_experts_moe.yaml").read_text())
    recipe.update(teacher=str(tiny_dsv3_dir), output=str(tmp_path / "run"))
    recipe["data"]["generated"].update(num_sequences=96)
    for stage in recipe["stages"]:
        (name, cfg), = stage.items()
        cfg.update({"distill": {"steps": 16, "save_every": 8}, "prune": {"num_samples": 8}}.get(name, {}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli("run", path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    config = AutoConfig.from_pretrained(tmp_path / "run" / "model")
    assert (config.n_routed_experts, config.num_experts_per_tok) == (4, 2)
    teacher, pruned, recovered = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluations"][0]["rows"]
    assert recovered["perplexity"] < pruned["perplexity"] and teacher["perplexity"] < pruned["perplexity"]
    assert recovered["params"] < 0.75 * teacher["params"]
