"""GGUF side by side in llama.cpp: dsc's exports against llama-quantize on the same teacher.

SmolLM2-135M (the embedded teacher, dequantized once to float32). Every file is measured in one
process by the same code (dsc.llamacpp: llama.cpp through llama-cpp-python, same threads, same
token ids), on two held-out splits:
- WikiText-2 raw valid (non-empty lines joined by blank lines), W windows of 1024 tokens, each
  scored alone from its first token (dsc's protocol: llama-perplexity scores only each window's
  second half, so its numbers are lower; compare rows with each other);
- C4 validation subset, the W·1024 tokens after the calibration tokens (same documents' source as
  the calibration, never calibrated on).
Columns: file bytes, perplexity and its change against the F32 file, KL divergence and top-token
agreement against the F32 file (first K WikiText windows), prefill (128 tokens) and greedy decode
(64 tokens) tokens/s at the given threads; and the Hugging Face float32 teacher's decode speed.

Rows: the teacher as F32 (dsc's export of the float model: what convert_hf_to_gguf --outtype f32
writes); llama-quantize Q8_0, Q4_0, Q4_K_M, and Q4_K_M with an importance matrix from
llama-imatrix on the calibration text; dsc RTN and AWQ (group 32, float16 scales) → Q4_0 with the
embedding in Q8_0, AWQ with the embedding in Q4_0; the Lite model's shape (the flagship's prune
cuts + AWQ, no distillation: its speed is the Lite model's, its quality is not) → Q4_0; and,
with --lite OUT, a finished flagship run's OUT/model.

    python bench/bench_gguf.py --llama-bin PATH/TO/llama.cpp/build/bin [--windows 16] [--lite ../runs/v3_to_lite]

SmolLM2-135M-Instruct ships as a Q4_1 GGUF: its weights already lie on a Q4_1 grid, so
re-quantizing it to Q4_1 is nearly free (+0.3 % measured) and no fair row; Q4_0, the K-quants and
Q8_0 are compared instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import corpora  # noqa: E402


def prepare(work: Path, args):
    from dsc.models import ModelRef, load_model, load_tokenizer, resolve

    ref = ModelRef(path="default")
    src = resolve(ref, Path("."))
    tok = load_tokenizer(src, ref)
    model = load_model(src, ref)
    n_cal, n_eval = args.calib_samples * args.calib_len, args.windows * 1024
    n_train = args.qad_steps * args.qad_batch * args.calib_len
    c4 = corpora.c4(tok, n_cal + n_eval + n_train)  # calibration | held-out evaluation | QAD training
    calib = c4[:n_cal].view(args.calib_samples, args.calib_len).clone()
    splits = {"wikitext2-valid": corpora.wikitext(tok, n_eval), "c4-heldout": c4[n_cal:n_cal + n_eval]}
    train = c4[n_cal + n_eval:n_cal + n_eval + n_train]
    text = work / "calibration.txt"  # the same documents, as text, for llama-imatrix
    if not text.exists():
        text.write_text(tok.decode(calib.reshape(-1).tolist()), encoding="utf-8")
    return model, tok, calib, train, splits, text


def awq_qad(model, tok, calib, train, args):
    """AWQ's scales and clipping (weights left in float), then quantization-aware distillation on
    the grid from the float teacher (KL on logits, scales learned, kept float16): dsc's QAD."""
    import copy

    from dsc import Context, apply_stage
    from dsc.data.pipeline import TokenData
    from dsc.distill import QATConfig
    from dsc.quantize import AWQConfig
    from dsc.quantize.stage import apply_awq

    stream = torch.cat([calib.reshape(-1), train])
    blocks = stream.numel() // args.calib_len
    splits = {"calibration": np.arange(calib.shape[0]), "train": np.arange(calib.shape[0], blocks)}
    ctx = Context.create(tok, {}, teacher=model, seed=0, device="cpu")
    ctx.data.put(TokenData("c4", stream, args.calib_len, splits, "c4-bench-gguf"))
    grid = dict(bits=4, group_size=args.group, scale_dtype="float16")
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    apply_awq(m, AWQConfig(**grid, split="calibration", num_samples=calib.shape[0]), ctx, round_weights=False)
    cfg = QATConfig(**grid, init="auto", steps=args.qad_steps, batch_size=args.qad_batch, seq_len=args.calib_len,
                    lr=2e-5, kl=1.0, eval_split="none", save_every=0, log_every=8)
    out = apply_stage("qat", m, cfg, ctx).model
    return out, time.perf_counter() - t0


