"""Torch-Pruning 1.6.1 on SmolLM2-135M: the peer of dsc's width pruning in bench/bench_prune.py.

Called by bench_prune.py's `peer()` as a subprocess; the last stdout line is one JSON object.

    python bench/peers/torch_pruning_llm.py --target-non-embedding N --kinds heads,channels \
        --windows W --context C --calib-samples S --calib-len L [--importance taylor|l2]

Method (after Torch-Pruning's examples/LLMs/prune_llm.py): MetaPruner, local (per-layer) ranking,
`num_heads` on q/k/v, `prune_num_heads=True` (`--kinds channels`: attention ignored, MLP only), `prune_head_dims=False` (RoPE stays intact),
head ratio = channel ratio, `round_to=4`, lm_head and the embedding ignored (so the hidden size
is not cut: dsc's heads+channels does not cut it either), config patched by hand afterwards.
Importance: first-order Taylor (`GroupTaylorImportance`, |w * dL/dw| from the LM loss summed over
the calibration blocks) or `--importance l2` (`MagnitudeImportance(p=2)`).
One ratio drives heads and MLP channels; it is chosen (before timing) so that the non-embedding
parameter count lands nearest the target. With GQA Torch-Pruning removes query heads only, the
same number inside every KV group (K/V projections are kept), so a 9 q / 3 kv model goes to 6 or 3
query heads.

Timing (`prune_s`) and `prune_peak_extra_mb` cover graph tracing, the gradient pass (Taylor), the
importance and the cuts, inside `dsc.evaluation.PeakMemory` as bench_prune.run_dsc does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_prune import measure, streams  # noqa: E402
from dsc.evaluation import PeakMemory, param_counts  # noqa: E402
from dsc.models import ModelRef, load_model, load_tokenizer, resolve  # noqa: E402

ROUND_TO = 4
BATCH = 4  # calibration blocks per forward/backward (dsc's taylor uses batch_size=4 in bench_prune)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def predict_non_embedding(cfg, base: int, ratio: float, heads_too: bool = True) -> tuple[int, int, int]:
    """Non-embedding parameters Torch-Pruning's local MetaPruner leaves at `ratio`, mirroring
    its rules (base_pruner._prune): MLP keeps int(I * (1 - r)) rounded down to round_to; with GQA
    it removes ceil(ceil(r * H) / KV) query heads in each KV group (q_proj rows, o_proj columns)."""
    H, KV, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg), cfg.hidden_size
    inter, L = cfg.intermediate_size, cfg.num_hidden_layers
    keep_ch = int(inter * (1 - ratio))
    keep_ch -= keep_ch % ROUND_TO
    if ratio <= 0 or not heads_too:
        heads = H
    elif KV == H:
        heads = H - math.ceil(ratio * H)
    else:
        heads = H - KV * math.ceil(math.ceil(ratio * H) / KV)
    bias_q = hd if getattr(cfg, "attention_bias", False) else 0
    bias_mlp = 2 if getattr(cfg, "mlp_bias", False) else 0  # gate/up biases per channel
    per_head = 2 * hd * d + bias_q
    per_ch = 3 * d + bias_mlp
    return base - L * ((H - heads) * per_head + (inter - keep_ch) * per_ch), heads, keep_ch


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def choose_ratio(cfg, base: int, target: int, heads_too: bool = True) -> float:
    """The ratio in (0, 0.95] whose predicted count is nearest the target (ties: the smaller ratio)."""
    best = None
    for i in range(1, 9501):
        r = i / 10000
        n, heads, ch = predict_non_embedding(cfg, base, r, heads_too)
        if heads < 1 or ch < ROUND_TO:
            break
        key = abs(n - target)
        if best is None or key < best[0]:
            best = (key, r)
    return best[1]


def calibration_grads(model, calib: torch.Tensor) -> float:
    """Accumulate dL/dw over the calibration blocks (mean token loss per batch); returns mean loss."""
    emb = model.get_input_embeddings().weight
    emb_req = emb.requires_grad
    emb.requires_grad_(False)  # ignored by the pruner: no need for its (tied) gradient
    model.zero_grad(set_to_none=True)
    total, batches = 0.0, 0
    for i in range(0, calib.shape[0], BATCH):
        ids = calib[i:i + BATCH]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        total += loss.item()
        batches += 1
        del logits, loss
    emb.requires_grad_(emb_req)
    return total / max(batches, 1)


def prune(model, calib: torch.Tensor, ratio: float, importance: str, example: torch.Tensor,
          heads_too: bool = True) -> dict:
    import torch_pruning as tp

    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = _head_dim(cfg)
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = H
            num_heads[m.k_proj] = KV
            num_heads[m.v_proj] = KV
    imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
           else tp.importance.MagnitudeImportance(p=2))
    ignored = [model.lm_head, model.get_input_embeddings()]
    if not heads_too:  # MLP channels only: attention is left whole
        ignored += [lin for name, m in model.named_modules() if name.endswith("self_attn")
                    for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj)]
        num_heads = {}
    # The dependency trace fails under SDPA (peers.md): trace with eager attention.
    model.config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            importance=imp,
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=heads_too,
            prune_head_dims=False,  # whole heads only: RoPE dims stay intact
            head_pruning_ratio=ratio,
            round_to=ROUND_TO,
            forward_fn=lambda m, x: m(x, use_cache=False).logits,
        )
    model.config._attn_implementation = "sdpa"
    loss = None
    if importance == "taylor":
        loss = calibration_grads(model, calib)
    with torch.no_grad():
        for group in pruner.step(interactive=True):
            group.prune()
    model.zero_grad(set_to_none=True)
    del pruner

    # Make the modules and the config true (Torch-Pruning only cuts tensors).
    heads_seen, inter_seen = set(), set()
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            assert m.k_proj.out_features == KV * hd, "Torch-Pruning cut K/V heads"
            heads = m.q_proj.out_features // hd
            assert heads * hd == m.q_proj.out_features == m.o_proj.in_features
            m.num_key_value_groups = heads // KV
            heads_seen.add(heads)
        elif name.endswith("mlp") and hasattr(m, "gate_proj"):
            assert m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features
            inter_seen.add(m.gate_proj.out_features)
    if len(heads_seen) != 1 or len(inter_seen) != 1:
        raise RuntimeError(f"non-uniform shapes after pruning: heads {heads_seen}, mlp {inter_seen}")
    cfg.num_attention_heads = heads_seen.pop()
    cfg.num_key_value_heads = KV
    cfg.head_dim = hd
    cfg.intermediate_size = inter_seen.pop()
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise RuntimeError(f"GQA broken: {cfg.num_attention_heads} heads over {KV} KV heads")
    assert model.lm_head.in_features == cfg.hidden_size, "hidden size was cut"
    return {"calib_loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-non-embedding", type=int, required=True)
    ap.add_argument("--kinds", default="heads,channels")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--importance", choices=["taylor", "l2"], default="taylor")
    args = ap.parse_args()

    kinds = set(filter(None, args.kinds.split(",")))
    if "layers" in kinds:
        log("torch-pruning: Torch-Pruning has no depth (whole-layer) pruning; no row for --kinds layers")
        sys.exit(3)
    if kinds not in ({"heads", "channels"}, {"channels"}):
        log(f"torch-pruning: only --kinds heads,channels or channels is supported (got {args.kinds})")
        sys.exit(2)
    heads_too = "heads" in kinds

    ref = ModelRef(path="default")
    source = resolve(ref, Path.cwd())
    tok, model = load_tokenizer(source, ref), load_model(source, ref)
    wiki, calib = streams(tok, args)
    if model.config.model_type not in ("llama",):
        log(f"torch-pruning: note: written for Llama-style models, got {model.config.model_type}")

    base = param_counts(model)["params_non_embedding"]
    ratio = choose_ratio(model.config, base, args.target_non_embedding, heads_too)
    predicted, _, _ = predict_non_embedding(model.config, base, ratio, heads_too)
    log(f"torch-pruning: ratio {ratio:.4f} -> predicted {predicted:,} non-embedding params "
        f"(target {args.target_non_embedding:,}, teacher {base:,})")
    example = calib[:1, :16].clone()
    heads0 = model.config.num_attention_heads

    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        info = prune(model, calib, ratio, args.importance, example, heads_too)
    seconds = time.perf_counter() - t0
    model.eval()

    counts = param_counts(model)
    if counts["params_non_embedding"] != predicted:
        log(f"torch-pruning: warning: got {counts['params_non_embedding']:,}, predicted {predicted:,}")
    off = counts["params_non_embedding"] / args.target_non_embedding - 1
    if abs(off) > 0.01:
        log(f"torch-pruning: warning: {off:+.2%} from the target (head granularity)")

    cfg = model.config
    shape = {"num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
             "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size}
    log(f"torch-pruning: {shape}, {seconds:.1f} s, calibration loss {info['calib_loss']}")

    with torch.no_grad():
        result = measure(model, wiki, args)
    heads_cut = cfg.num_attention_heads < heads0
    label = f"{args.importance} (heads+mlp)" if heads_cut else f"{args.importance} (mlp only)"
    out = {"label": label, **result, "prune_s": seconds, "prune_peak_extra_mb": mem.extra / 1e6,
           "shape": shape, "ratio": ratio}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
