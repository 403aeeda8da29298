"""Structured pruning without recovery: how much quality each importance keeps at one size.

SmolLM2-135M (the embedded teacher), ~30 % of non-embedding parameters removed, no recovery:
width (heads + MLP channels, one uniform fraction found by the global `ratio`) and, separately,
depth (whole layers). For every importance: perplexity, pruning wall time, peak extra memory of
the pruning step, decode tokens/s of the pruned model; the teacher is re-measured in the same run.
`--peers torch-pruning` adds Torch-Pruning at the same parameter count (bench/peers/torch_pruning_llm.py,
run as a subprocess on the same windows).

    python bench/bench_prune.py                      # defaults below; ≈ 15 min on 2 CPU cores
    python bench/bench_prune.py --windows 8 --importances activation,magnitude

Protocol (printed with the table): WikiText-2 raw validation, non-empty lines joined by blank
lines, first N windows of 1024 tokens, stride 1024, token level; calibration: 64 × 512 tokens
of the C4 validation subset (documents joined by EOS, in file order).
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
from dsc.structure import describe  # noqa: E402


def streams(tok, args):
    wiki = corpora.wikitext(tok, args.windows * args.context)
    return wiki, corpora.c4(tok, args.calib_samples * args.calib_len).view(args.calib_samples, args.calib_len)


def measure(model, wiki, args) -> dict:
    ppl = perplexity(model, wiki, args.context, args.context)
    s = speed(model, model.config.vocab_size, 1, 64, 32, 2)
    return {"perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
            "decode_tok_s": s["decode_tokens_per_s"], **param_counts(model)}


def run_dsc(teacher, tok, cfg: PruneConfig, calib, wiki, args) -> dict:
    model = copy.deepcopy(teacher)
    ctx = Context.create(tok, {}, device="cpu")
    ctx.data.put(_as_data(calib))
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem:
        chosen = plan(model, cfg.model_copy(update={"data": "calib", "split": "all"}), ctx)
        apply_plan(model, describe(model), chosen)
    seconds = time.perf_counter() - t0
    return {**measure(model, wiki, args), "prune_s": seconds, "prune_peak_extra_mb": mem.extra / 1e6,
            "shape": chosen.config}


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
    ap.add_argument("--modes", default="width,depth")
    ap.add_argument("--peers", default="", help="comma list: torch-pruning")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ref = ModelRef(path="default")
    source = resolve(ref, Path.cwd())
    tok, teacher = load_tokenizer(source, ref), load_model(source, ref)
    wiki, calib = streams(tok, args)
    rows = [("teacher", "-", {**measure(teacher, wiki, args), "prune_s": 0.0, "prune_peak_extra_mb": 0.0})]
    for mode in args.modes.split(","):
        kinds = ["heads", "channels"] if mode == "width" else ["layers"]
        for imp in args.importances.split(","):
            if mode == "depth" and imp not in ("activation", "random"):
                continue  # depth has its own importance: block influence (listed as 'block') or random
            cfg = PruneConfig(ratio=args.ratio, kinds=kinds, importance=imp if mode == "width" else "magnitude",
                              layer_importance="block" if imp == "activation" else "random",
                              num_samples=args.calib_samples, batch_size=4)
            label = imp if mode == "width" else ("block" if imp == "activation" else "random")
            rows.append((f"dsc {label}", mode, run_dsc(teacher, tok, cfg, calib, wiki, args)))
            print(rows[-1], file=sys.stderr, flush=True)
        for name in filter(None, args.peers.split(",")):
            target = next(r[2]["params_non_embedding"] for r in rows if r[1] == mode)
            result = peer(name, target, ",".join(kinds), args)
            if result:
                rows.append((f"{name} {result.pop('label', '')}".strip(), mode, result))
    _print(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


def _print(rows, args) -> None:
    t = rows[0][2]
    print(f"SmolLM2-135M-Instruct fp32 | WikiText-2 valid, {t['tokens_scored']} tokens in {args.windows} × {args.context} "
          f"windows | calibration C4 {args.calib_samples} × {args.calib_len} | {torch.get_num_threads()} threads")
    print(f"{'method':24} {'mode':6} {'non-emb params':>14} {'removed':>8} {'perplexity':>11} {'prune s':>8} "
          f"{'peak+ MB':>9} {'decode tok/s':>12}")
    for name, mode, r in rows:
        removed = 1 - r["params_non_embedding"] / t["params_non_embedding"]
        print(f"{name:24} {mode:6} {r['params_non_embedding']:14,} {removed:8.1%} {r['perplexity']:11.2f} "
              f"{r['prune_s']:8.1f} {r['prune_peak_extra_mb']:9.0f} {r['decode_tok_s']:12.1f}")


if __name__ == "__main__":
    main()
