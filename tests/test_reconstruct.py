"""`prune: {reconstruct: true}`: the projections that read removed heads and channels are refit by
least squares, layer by layer. The refit is the least-squares optimum, below the plain cut's error,
every family reloads to the same logits, and on trained weights it keeps far more quality."""
from __future__ import annotations

import pytest
import torch

from conftest import make_moe
from dsc import Context, TeacherSource, apply_stage
from dsc.evaluation import perplexity
from dsc.prune import PruneConfig
from dsc.prune.obs import removal_order
from dsc.prune.reconstruct import output_error, solve
from test_prune import assert_reloads, ctx, tiny  # noqa: F401  (ctx: a fixture)


def test_refit_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    keep = [0, 2, 3, 7, 8, 11, 15, 16, 20, 23]
    gram = x.T @ x / len(x)
    new = solve(w, gram, keep, damp=0.0)
    best = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # min ‖x Wᵀ − x[:, K] W'ᵀ‖ directly
    torch.testing.assert_close(new, best, rtol=1e-8, atol=1e-8)
    error = output_error(w, gram, keep, new)
    direct = ((x @ w.T - x[:, keep] @ new.T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert error == pytest.approx(direct, rel=1e-9)
    assert error < output_error(w, gram, keep, w[:, keep])  # below the plain cut's
    damped = solve(w, gram, keep, damp=0.05)  # the ridge moves it off the optimum, not far
    assert error < output_error(w, gram, keep, damped) < 1.5 * error


def _removal_error(w, gram, removed: set[int], size: int) -> float:
    """The output error after removing units `removed` (of `size` columns) with the rest refit."""
    keep = [c for c in range(w.shape[1]) if c // size not in removed]
    return output_error(w, gram, keep, solve(w, gram, keep, damp=0.0))


@pytest.mark.parametrize("size", [1, 4])
def test_obs_removes_greedily_what_costs_least(size):
    """Each greedy step removes the unit whose removal, given the ones already removed and the rest
    refit, raises the output error least: checked against trying every unit, step by step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(12, 32, generator=g, dtype=torch.float64)
    gram = x.T @ x / len(x)
    order = removal_order(w, gram, size, damp=0.0)
    units = 32 // size
    assert sorted(order.tolist()) == list(range(units))
    removed: set[int] = set()
    for step in range(min(units - 1, 5)):
        best = min((u for u in range(units) if u not in removed), key=lambda u: _removal_error(w, gram, removed | {u}, size))
        assert int((order == step).nonzero()) == best
        removed.add(best)


def test_obs_keeps_every_groups_quota():
    """per_group heads: until each KV group is down to its quota no group goes below it, so the
    heads the plan keeps (each group's latest removed) are the ones greedy removal kept."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 48, generator=g, dtype=torch.float64)
    x[:, :12] *= 0.01  # the heads of group 0 write almost nothing: unconstrained, greedy takes them all first
    w = torch.randn(8, 48, generator=g, dtype=torch.float64)
    gram = x.T @ x / len(x)
    groups = torch.arange(12) // 3  # 4 KV groups of 3 heads of 4 columns
    assert sorted(removal_order(w, gram, 4, 0.0)[:3].tolist()) == [0, 1, 2]
    order = removal_order(w, gram, 4, 0.0, groups=groups, quota=1)
    first = order < 8  # the first 8 removed: two of every group
    assert first.view(4, 3).sum(1).tolist() == [2, 2, 2, 2]


CUTS = {"heads": dict(heads=0.5), "groups": dict(heads=0.5, head_mode="groups"), "channels": dict(channels=0.5),
        "everything": dict(heads=0.5, channels=0.25, layers=0.25, importance="taylor"),
        "obs": dict(heads=0.5, channels=0.5, importance="obs"),
        "obs-groups": dict(heads=0.5, head_mode="groups", channels=0.25, importance="obs")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("cut", CUTS, ids=list(CUTS))
def test_reconstructed_cut_reloads_and_lowers_the_error(family, cut, tokenizer, ctx, tmp_path):
    out = apply_stage("prune", tiny(family, len(tokenizer)), PruneConfig(**CUTS[cut], reconstruct=True), ctx)
    assert_reloads(out, len(tokenizer), tmp_path)
    rec = out.metrics["plan"]["reconstruction"]
    assert set(rec) == {k for k, unit in (("o_proj", "heads"), ("down_proj", "channels")) if unit in CUTS[cut]}
    for errors in rec.values():
        assert errors["error_refit"] < errors["error_cut"]


@pytest.mark.parametrize("importance", ["activation", "obs"])
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_reconstruction_in_moe_and_mla(family, importance, tokenizer, ctx, tmp_path):
    """Shared and routed experts' down_proj and MLA's o_proj (one v_dim slice per head) are refit too;
    obs orders routed experts' channels each on its own tokens."""
    out = apply_stage("prune", make_moe(family, len(tokenizer)), PruneConfig(heads=0.5, channels=0.5,
                                                                              reconstruct=True,
                                                                              importance=importance), ctx)
    assert_reloads(out, len(tokenizer), tmp_path)
    rec = out.metrics["plan"]["reconstruction"]
    assert set(rec) == {"o_proj", "down_proj", "experts.down_proj"}  # routed experts: each on its own tokens
    assert all(e["error_refit"] < e["error_cut"] for e in rec.values())


def _stories(model_dir, n: int = 96):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ctx = Context.create(tok, {"gen": TeacherSource(num_sequences=n, length=127, block_size=128,
                                                    splits={"calibration": 0.5, "eval": 0.5})},
                         teacher=teacher, seed=0)
    return ctx, ctx.data["gen"].stream("eval")


def _with_and_without(model_dir) -> dict[tuple[str, bool], float]:
    """Held-out perplexity after heads 0.5 + channels 0.4 (no training), by (importance, refit)."""
    from transformers import AutoModelForCausalLM

    ctx, stream = _stories(model_dir)
    ppl = {}
    for importance in ("activation", "obs"):
        for rec in (False, True):
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            cfg = PruneConfig(heads=0.5, channels=0.4, num_samples=48, reconstruct=rec, importance=importance)
            out = apply_stage("prune", model, cfg, ctx).model
            ppl[importance, rec] = perplexity(out, stream, 128, 128)["perplexity"]
    print(ppl)
    return ppl


def test_reconstruction_quality_floor(stories_dir):
    """stories260K, heads 0.5 + channels 0.4, no training, held-out samples: the refit model's
    perplexity is at most 0.7× the plain activation cut's, and obs beats activation with and
    without the refit (measured: activation 37.1 → 14.4, obs 35.7 → 13.4; teacher 4.40)."""
    ppl = _with_and_without(stories_dir)
    assert ppl["activation", True] < 0.7 * ppl["activation", False]
    assert ppl["obs", False] < ppl["activation", False] and ppl["obs", True] < ppl["activation", True]


def test_reconstruction_quality_floor_on_deepseek_v3(tiny_dsv3_dir):
    """tiny-deepseek-v3 (MLA heads, dense and shared / routed expert channels), heads 0.5 +
    channels 0.4, no training, on text the teacher samples: at most 0.9× the plain cut's
    perplexity, obs below activation (measured: activation 10.2 → 8.2, obs 9.7 → 8.0; teacher 5.76)."""
    ppl = _with_and_without(tiny_dsv3_dir)
    assert ppl["activation", True] < 0.9 * ppl["activation", False]
    assert ppl["obs", False] < ppl["activation", False] and ppl["obs", True] < ppl["activation", True]


def test_obs_refuses_latent_ranks():
    with pytest.raises(ValueError, match="importance obs .* latent"):
        PruneConfig(latent=0.5, importance="obs")


def test_reconstruct_default_needs_data_only_when_asked(tokenizer):
    """On by default: a run without data skips the refit with a note; an explicit true is refused."""
    from dsc.errors import FieldError

    ctx = Context.create(tokenizer, {})
    out = apply_stage("prune", tiny("llama", len(tokenizer)), PruneConfig(channels=0.5, importance="magnitude"), ctx)
    assert any("reconstruct skipped" in n for n in out.metrics["plan"]["notes"])
    with pytest.raises(FieldError, match="reconstruct"):
        apply_stage("prune", tiny("llama", len(tokenizer)),
                    PruneConfig(channels=0.5, importance="magnitude", reconstruct=True), ctx)
    with pytest.raises(FieldError, match="reconstruct_bias"):  # an explicit option of the refit: refused too
        apply_stage("prune", tiny("llama", len(tokenizer)),
                    PruneConfig(channels=0.5, importance="magnitude", reconstruct_bias=True), ctx)


def test_cross_refit_is_the_least_squares_optimum_with_and_without_intercept():
    """What the model target and a latent cut solve: the pruned layer's input x is not a subset of
    the reference's r. fit() is lstsq's optimum; with the intercept, lstsq with a ones column; the
    errors read off the streaming statistics are the direct ones."""
    from dsc.prune.reconstruct import Paired, error, fit

    g = torch.Generator().manual_seed(3)
    r = torch.randn(500, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    r += 2.0  # a mean the intercept can take over
    x = r[:, :12] @ torch.randn(12, 12, generator=g, dtype=torch.float64) + 0.3 * torch.randn(500, 12, generator=g,
                                                                                              dtype=torch.float64)
    w = torch.randn(6, 20, generator=g, dtype=torch.float64)
    y = r @ w.T
    for centred in (False, True):
        st = Paired(w)
        for part in range(5):  # streamed in batches
            st.add(x[part * 100:(part + 1) * 100], r[part * 100:(part + 1) * 100])
        a, c, energy, mx, mr = st.means(centred)
        new = fit(w, a, c, damp=0.0)
        design = torch.cat([x, torch.ones(500, 1, dtype=x.dtype)], 1) if centred else x
        best = torch.linalg.lstsq(design, y).solution.T
        torch.testing.assert_close(new, best[:, :12], rtol=1e-5, atol=1e-6)
        pred = x @ new.T
        if centred:
            b = w.double() @ mr - new @ mx
            torch.testing.assert_close(b, best[:, 12], rtol=1e-5, atol=1e-6)
            pred = pred + b
        direct = ((y - pred).pow(2).sum() / y.pow(2).sum()).item()
        total = st.means(False)[2] if centred else None
        assert error(w, new, a, c, energy, total) == pytest.approx(direct, rel=1e-4)


def test_subset_statistics_equal_the_paired_ones():
    """Where the cut only removes columns (x = r[:, K]) the refit reads A and C off rᵀr alone: the
    same statistics, centred or not, as pairing x with r."""
    from dsc.prune.reconstruct import Paired

    g = torch.Generator().manual_seed(4)
    r = torch.randn(300, 16, generator=g, dtype=torch.float64) + 1.5
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    keep = [1, 2, 5, 8, 9, 13]
    sub, pair = Paired(w, keep), Paired(w)
    for part in r.split(100):
        sub.add(None, part)
        pair.add(part[:, keep], part)
    for centred in (False, True):
        for a, b in zip(sub.means(centred), pair.means(centred)):
            torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-10, atol=1e-10)


def test_latent_ranks_are_refit_and_reload(tokenizer, ctx, tmp_path):
    """MLA latent cut: q_b and kv_b read the narrower normalised latent; their refit (the cross
    statistics: the kept ranks change when the norm sees fewer channels) lowers their error."""
    out = apply_stage("prune", make_moe("deepseek_v3", len(tokenizer)),
                      PruneConfig(latent=0.5, heads=0.5, importance="activation"), ctx)
    assert_reloads(out, len(tokenizer), tmp_path)
    rec = out.metrics["plan"]["reconstruction"]
    assert {"q_b_proj", "kv_b_proj", "o_proj"} <= set(rec)
    assert all(e["error_refit"] < e["error_cut"] for e in rec.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_depth_refit_reloads(family, tokenizer, ctx, tmp_path):
    """reconstruct_depth (a second stream, the unpruned model's: the layer after a removed one refits
    its q/k/v and gate/up to read what the unpruned layer read) keeps the save → reload guarantee."""
    cfg = PruneConfig(heads=0.5, channels=0.25, layers=0.25, targets=[r"layers\.1$"], reconstruct_depth=True)
    out = apply_stage("prune", tiny(family, len(tokenizer)), cfg, ctx)
    assert_reloads(out, len(tokenizer), tmp_path)
    assert out.metrics["plan"]["drop_layers"] == [1]
    rec = out.metrics["plan"]["reconstruction"]
    assert set(rec) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"}
    for errors in rec.values():
        assert errors["error_refit"] <= errors["error_cut"] + 1e-9


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bias_compensation_sets_the_flags_and_reloads(family, tokenizer, ctx, tmp_path):
    """reconstruct_bias: o_proj / down_proj get the intercept; the config flags say so and every
    other linear they cover gets a zero bias, so from_pretrained rebuilds the same model."""
    vocab = len(tokenizer)
    out = apply_stage("prune", tiny(family, vocab), PruneConfig(heads=0.5, channels=0.5, reconstruct_bias=True), ctx)
    again = assert_reloads(out, vocab, tmp_path)
    assert again.config.attention_bias is True
    assert getattr(again.config, "mlp_bias", False) is (family == "llama")
    layer = out.model.model.layers[0]
    assert layer.self_attn.o_proj.bias.abs().sum() > 0 and layer.self_attn.q_proj.bias.abs().sum() == 0
    assert all(e["error_refit"] < e["error_cut"] for e in out.metrics["plan"]["reconstruction"].values())


def test_bias_compensation_refused_where_the_config_cannot_carry_it(tokenizer, ctx):
    from dsc.errors import FieldError

    with pytest.raises(FieldError, match="reconstruct_bias"):
        apply_stage("prune", tiny("qwen2", len(tokenizer)), PruneConfig(channels=0.5, reconstruct_bias=True), ctx)
    with pytest.raises(FieldError, match="reconstruct_bias"):  # Qwen3: attention only
        apply_stage("prune", tiny("qwen3", len(tokenizer)), PruneConfig(channels=0.5, reconstruct_bias=True), ctx)
    with pytest.raises(ValueError, match="reconstruct_bias .*reconstruct: false"):
        PruneConfig(channels=0.5, reconstruct=False, reconstruct_bias=True)
    with pytest.raises(ValueError, match="reconstruct_depth .*no layers"):
        PruneConfig(channels=0.5, reconstruct_depth=True)


def test_refit_killed_mid_model_resumes_after_the_last_layer(tokenizer, ctx, tmp_path, monkeypatch):
    """A crash while refitting the third kept layer keeps the first two (and the plan, and with
    depth the unpruned stream); the rerun refits only what is left and ends exactly where an
    uninterrupted run does."""
    import dsc.prune.reconstruct as rec

    cfg = PruneConfig(heads=0.5, channels=0.5, layers=0.25, targets=[r"layers\.1$"], reconstruct_depth=True)
    reference = apply_stage("prune", tiny("llama", len(tokenizer)), cfg, ctx)
    ctx.work_dir = tmp_path / "work"
    real, calls = rec._mlp, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "_mlp", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        apply_stage("prune", tiny("llama", len(tokenizer)), cfg, ctx)
    assert (ctx.work_dir / "plan.pt").is_file()
    calls.clear()
    out = apply_stage("prune", tiny("llama", len(tokenizer)), cfg, ctx)
    assert len(calls) == 1  # the last layer (layer 1 is removed)
    assert out.metrics["plan"] == reference.metrics["plan"]  # every layer's errors, restored or not
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out.model(ids).logits, reference.model(ids).logits, atol=0, rtol=0)


def _ppl_by(model_dir, cuts: dict[str, dict]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    ctx, stream = _stories(model_dir)
    ppl = {}
    for name, cfg in cuts.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        out = apply_stage("prune", model, PruneConfig(num_samples=48, **cfg), ctx).model
        ppl[name] = perplexity(out, stream, 128, 128)["perplexity"]
    print(ppl)
    return ppl


def test_latent_refit_quality_floor_on_deepseek_v3(tiny_dsv3_dir):
    """tiny-deepseek-v3, half of q_lora_rank and kv_lora_rank removed, no training, held-out samples:
    refitting q_b / kv_b at most 0.7× the plain cut's perplexity (measured 12.95 → 7.41; teacher 5.76)."""
    ppl = _ppl_by(tiny_dsv3_dir, {"plain": dict(latent=0.5, reconstruct=False), "refit": dict(latent=0.5)})
    assert ppl["refit"] < 0.7 * ppl["plain"]


def test_depth_refit_quality_floor(stories_dir):
    """stories260K, a third of the layers removed, no training, held-out samples: refitting the next
    layers' input projections at most 0.75× the plain drop's perplexity (measured 58.6 → 33.4;
    teacher 4.40)."""
    ppl = _ppl_by(stories_dir, {"plain": dict(layers=0.34, reconstruct=False),
                                "depth": dict(layers=0.34, reconstruct_depth=True)})
    assert ppl["depth"] < 0.75 * ppl["plain"]


def test_reconstruction_with_nothing_cut_is_the_identity(tokenizer):
    """A plan that keeps every head and channel, refit without a ridge: the least-squares optimum is
    the weight itself, so the model computes what it did."""
    from dsc.prune.plan import Plan
    from dsc.prune.reconstruct import reconstruct
    from dsc.structure import describe

    model = tiny("llama", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    structure = describe(model)
    everything = range(len(structure.layers))
    plan = Plan([], {i: list(range(4)) for i in everything}, {i: list(range(2)) for i in everything},
                {i: list(range(64)) for i in everything}, {}, {})
    reconstruct(model, structure, plan, ids, batch_size=2, damp=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-4)
    assert all(e["error_refit"] < 1e-8 for layer in plan.reconstructed.values() for e in layer.values())
