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
lines, first N windows of 1024 tokens, stride 1024, token level. Calibration: the first 64 × 512
tokens of the C4 validation subset; training: the next `--tokens` tokens in blocks of `--seq-len`
(documents joined by EOS, file order, shuffled by seed 0), no token seen twice.
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

from dsc import Context  # noqa: E402
from dsc.data.pipeline import TokenData, tokenize_documents  # noqa: E402
from dsc.distill import DistillConfig, LoraConfig, apply, apply_lora  # noqa: E402
from dsc.evaluation import param_counts, perplexity  # noqa: E402
from dsc.models import ModelRef, load_model, load_tokenizer, resolve  # noqa: E402
from dsc.prune import PruneConfig, apply as prune  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def streams(tok, args):
    text = (SHARED / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    wiki = tokenize_documents(["\n\n".join(line for line in text.splitlines() if line.strip())], tok, None)
    wiki = wiki[: args.windows * args.context]
    docs = (json.loads(line)["text"] for line in open(SHARED / "c4-validation-subset" / "c4_validation_2k.jsonl"))
    calib_n = 64 * 512
    c4 = tokenize_documents(docs, tok, calib_n + args.tokens + args.eval_blocks * args.seq_len)
    calib = TokenData("calib", c4[:calib_n], 512, {}, "calib")
    rest = c4[calib_n:]
    n_train = args.tokens // args.seq_len
    n = len(rest) // args.seq_len
    import numpy as np

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
        student = copy.deepcopy(pruned).train()
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
    ap.add_argument("--eval-blocks", type=int, default=4)
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
    ppl = lambda m: perplexity(m, wiki, args.context, args.context)["perplexity"]  # noqa: E731
    rows = {"teacher": {"perplexity": ppl(teacher), "seconds": 0.0, **param_counts(teacher)}}
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
        rows[name] = {"perplexity": ppl(model), "seconds": time.perf_counter() - t0, **param_counts(model),
                      "tokens": metrics.get("tokens", 0), "tokens_per_s": metrics.get("tokens_per_s"),
                      "held_out": metrics.get("eval")}
        print(name, rows[name], file=sys.stderr, flush=True)
    tp = throughput(pruned, teacher, tok, data, args) if args.tp_steps else None
    _print(rows, tp, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "throughput": tp, "args": vars(args)}, indent=2))


def _print(rows, tp, args) -> None:
    t = rows["teacher"]
    p = rows.get("none", {}).get("perplexity")
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M-Instruct, −{args.ratio:.0%} (heads + channels, activation) | WikiText-2 valid, "
          f"{args.windows} × {args.context} windows, stride {args.context}, token level | training: C4, "
          f"{args.tokens:,} tokens per method, {args.batch} × {args.seq_len} per step | {device}")
    print(f"{'method':10} {'non-emb params':>14} {'perplexity':>11} {'gap recovered':>14} {'train tok/s':>12} "
          f"{'wall s':>8}")
    for name, r in rows.items():
        gap = "" if p is None or name == "teacher" else \
            f"{(math.log(p) - math.log(r['perplexity'])) / (math.log(p) - math.log(t['perplexity'])):14.1%}"
        tps = f"{r['tokens_per_s']:12.1f}" if r.get("tokens_per_s") else f"{'':12}"
        print(f"{name:10} {r['params_non_embedding']:14,} {r['perplexity']:11.2f} {gap:>14} {tps} {r['seconds']:8.1f}")
    if tp:
        print(f"throughput (KD step, {args.batch} × {args.seq_len}, median of {tp['rounds']}): dsc loop "
              f"{tp['dsc_tokens_per_s']:.1f} tok/s, plain PyTorch loop {tp['plain_tokens_per_s']:.1f} tok/s "
              f"({tp['dsc_tokens_per_s'] / tp['plain_tokens_per_s']:.2f}×)")


if __name__ == "__main__":
    main()
