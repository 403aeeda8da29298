"""Quantization side by side: dsc's RTN / AWQ / INT8 against llm-compressor, torchao, optimum-quanto.

SmolLM2-135M (the embedded teacher, dequantized once to a plain float32 folder that every tool
loads), one calibration set and one evaluation for every method. Each method runs in its own
process (dsc here with `--worker`, the peers in their own virtualenvs, shared/docs/peers.md), so
peak memory is each process's own peak RSS (model load included) and nothing leaks between them.
Per method: perplexity, its change against float, the tool's own quantization time, peak RSS,
bytes of weights on disk, greedy decode tokens/s.

    python bench/bench_quant.py                                  # dsc methods + float
    python bench/bench_quant.py --peers llmcompressor,torchao,quanto
    python bench/bench_quant.py --methods dsc-awq --peers llmcompressor --peer-schemes awq-w4

Protocol (printed with the table): WikiText-2 raw validation, non-empty lines joined by blank
lines, first W windows of 1024 tokens, each scored alone (stride 1024), token level; and C4
held out: the W windows of the C4 validation subset right after the calibration tokens; and
LAMBADA's test passages joined by EOS, first W windows (the last two: dsc and llm-compressor rows);
calibration: N × L tokens of the C4 validation subset (documents joined by EOS, in file order);
weights int4 symmetric with group 64 (SmolLM2's 576-wide inputs do not take 128) unless stated.
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
sys.path.insert(0, str(BENCH / "peers"))

import torch  # noqa: E402

import common  # noqa: E402  (bench/peers/common.py: the measurements every tool shares)

VENVS = Path(os.environ.get("DSC_PEER_VENVS", "/work/venvs"))
PEERS = {  # peer → (virtualenv, script, extra args, schemes)
    "llmcompressor": ("llmc", "llmcompressor_quant.py", [], ["rtn-w4", "int8-wo", "w8a8-sq", "awq-w4", "gptq-w4",
                                                             "fp8-dynamic", "nvfp4", "nvfp4-w", "mxfp4-w"]),
    "torchao": ("ao", "ao_quant.py", ["--tool", "torchao"], ["int4-wo", "int8-wo", "w8a8"]),
    "quanto": ("ao", "ao_quant.py", ["--tool", "quanto"], ["int4-wo", "int8-wo", "w8a8"]),
}
DSC = ["float", "dsc-rtn", "dsc-awq", "dsc-gptq", "dsc-awq-gptq", "dsc-int8-wo", "dsc-w8a8", "dsc-w8a8-cpu-kernels",
       "dsc-fp8", "dsc-fp8-block-w", "dsc-nvfp4", "dsc-nvfp4-w", "dsc-mxfp4-w"]
EXTRA = ("c4", "lambada")  # held-out texts scored beside WikiText-2 valid
EVAL_EXTRA = {"llmcompressor"}  # peers whose script scores them too


def prepare(work: Path, args) -> dict[str, Path]:
    """The float model folder, calibration rows and evaluation windows every method reads."""
    sys.path.insert(0, str(BENCH))
    import corpora
    from dsc.models import ModelRef, load_model, load_tokenizer, resolve

    paths = {"model": work / "smollm2-float32", "calib": work / f"calib-{args.calib_samples}x{args.calib_len}.pt",
             "eval": work / f"wiki-{args.windows}x1024.pt",
             "eval_c4": work / f"c4-{args.windows}x1024-after-{args.calib_samples * args.calib_len}.pt",
             "eval_lambada": work / f"lambada-{args.windows}x1024.pt"}
    if all(p.exists() for p in paths.values()):
        return paths
    ref = ModelRef(path="default")
    src = resolve(ref, Path("."))
    tok = load_tokenizer(src, ref)
    if not paths["model"].exists():
        load_model(src, ref).save_pretrained(paths["model"])
        tok.save_pretrained(paths["model"])
    torch.save(corpora.c4(tok, args.calib_samples * args.calib_len).view(args.calib_samples, args.calib_len).clone(),
               paths["calib"])
    torch.save(corpora.wikitext(tok, args.windows * 1024).view(args.windows, 1024).clone(), paths["eval"])
    n = args.calib_samples * args.calib_len  # C4 held out: the windows after the calibration tokens
    torch.save(corpora.c4(tok, n + args.windows * 1024)[n:].view(args.windows, 1024).clone(), paths["eval_c4"])
    torch.save(corpora.lambada(tok, args.windows * 1024).view(args.windows, 1024).clone(), paths["eval_lambada"])
    return paths


def worker(method: str, paths: dict[str, Path], out: Path, group: int) -> dict:
    """One dsc method in this process: quantize, save, measure (the JSON the peers print too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsc import Context
    from dsc.data.pipeline import TokenData
    from dsc.models import save_model
    from dsc.quantize import (AWQConfig, FloatConfig, GPTQConfig, Int8Config, RTNConfig, apply_awq, apply_float,
                              apply_gptq, apply_int8, apply_rtn)
    from dsc.quantize.cpu import int8_kernels

    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(paths["model"])
    calib = common.load_blocks(paths["calib"])
    ctx = Context.create(tok, {}, device="cpu")
    ctx.data.put(TokenData("calib", calib.reshape(-1), calib.shape[1], {}, ""))
    data = dict(split="all", num_samples=calib.shape[0])
    stages = {"dsc-rtn": (apply_rtn, RTNConfig(group_size=group)),
              "dsc-awq": (apply_awq, AWQConfig(group_size=group, **data)),
              # where AWQ loses on held-out text: its clipping search, and the calibration its module loss replays
              "dsc-awq-noclip": (apply_awq, AWQConfig(group_size=group, clip=False, **data)),
              "dsc-awq-loss-all": (apply_awq, AWQConfig(group_size=group, loss_samples=calib.shape[0], **data)),
              "dsc-awq-noclip-loss-all": (apply_awq, AWQConfig(group_size=group, clip=False,
                                                               loss_samples=calib.shape[0], **data)),
              "dsc-gptq": (apply_gptq, GPTQConfig(group_size=group, **data)),  # act-order, static groups
              "dsc-awq-gptq": (apply_gptq, GPTQConfig(group_size=group, awq_scales=True, **data)),
              "dsc-awq-gptq-clip": (apply_gptq, GPTQConfig(group_size=group, awq_scales=True, clip=True, **data)),
              "dsc-fp8": (apply_float, FloatConfig(scheme="fp8")),  # FP8_DYNAMIC
              # 576-wide inputs: no per-128 activation groups (llm-compressor's FP8_BLOCK fails there too)
              "dsc-fp8-block-w": (apply_float, FloatConfig(scheme="fp8-block", activations="none")),
              "dsc-nvfp4": (apply_float, FloatConfig(scheme="nvfp4", **data)),
              "dsc-nvfp4-w": (apply_float, FloatConfig(scheme="nvfp4", activations="none")),
              "dsc-mxfp4-w": (apply_float, FloatConfig(scheme="mxfp4", activations="none")),
              "dsc-int8-wo": (apply_int8, Int8Config(mode="weight_only")),
              "dsc-w8a8": (apply_int8, Int8Config(mode="w8a8", **data)),
              "dsc-w8a8-cpu-kernels": (apply_int8, Int8Config(mode="w8a8", **data))}
    seconds = 0.0
    if method != "float":
        apply, cfg = stages[method]
        t0 = time.perf_counter()
        apply(model, cfg, ctx)
        seconds = time.perf_counter() - t0
    save_model(model, tok, out / "model")
    disk = common.dir_bytes(out / "model")
    if method.endswith("cpu-kernels"):
        int8_kernels(model)
    result = {"tool": "dsc", "scheme": method.removeprefix("dsc-"), "quant_seconds": seconds,
              **common.perplexity(model, common.load_blocks(paths["eval"])),
              **{f"perplexity_{k}": common.perplexity(model, common.load_blocks(paths[f"eval_{k}"]))["perplexity"]
                 for k in EXTRA},
              "decode_tok_s": common.decode_speed(model, model.config.vocab_size), "bytes_on_disk": disk}
    return {**result, "peak_rss_mb": common.peak_rss_mb()}


def run(cmd: list[str]) -> dict | None:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        print(f"[failed: {' '.join(cmd[:4])} …]\n{res.stderr[-3000:]}", file=sys.stderr)
        return None
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - t0}


