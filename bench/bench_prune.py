"""Structured pruning without recovery: how much quality each importance keeps at one size.

SmolLM2-135M (the embedded teacher), ~30 % of non-embedding parameters removed, no recovery:
width (heads + MLP channels, one uniform fraction found by the global `ratio`), MLP channels only,
and depth (whole layers). Width and MLP rows run without and with `reconstruct` (least-squares
refit of o_proj / down_proj after the cut). For every row: perplexity on two held-out splits,
pruning wall time, peak extra memory of the pruning step, decode tokens/s of the pruned model;
the teacher is re-measured in the same run.
`--peers torch-pruning` adds Torch-Pruning at the same parameter count (bench/peers/torch_pruning_llm.py,
run as a subprocess on the same windows).

    python bench/bench_prune.py                      # defaults below; ≈ 15 min on 2 CPU cores
    python bench/bench_prune.py --windows 8 --importances activation,magnitude
    python bench/bench_prune.py --windows 8 --modes width,mlp --importances activation,taylor,obs --peers torch-pruning

Protocol (printed with the table): WikiText-2 raw validation, non-empty lines joined by blank
lines, and the C4 validation subset's tokens right after the calibration ones (documents joined
by EOS, in file order): first N windows of 1024 tokens each, stride 1024, token level;
calibration: the first 64 × 512 tokens of that C4 stream.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import corpora  # noqa: E402  (bench/corpora.py: this folder is on sys.path when a benchmark runs)
from dsc import Context  # noqa: E402
from dsc.evaluation import PeakMemory, param_counts, perplexity, speed  # noqa: E402
from dsc.models import ModelRef, load_model, load_tokenizer, resolve  # noqa: E402
from dsc.prune import PruneConfig, apply_plan, plan  # noqa: E402
from dsc.prune.reconstruct import reconstruct  # noqa: E402
from dsc.prune.stage import bias_targets  # noqa: E402
from dsc.structure import describe  # noqa: E402


SPLITS = ("wikitext2-valid", "c4-heldout")


def streams(tok, args):
    """The evaluation splits (WikiText-2 valid; the C4 tokens right after the calibration ones,
    which calibration never sees) and the calibration blocks."""
    n_cal, n_eval = args.calib_samples * args.calib_len, args.windows * args.context
    c4 = corpora.c4(tok, n_cal + n_eval)
    evals = {"wikitext2-valid": corpora.wikitext(tok, n_eval), "c4-heldout": c4[n_cal:n_cal + n_eval]}
    return evals, c4[:n_cal].view(args.calib_samples, args.calib_len).clone()


def land(rows: list, row: tuple, args) -> None:
    """Keep `row`, print it and rewrite --json: a killed run keeps every row it measured."""
    rows.append(row)
    print(row, file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


def measure(model, evals, args) -> dict:
    ppl = {name: perplexity(model, stream, args.context, args.context) for name, stream in evals.items()}
    s = speed(model, model.config.vocab_size, 1, 64, 32, 2)
    return {"perplexity": ppl[SPLITS[0]]["perplexity"], **{name: p["perplexity"] for name, p in ppl.items()},
            "tokens_scored": ppl[SPLITS[0]]["tokens_scored"], "decode_tok_s": s["decode_tokens_per_s"],
            **param_counts(model)}


def run_dsc(teacher, tok, cfg: PruneConfig, calib, wiki, args, target: str = "layer") -> dict:
    model = copy.deepcopy(teacher)
    ctx = Context.create(tok, {}, device="cpu")
    ctx.data.put(_as_data(calib))
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        chosen = plan(model, cfg.model_copy(update={"data": "calib", "split": "all"}), ctx)
        if cfg.reconstruct:
            structure = describe(model)
            reconstruct(model, structure, chosen, calib, cfg.batch_size, cfg.reconstruct_damp, target=target,
                        depth=cfg.reconstruct_depth, bias=bias_targets(cfg, structure, chosen))
        else:
            apply_plan(model, describe(model), chosen)
    seconds = time.perf_counter() - t0
    return {**measure(model, wiki, args), "prune_s": seconds, "prune_peak_extra_mb": mem.extra / 1e6,
            "shape": chosen.config, "reconstruction": chosen.summary().get("reconstruction")}


def _as_data(blocks: torch.Tensor):
    from dsc.data.pipeline import TokenData

    return TokenData("calib", blocks.reshape(-1), blocks.shape[1], {}, "")


def peer(name: str, target_params: int, kinds: str, args) -> dict | None:
    script = Path(__file__).parent / "peers" / f"{name.replace('-', '_')}_llm.py"
    cmd = [sys.executable, str(script), "--target-non-embedding", str(target_params), "--kinds", kinds,
           "--windows", str(args.windows), "--context", str(args.context),
           "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(f"[{name} failed]\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--importances", default="activation,taylor,magnitude,random")
    ap.add_argument("--modes", default="width,mlp,depth", help="width: heads + MLP channels; mlp: channels only; "
                                                              "depth: whole layers")
    ap.add_argument("--reconstruct", default="off,on", help="width/mlp rows without and/or with `reconstruct`")
    ap.add_argument("--targets", default="layer", help="reconstruct rows for each refit target: layer, model (the "
                                                       "unpruned model's stream: measured worse, docs/benchmarks.md)")
    ap.add_argument("--bias", default="off", help="reconstruct rows without and/or with reconstruct_bias")
    ap.add_argument("--depth-refit", default="off", help="depth rows without and/or with reconstruct_depth "
                                                         "(one row per --targets)")
    ap.add_argument("--damp", default="0.01", help="comma list of reconstruct_damp values (one row each)")
    ap.add_argument("--peers", default="", help="comma list: torch-pruning")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ref = ModelRef(path="default")
    source = resolve(ref, Path.cwd())
    tok, teacher = load_tokenizer(source, ref), load_model(source, ref)
    wiki, calib = streams(tok, args)
    rows = []
    land(rows, ("teacher", "-", {**measure(teacher, wiki, args), "prune_s": 0.0, "prune_peak_extra_mb": 0.0}), args)
    for mode in args.modes.split(","):
        kinds = {"width": ["heads", "channels"], "mlp": ["channels"], "depth": ["layers"]}[mode]
        for imp in args.importances.split(","):
            if mode == "depth" and imp not in ("activation", "random"):
                continue  # depth has its own importance: block influence (listed as 'block') or random
            for label, extra in variants(mode, args):
                target = extra.pop("target", "layer")
                cfg = PruneConfig(ratio=args.ratio, kinds=kinds, importance=imp if mode != "depth" else "magnitude",
                                  layer_importance="block" if imp == "activation" else "random",
                                  num_samples=args.calib_samples, batch_size=4, **extra)
                name = (imp if mode != "depth" else ("block" if imp == "activation" else "random")) + label
                land(rows, (f"dsc {name}", mode, run_dsc(teacher, tok, cfg, calib, wiki, args, target)), args)
        for name in filter(None, args.peers.split(",")):
            target = next(r[2]["params_non_embedding"] for r in rows if r[1] == mode)
            result = peer(name, target, ",".join(kinds), args)
            if result:
                land(rows, (f"{name} {result.pop('label', '')}".strip(), mode, result), args)
    _print(rows, args)


def variants(mode: str, args) -> list[tuple[str, dict]]:
    """(label suffix, PruneConfig fields) of each row of one importance: the plain cut and the refits."""
    if mode == "depth":
        out = [("", {"reconstruct": False})] if "off" in args.depth_refit.split(",") else []
        if "on" in args.depth_refit.split(","):
            out += [(" + depth refit" + (f" ({t})" if t != "layer" else ""),
                     {"reconstruct": True, "reconstruct_depth": True, "target": t})
                    for t in args.targets.split(",")]
        return out
    out = [("", {"reconstruct": False})] if "off" in args.reconstruct.split(",") else []
    if "on" in args.reconstruct.split(","):
        for t in args.targets.split(","):
            for b in args.bias.split(","):
                for d in args.damp.split(","):
                    label = " + reconstruct" + (f" ({t})" if t != "layer" else "") + (" + bias" if b == "on" else "")
                    label += f" (damp {d})" if float(d) != 0.01 else ""
                    out.append((label, {"reconstruct": True, "target": t, "reconstruct_bias": b == "on",
                                        "reconstruct_damp": float(d)}))
    return out


def _print(rows, args) -> None:
    t = rows[0][2]
    print(f"SmolLM2-135M-Instruct fp32 | WikiText-2 valid, {t['tokens_scored']} tokens in {args.windows} × {args.context} "
          f"windows | calibration C4 {args.calib_samples} × {args.calib_len} | {torch.get_num_threads()} threads")
    print(f"C4 held-out: the {args.windows * args.context} C4 tokens after the calibration ones")
    print(f"| method | mode | non-emb params | removed | WikiText-2 | C4 held-out | prune s | peak+ MB | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mode, r in rows:
        removed = 1 - r["params_non_embedding"] / t["params_non_embedding"]
        c4 = f"{r['c4-heldout']:,.2f}" if "c4-heldout" in r else "–"
        print(f"| {name} | {mode} | {r['params_non_embedding']:,} | {removed:.1%} | {r['perplexity']:,.2f} | {c4} | "
              f"{r['prune_s']:.1f} | {r['prune_peak_extra_mb']:.0f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