def dsc_quantized(model, tok, calib, method: str, group: int):
    import copy

    from dsc import Context
    from dsc.data.pipeline import TokenData
    from dsc.quantize import AWQConfig, RTNConfig, apply_awq, apply_rtn

    m = copy.deepcopy(model)
    ctx = Context.create(tok, {}, device="cpu")
    ctx.data.put(TokenData("calib", calib.reshape(-1), calib.shape[1], {}, ""))
    t0 = time.perf_counter()
    if method == "rtn":
        apply_rtn(m, RTNConfig(group_size=group, scale_dtype="float16"), ctx)
    else:
        apply_awq(m, AWQConfig(group_size=group, scale_dtype="float16", split="all", num_samples=calib.shape[0]), ctx)
    return m, time.perf_counter() - t0


def lite_shape(model, tok, calib):
    """The flagship's prune cuts (24 layers, 6 query heads, MLP 832) then AWQ g64: the Lite model's shape."""
    import copy

    from dsc import Context
    from dsc.data.pipeline import TokenData
    from dsc.prune import PruneConfig
    from dsc.quantize import AWQConfig, apply_awq
    from dsc.registry import STAGES

    ctx = Context.create(tok, {}, device="cpu")
    ctx.data.put(TokenData("calib", calib.reshape(-1), calib.shape[1], {}, ""))
    m = STAGES["prune"].apply(copy.deepcopy(model), PruneConfig(layers=0.2, heads=0.34, channels=0.42,
                                                                  channel_multiple=64, split="all", num_samples=32),
                              ctx).model
    apply_awq(m, AWQConfig(group_size=64, scale_dtype="float16", split="all", num_samples=calib.shape[0]), ctx)
    return m


def export(model, tok, path: Path, **cfg) -> Path:
    from dsc.export import ExportConfig, export_gguf

    if not path.exists():
        export_gguf(model, tok, path, ExportConfig(**cfg))
    return path


def quantize(bin_dir: Path, src: Path, dst: Path, kind: str, imatrix: Path | None = None) -> Path:
    if not dst.exists():
        cmd = [str(bin_dir / "llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else []) + \
              [str(src), str(dst), kind, "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    return dst


def make_imatrix(bin_dir: Path, f32: Path, text: Path, out: Path, threads: int) -> Path:
    if not out.exists():
        subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", "512",
                        "-t", str(threads)], check=True, capture_output=True)
    return out


def measure(path: Path, splits: dict, reference: list | None, args, vocab: int) -> dict:
    from dsc import llamacpp
    from dsc.evaluation import windows

    row = {"file_bytes": path.stat().st_size}
    llm = llamacpp.load(path, 1024, args.threads)
    try:
        for name, stream in splits.items():
            nll, count, kl, agree, logps = 0.0, 0, 0.0, 0, []
            for k, (b, e, _) in enumerate(windows(len(stream), 1024, 1024)):
                ids = stream[b:e].tolist()
                logits = torch.from_numpy(llamacpp.logits(llm, ids)).double()
                logp = torch.log_softmax(logits[:-1], -1)
                nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
                count += len(ids) - 1
                if name == "wikitext2-valid" and k < args.kl_windows:
                    if reference is None:
                        logps.append(logp.half())
                    else:
                        ref = reference[k].double()
                        kl += (ref.exp() * (ref - logp)).sum().item()
                        agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            row[name] = float(np.exp(nll / count))
            if name == "wikitext2-valid":
                n = min(args.kl_windows, len(windows(len(stream), 1024, 1024))) * 1023
                row["kl"], row["top1"] = (kl / n, agree / n) if reference is not None else (0.0, 1.0)
                if reference is None:
                    row["_reference"] = logps
    finally:
        llm.close()
    row.update(llamacpp.speed(path, vocab, 128, 64, args.repeats, args.threads))
    return row


