"""Quantization-aware distillation where post-training quantization breaks down: RTN, AWQ and
AWQ + QAD (`qat`, from AWQ's unrounded start) on SmolLM2-135M at W4 and W3.

Per bit width, one AWQ search (weights left in float: `apply_awq(round_weights=False)`) serves
both rows: rounded on its grid it is the AWQ row, trained through its quantizer by the float
teacher (KL on logits, scales learned) it is the QAD row. Every row is saved as compressed-tensors,
reloaded with from_pretrained and measured from the reloaded model; the float teacher is measured
in the same run.

    python bench/bench_qad.py                 # ≈ 30 min on 2 CPU cores
    python bench/bench_qad.py --bits 3 --steps 32

Protocol (printed with the table): WikiText-2 raw validation, first W windows of 1024 tokens,
each scored alone, token level. Calibration: the first 32 × 512 tokens of the C4 validation
subset; QAD training: the next steps × batch × seq_len C4 tokens (no overlap with calibration).
Group size 64: SmolLM2's 576-wide inputs do not take 128. LM head float.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402  (bench/peers/common.py)
import corpora  # noqa: E402

from dsc import Context, apply_stage, save_model  # noqa: E402
from dsc.data.pipeline import TokenData  # noqa: E402
from dsc.distill import QATConfig  # noqa: E402
from dsc.quantize import AWQConfig, RTNConfig  # noqa: E402
from dsc.quantize.stage import apply_awq  # noqa: E402

CALIB = (32, 512)


def measure(model, tok, windows, label: str, seconds: float) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tok, Path(tmp) / "m")
        again = AutoModelForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32).eval()
        disk = common.dir_bytes(Path(tmp) / "m")
    return {"method": label, "seconds": seconds, "bytes": disk, **common.perplexity(again, windows)}


@torch.no_grad()
def rounded(model):
    """The unrounded AWQ model put on its own grids: what `awq` itself returns."""
    from dsc.quantize.grid import Grid

    out = copy.deepcopy(model)
    for m in out.modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None:
            a = scheme.weights
            scale = m.weight_scale.float().reshape(m.weight.shape[0], -1)
            zero = getattr(m, "weight_zero_point", None)
            zero = torch.zeros_like(scale) if zero is None else zero.float().reshape(scale.shape)
            m.weight.copy_(Grid(a.num_bits, a.group_size, a.symmetric).fake(m.weight, scale, zero).to(m.weight.dtype))
    return out


def rows(args, teacher, tok, ctx, windows):
    yield {**measure(teacher, tok, windows, "float", 0.0)}
    grid = dict(group_size=64)
    for bits in args.bits:
        t0 = time.perf_counter()
        rtn = apply_stage("rtn", copy.deepcopy(teacher), RTNConfig(bits=bits, **grid), ctx).model
        yield measure(rtn, tok, windows, f"W{bits} RTN", time.perf_counter() - t0)
        t0 = time.perf_counter()
        awq_float = copy.deepcopy(teacher)
        apply_awq(awq_float, AWQConfig(bits=bits, **grid, split="calibration", num_samples=CALIB[0]), ctx,
                  round_weights=False)
        awq_seconds = time.perf_counter() - t0
        yield measure(rounded(awq_float), tok, windows, f"W{bits} AWQ", awq_seconds)
        t0 = time.perf_counter()
        cfg = QATConfig(bits=bits, **grid, init="auto", steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, kl=1.0, eval_split="none", save_every=0, log_every=8)
        out = apply_stage("qat", awq_float, cfg, ctx)
        row = measure(out.model, tok, windows, f"W{bits} AWQ + QAD ({args.steps * args.batch_size * args.seq_len:,} "
                                              "tokens)", awq_seconds + time.perf_counter() - t0)
        yield {**row, "start": out.metrics["start"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    from dsc.models import ModelRef, load_model, load_tokenizer, resolve

    ref = ModelRef(path="default")
    src = resolve(ref, Path("."))
    tok = load_tokenizer(src, ref)
    teacher = load_model(src, ref).float().eval()
    windows = corpora.wikitext(tok, args.windows * 1024).view(args.windows, 1024).clone()
    n_calib, n_train = CALIB[0] * CALIB[1], args.steps * args.batch_size * args.seq_len
    stream = corpora.c4(tok, n_calib + n_train)
    blocks = stream.numel() // args.seq_len
    calib_blocks = n_calib // args.seq_len
    splits = {"calibration": np.arange(calib_blocks), "train": np.arange(calib_blocks, blocks)}
    ctx = Context.create(tok, {}, teacher=teacher, seed=0, device="cpu")
    ctx.data.put(TokenData("c4", stream, args.seq_len, splits, "c4-bench"))
    print(f"Protocol: WikiText-2 raw valid, {args.windows} × 1024-token windows, token level; calibration "
          f"{CALIB[0]} × {CALIB[1]} C4 tokens; QAD {args.steps} steps × {args.batch_size} × {args.seq_len} C4 tokens "
          f"(lr {args.lr}, KL on logits, scales learned); group 64, LM head float; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| method | perplexity | Δ vs float | seconds (quantize + train) | weights MB |")
    print("|---|---|---|---|---|")
    base = None
    for r in rows(args, teacher, tok, ctx, windows):
        base = base or r["perplexity"]
        print(f"| {r['method']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f} % | "
              f"{r['seconds']:.0f} | {r['bytes'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
