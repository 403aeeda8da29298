"""Recovery after pruning: how much of the teacher–pruned gap each method wins back at one budget,
and what the shared training loop costs against a plain PyTorch loop doing the same work.

SmolLM2-135M (the embedded teacher) pruned by ~30 % of non-embedding parameters (heads + MLP
channels, activation importance, as bench/bench_prune.py), then recovered on C4 with the same
token budget by: (a) nothing, (b) LM-loss fine-tuning, (c) logit KD, (d) logit + feature KD,
(e) LoRA + logit KD (merged). Perplexity on WikiText-2 next to the teacher's, measured in the
same run, and the fraction of the gap recovered, on log-perplexity:
(ln ppl_pruned − ln ppl_method) / (ln ppl_pruned − ln ppl_teacher).

Throughput: the dsc loop (KD: student forward + backward, teacher forward, AdamW) against a
plain PyTorch loop with the same model, batch, loss and optimizer, timed alternately in one
process (tokens/s, median of `--rounds`).

    python bench/bench_distill.py                       # defaults below; ≈ 45 min on 2 CPU cores
    python bench/bench_distill.py --tokens 8192 --windows 2 --variants none,kd   # a smoke run

Protocol (printed with the table): WikiText-2 raw validation, non-empty lines joined by blank
lines, first N windows of 1024 tokens, stride 1024, token level — text of another domain than
the training data. Calibration: the first 64 × 512 tokens of the C4 validation subset; training:
the next `--tokens` tokens in blocks of `--seq-len` (documents joined by EOS, file order,
shuffled by seed 0), no token seen twice; C4 held-out: the `--eval-blocks` blocks after those,
windows of `--seq-len`, token level (the same domain as the training data).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import corpora  # noqa: E402  (bench/corpora.py: this folder is on sys.path when a benchmark runs)
from dsc import Context  # noqa: E402
from dsc.data.pipeline import TokenData  # noqa: E402
from dsc.distill import DistillConfig, LoraConfig, apply, apply_lora  # noqa: E402
from dsc.evaluation import param_counts, perplexity  # noqa: E402
from dsc.models import ModelRef, load_model, load_tokenizer, resolve  # noqa: E402
from dsc.prune import PruneConfig, apply as prune  # noqa: E402

def streams(tok, args):
    """WikiText-2 windows; C4: calibration blocks, then training blocks, then held-out blocks."""
    import numpy as np

    wiki = corpora.wikitext(tok, args.windows * args.context)
    calib_n = 64 * 512
    c4 = corpora.c4(tok, calib_n + args.tokens + args.eval_blocks * args.seq_len)
    calib = TokenData("calib", c4[:calib_n], 512, {}, "calib")
    rest = c4[calib_n:]
    n_train, n = args.tokens // args.seq_len, len(rest) // args.seq_len
    splits = {"train": np.arange(n_train), "eval": np.arange(n_train, n)}
    return wiki, calib, TokenData("c4", rest[: n * args.seq_len], args.seq_len, splits, "c4-train")


def variants(args) -> dict:
    common = dict(data="c4", tokens=args.tokens, batch_size=args.batch, seq_len=args.seq_len, eval_batches=1,
                  save_every=0, log_every=10, precision=args.precision)
    return {
        "lm": lambda: DistillConfig(**common, lr=args.lr, kl=0.0, ce=1.0),
        "kd": lambda: DistillConfig(**common, lr=args.lr, kl=1.0),
        "kd+feat": lambda: DistillConfig(**common, lr=args.lr, kl=1.0, features=1.0, feature_loss="cosine"),
        "lora+kd": lambda: LoraConfig(**common, lr=args.lora_lr, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                                      kl=1.0),
    }


def plain_loop_step(student, teacher, opt, ids) -> None:
    """What a user would write by hand: the same work as the dsc KD step."""
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False).logits
    s = student(input_ids=ids, use_cache=False).logits
    loss = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                    reduction="none").sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def throughput(pruned, teacher, tok, data, args) -> dict:
    """dsc loop vs plain loop, alternating, `args.rounds` rounds of `args.tp_steps` steps each (both
    timings include the first step)."""
    dsc_tps, plain_tps = [], []
    blocks = data.blocks("train")
    tokens = args.tp_steps * args.batch * args.seq_len
    for _ in range(args.rounds):
        ctx = Context.create(tok, {}, teacher=teacher, device=args.device)
        ctx.data.put(data)
        cfg = DistillConfig(data="c4", steps=args.tp_steps, batch_size=args.batch, seq_len=args.seq_len,
                            eval_split="none", save_every=0, log_every=10 ** 6, precision=args.precision)
        dsc_tps.append(apply(copy.deepcopy(pruned), cfg, ctx).metrics["tokens_per_s"])
        student = copy.deepcopy(pruned).train().requires_grad_(True)  # every weight trains, as in dsc
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        for s in range(args.tp_steps):
            plain_loop_step(student, teacher, opt, blocks[s * args.batch:(s + 1) * args.batch])
        plain_tps.append(tokens / (time.perf_counter() - t0))
    return {"dsc_tokens_per_s": statistics.median(dsc_tps), "plain_tokens_per_s": statistics.median(plain_tps),
            "rounds": args.rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=49_152, help="training tokens per method")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--eval-blocks", type=int, default=16, help="held-out C4 blocks after the training tokens")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--variants", default="none,lm,kd,kd+feat,lora+kd")
    ap.add_argument("--tp-steps", type=int, default=4, help="steps per throughput round (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ref = ModelRef(path="default")
    source = resolve(ref, Path.cwd())
    tok, teacher = load_tokenizer(source, ref), load_model(source, ref).eval()
    ctx = Context.create(tok, {}, teacher=teacher, device=args.device)
    teacher.to(ctx.device)
    wiki, calib, data = streams(tok, args)
    ctx.data.put(calib)
    ctx.data.put(data)
    held = data.stream("eval")

    def ppl(model) -> dict:  # WikiText-2 (another domain than the training text) and held-out C4
        return {"perplexity": perplexity(model, wiki, args.context, args.context)["perplexity"],
                "c4_perplexity": perplexity(model, held, args.seq_len, args.seq_len)["perplexity"]}

    rows = {"teacher": {**ppl(teacher), "seconds": 0.0, **param_counts(teacher)}}
    pruned = prune(copy.deepcopy(teacher), PruneConfig(ratio=args.ratio, kinds=["heads", "channels"], data="calib",
                                                       split="all", num_samples=64), ctx).model
    table = variants(args)
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        if name == "none":
            model, metrics = pruned, {}
        else:
            cfg = table[name]()
            stage = apply_lora if isinstance(cfg, LoraConfig) else apply
            out = stage(copy.deepcopy(pruned), cfg, ctx)
            model, metrics = out.model, out.metrics
        rows[name] = {**ppl(model), "seconds": time.perf_counter() - t0, **param_counts(model),
                      "tokens": metrics.get("tokens", 0), "tokens_per_s": metrics.get("tokens_per_s"),
                      "held_out": metrics.get("eval"), "trainable_params": metrics.get("trainable_params")}
        print(name, rows[name], file=sys.stderr, flush=True)
    tp = throughput(pruned, teacher, tok, data, args) if args.tp_steps else None
    _print(rows, tp, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "throughput": tp, "args": vars(args)}, indent=2))


def _print(rows, tp, args) -> None:
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M-Instruct, −{args.ratio:.0%} (heads + channels, activation) | WikiText-2 valid, "
          f"{args.windows} × {args.context} windows, stride {args.context}, token level; C4 held-out: "
          f"{args.eval_blocks} × {args.seq_len} | training: C4, "
          f"{args.tokens:,} tokens per method, {args.batch} × {args.seq_len} per step | {device}")
    print(f"{'method':10} {'non-emb params':>14} {'wiki ppl':>9} {'gap recovered':>14} {'C4 ppl':>8} "
          f"{'gap recovered':>14} {'train tok/s':>12} {'wall s':>8}")
    for name, r in rows.items():
        tps = f"{r['tokens_per_s']:12.1f}" if r.get("tokens_per_s") else f"{'':12}"
        print(f"{name:10} {r['params_non_embedding']:14,} {r['perplexity']:9.2f} {_gap(rows, name, 'perplexity')} "
              f"{r['c4_perplexity']:8.2f} {_gap(rows, name, 'c4_perplexity')} {tps} {r['seconds']:8.1f}")
    if tp:
        print(f"throughput (KD step, {args.batch} × {args.seq_len}, median of {tp['rounds']}): dsc loop "
              f"{tp['dsc_tokens_per_s']:.1f} tok/s, plain PyTorch loop {tp['plain_tokens_per_s']:.1f} tok/s "
              f"({tp['dsc_tokens_per_s'] / tp['plain_tokens_per_s']:.2f}×)")


def _gap(rows: dict, name: str, key: str) -> str:
    """Fraction of the teacher–pruned gap recovered, on log-perplexity."""
    if name == "teacher" or "none" not in rows:
        return f"{'':14}"
    p, t, r = (math.log(rows[k][key]) for k in ("none", "teacher", name))
    return f"{(p - r) / (p - t):14.1%}"


if __name__ == "__main__":
    main()
