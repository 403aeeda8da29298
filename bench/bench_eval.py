"""Evaluation adds no overhead and no error: dsc's perplexity vs a plain transformers loop.

On the same model and windows, measure
  (1) dsc.evaluation.perplexity  — what `dsc eval` and the `evaluate` stage run;
  (2) the reference loop of the transformers perplexity guide: model(ids, labels=...).loss
      × scored tokens, one window at a time;
  (3) a bare forward loop (logits only, no loss), the floor for any evaluator.
Runs interleave (1)/(2)/(3) `--rounds` times and report medians, so machine noise hits all
alike. Prints a table; `--json` writes the numbers.

    python bench/bench_eval.py                       # SmolLM2-135M, WikiText-2 valid, 8 × 1024
    python bench/bench_eval.py --model ../shared/models/stories260K --context 256 --windows 32
"""
from __future__ import annotations

import argparse
import json
import os
import math
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF dequantization bars would bury the table

from dsc.data.pipeline import tokenize_documents
from dsc.evaluation import perplexity, windows
from dsc.models import ModelRef, load_model, load_tokenizer, resolve

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def reference(model, stream, wins):
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, n_new in wins:
            ids = stream[begin:end][None]
            labels = ids.clone()
            labels[:, : end - begin - n_new] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return math.exp(nll / count), count


def bare_forward(model, stream, wins):
    with torch.inference_mode():
        for begin, end, _ in wins:
            model(input_ids=stream[begin:end][None], use_cache=False)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(WIKI))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    stride = args.stride or args.context
    ref = ModelRef(path=args.model)
    source = resolve(ref, Path.cwd(), field="--model")
    tok, model = load_tokenizer(source, ref), load_model(source, ref)
    text = Path(args.data).read_text(encoding="utf-8")
    text = "\n\n".join(line for line in text.splitlines() if line.strip())
    stream = tokenize_documents([text], tok, None)
    wins = windows(len(stream), args.context, stride)[: args.windows]
    tokens = sum(e - b for b, e, _ in wins)
    t_dsc, t_ref, t_bare = [], [], []
    for _ in range(args.rounds):
        ours, dt = timed(lambda: perplexity(model, stream, args.context, stride, 1, args.windows))
        t_dsc.append(dt)
        (ppl_ref, count), dt = timed(lambda: reference(model, stream, wins))
        t_ref.append(dt)
        t_bare.append(timed(lambda: bare_forward(model, stream, wins))[1])
    rel = abs(ours["perplexity"] / ppl_ref - 1)
    rows = [("dsc perplexity()", ours["perplexity"], statistics.median(t_dsc)),
            ("transformers loss loop", ppl_ref, statistics.median(t_ref)),
            ("bare forward (no loss)", float("nan"), statistics.median(t_bare))]
    print(f"model {args.model} | data {Path(args.data).name} (non-empty lines joined by blank lines) | "
          f"context {args.context} stride {stride} | {len(wins)} windows, {ours['tokens_scored']} tokens scored | "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'evaluator':26} {'perplexity':>12} {'seconds':>9} {'tokens/s':>10} {'vs bare':>8}")
    for name, ppl, sec in rows:
        print(f"{name:26} {ppl:12.6f} {sec:9.2f} {tokens / sec:10.1f} {rows[2][2] / sec:8.3f}")
    print(f"relative perplexity difference dsc vs transformers: {rel:.2e} (target <= 1e-4); "
          f"scored tokens equal: {ours['tokens_scored'] == count}; "
          f"dsc tokens/s / transformers loop: {rows[1][2] / rows[0][2]:.3f} (target >= 0.90)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rel_diff": rel, "tokens": tokens}, indent=2))


if __name__ == "__main__":
    main()