def table(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["scheme"] == "float"), None)
    keys = ("perplexity", *(f"perplexity_{k}" for k in EXTRA))
    lines = ["| tool | scheme | WikiText-2 | Δ | C4 held out | Δ | LAMBADA | Δ | quantize s | peak RSS MB | "
             "weights MB | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key):
        if r.get(key) is None:
            return "– | "
        if not base or r is base or base.get(key) is None:
            return f"{r[key]:.3f} | "
        return f"{r[key]:.3f} | {100 * (r[key] / base[key] - 1):+.1f} %"
    for r in rows:
        disk = f"{r['bytes_on_disk'] / 1e6:.0f}" if r.get("bytes_on_disk") else "–"
        lines.append(f"| {r['tool']} | {r['scheme']} | " + " | ".join(cell(r, k) for k in keys) +
                     f" | {r['quant_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {disk} | {r['decode_tok_s']:.1f} |")
    lines.append(f"\nPerplexity, token level, {args.windows} × 1024-token windows each scored alone: WikiText-2 raw "
                 f"valid; C4 held out (the windows after the calibration tokens); LAMBADA test passages. "
                 f"Calibration {args.calib_samples} × {args.calib_len} C4-subset tokens; int4 group {args.group}; "
                 f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(DSC), help=f"dsc methods ({', '.join(DSC)})")
    ap.add_argument("--peers", default="", help=f"peer tools ({', '.join(PEERS)})")
    ap.add_argument("--peer-schemes", default="", help="only these peer schemes (default: all of each peer)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc"))
                    / "bench-quant")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args)
    if args.worker:
        print(json.dumps(worker(args.worker, paths, args.work / args.worker, args.group)))
        return
    base = [sys.executable, __file__, "--windows", str(args.windows), "--calib-samples", str(args.calib_samples),
            "--calib-len", str(args.calib_len), "--group", str(args.group), "--work", str(args.work)]
    jobs = [(m, base + ["--worker", m]) for m in filter(None, args.methods.split(","))]
    only = set(filter(None, args.peer_schemes.split(",")))
    for peer in filter(None, args.peers.split(",")):
        venv, script, extra, schemes = PEERS[peer]
        for scheme in schemes:
            if only and scheme not in only:
                continue
            jobs.append((f"{peer}-{scheme}", [str(VENVS / venv / "bin" / "python"), str(BENCH / "peers" / script),
                                              *extra, "--model", str(paths["model"]), "--calib", str(paths["calib"]),
                                              "--eval", str(paths["eval"]), "--scheme", scheme, "--group",
                                              str(args.group), "--out", str(args.work / f"{peer}-{scheme}"),
                                              *[a for k in EXTRA if peer in EVAL_EXTRA
                                                for a in ("--eval-extra", f"{k}={paths[f'eval_{k}']}")]]))
    rows = []
    for name, cmd in jobs:
        print(f"… {name}", file=sys.stderr, flush=True)
        row = run(cmd)
        if row is not None:
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, args))


if __name__ == "__main__":
    main()