def table(rows: list[dict], hf_decode: float, args) -> str:
    base = rows[0]
    lines = ["| model | file MB | wiki2 ppl | Δ | C4 ppl | Δ | KL vs F32 | top-1 vs F32 | prefill tok/s | decode tok/s |"
             " decode vs F32 | decode vs HF fp32 |", "|---" * 12 + "|"]
    for r in rows:
        d = [f"{100 * (r[s] / base[s] - 1):+.2f} %" for s in ("wikitext2-valid", "c4-heldout")]
        busy = " †" if (r.get("other_cpu_load") or 0) > 0.25 else ""
        lines.append(f"| {r['label']} | {r['file_bytes'] / 1e6:.1f} | {r['wikitext2-valid']:.3f} | {d[0]} | "
                     f"{r['c4-heldout']:.3f} | {d[1]} | {r['kl']:.4f} | {100 * r['top1']:.1f} % | "
                     f"{r['prefill_tokens_per_s']:.0f}{busy} | {r['decode_tokens_per_s']:.1f}{busy} | "
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× | "
                     f"{r['decode_tokens_per_s'] / hf_decode:.2f}× |")
    lines.append(f"\nHugging Face float32 teacher (transformers, same machine): decode {hf_decode:.1f} tok/s. "
                 f"llama.cpp through llama-cpp-python, {args.threads} threads; perplexity over {args.windows} × 1024 "
                 f"tokens per split, each window scored from its first token; KL and top-1 over the first "
                 f"{args.kl_windows} WikiText windows; calibration {args.calib_samples} × {args.calib_len} C4 tokens; "
                 f"dsc AWQ/RTN group {args.group}; † other processes held the CPU while timed. "
                 f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--kl-windows", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qad-steps", type=int, default=32, help="QAD steps (0: no QAD rows)")
    ap.add_argument("--qad-batch", type=int, default=2, help="QAD blocks (of --calib-len tokens) per step")
    ap.add_argument("--lite", type=Path, help="a finished flagship run directory (its OUT/model is exported)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc"))
                    / "bench-gguf")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    w = args.work
    model, tok, calib, train, splits, text = prepare(w, args)
    from dsc.evaluation import speed

    hf_decode = speed(model, model.config.vocab_size, 1, 128, 64, args.repeats)["decode_tokens_per_s"]
    f32 = export(model, tok, w / "teacher-F32.gguf", weights="f32", embedding="f32")
    files = [("teacher F32", f32)]
    imatrix = make_imatrix(args.llama_bin, f32, text, w / "imatrix.dat", args.threads)
    for kind in ("Q8_0", "Q4_0", "Q4_K_M"):
        files.append((f"llama-quantize {kind}", quantize(args.llama_bin, f32, w / f"lq-{kind}.gguf", kind)))
    files.append(("llama-quantize Q4_K_M + imatrix", quantize(args.llama_bin, f32, w / "lq-Q4_K_M-imatrix.gguf",
                                                             "Q4_K_M", imatrix)))
    seconds = {}
    tokens = args.qad_steps * args.qad_batch * args.calib_len
    methods = [("rtn", "RTN"), ("awq", "AWQ")] + ([("awq+qad", f"AWQ + QAD ({tokens:,} tokens)")] if tokens else [])
    for method, title in methods:
        embs = ("q8_0",) if method == "rtn" else ("q8_0", "q4_0")
        paths = {e: w / f"dsc-{method.replace('+', '-')}-g{args.group}-Q4_0-emb{e.upper()}.gguf" for e in embs}
        if not all(p.exists() for p in paths.values()):  # files of an earlier run are measured again, not rebuilt
            q, seconds[method] = awq_qad(model, tok, calib, train, args) if method == "awq+qad" else \
                dsc_quantized(model, tok, calib, method, args.group)
            for e, path in paths.items():
                export(q, tok, path, embedding=e)
            del q
        files += [(f"dsc {title} g{args.group} → Q4_0, emb {e.upper()}", path) for e, path in paths.items()]
    lite = w / "lite-shape-Q4_0.gguf"
    files.append(("Lite shape (prune + AWQ g64, no distillation) → Q4_0",
                  lite if lite.exists() else export(lite_shape(model, tok, calib), tok, lite)))
    if args.lite:
        from dsc.models import load_checkpoint

        files.append(("flagship Lite model → Q4_0", export(load_checkpoint(args.lite / "model"), tok,
                                                           w / "flagship-lite.gguf")))
    vocab = model.config.vocab_size
    del model
    rows, reference = [], None
    for label, path in files:
        print(f"… {label}", file=sys.stderr, flush=True)
        row = measure(path, splits, reference, args, vocab)
        if reference is None:
            reference = row.pop("_reference")
        rows.append({"label": label, "file": path.name, **row})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "speed_protocol"}), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "hf_decode": hf_decode, "quantize_seconds": seconds}, indent=1))
    print(table(rows, hf_decode, args))
    print("\ndsc quantization time: " + ", ".join(f"{k.upper()} {v:.0f} s" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
