"""DeepSeek-V3-architecture MoE pruning: routed experts, MLA heads, expert channels, side by side.

tiny-deepseek-v3 (../shared/models: trained, MLA, first layer dense, 1 shared + 8 routed experts
in 2 routing groups, top-2) with 25 / 50 / 75 % of the routed experts removed by each dsc
importance (reap, reconstruction, frequency, usage, random over 3 seeds; reap / reconstruction also
with `expert_merge: merge`), llm-compressor 0.14's REAPPruningModifier at the same sparsity
(`--peers llmcompressor`: a subprocess in /work/venvs/llmc, bench/peers/llmcompressor_reap.py),
then MLA heads, MLA latent ranks and expert channels at 25 / 50 %, then RTN / AWQ / INT8 of the
whole model (fused experts quantized per expert, saved packed and reloaded), then the "distilled V3": a dense Llama student
(hidden 64, 4 layers, random init, seed 0) trained from the MoE teacher with KL + feature KD and,
for comparison, the same student on the LM loss alone, for the same tokens (text sampled from the
teacher). Every dsc row is saved and reloaded with from_pretrained and measured from the reloaded
model; the float model is re-measured in the run.

    python bench/bench_moe.py --peers llmcompressor      # ≈ 5 min on 2 CPU cores

Protocol (printed with the table): text sampled from stories260K (temperature 1, from BOS) —
calibration 32 × 128 tokens (seed 1), evaluation 128 × 128 tokens (seeds 2–5; the model was trained
on seed 0's samples); each row scored on its own, token level, no context carried over.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peers"))

import torch  # noqa: E402
from common import decode_speed, dir_bytes, perplexity  # noqa: E402  (bench/peers/common.py)

from dsc import Context, apply_stage  # noqa: E402
from dsc.data.pipeline import TokenData  # noqa: E402
from dsc.evaluation import param_counts  # noqa: E402
from dsc.models import save_model  # noqa: E402
from dsc.prune import PruneConfig  # noqa: E402

SHARED = Path(os.environ.get("DSC_SHARED", ROOT.parent / "shared"))
MODEL, STORIES = SHARED / "models" / "tiny-deepseek-v3", SHARED / "models" / "stories260K"
CACHE = Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc")) / "bench-moe"
LLMC = Path("/work/venvs/llmc/bin/python")


def sample(n: int, seed: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    torch.manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.long)
    with torch.no_grad():
        return model.generate(ones, attention_mask=ones, do_sample=True, max_new_tokens=127, min_new_tokens=127)


def blocks() -> tuple[Path, Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    calib, held = CACHE / "calib.pt", CACHE / "eval.pt"
    if not calib.is_file():
        torch.save(sample(32, 1), calib)
    if not held.is_file():
        torch.save(torch.cat([sample(32, s) for s in (2, 3, 4, 5)]), held)
    return calib, held


def measure(model, held: torch.Tensor, folder: Path | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    if folder is not None:  # measure what a user loads, not the object in memory
        save_model(model, None, folder)  # quantized models: compressed-tensors, packed
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return {"ppl": perplexity(model, held)["perplexity"], "params": param_counts(model)["params"],
            "bytes": dir_bytes(folder) if folder else None, "tok_s": decode_speed(model, model.config.vocab_size)}


def dsc_row(base, ctx, held, label: str, **cut) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = apply_stage("prune", copy.deepcopy(base), PruneConfig(split="all", **cut), ctx)
        seconds = time.perf_counter() - t0
        return {"method": label, "seconds": seconds, "reloads": True, **measure(out.model, held, Path(tmp))}


def peer_row(calib: Path, held_path: Path, sparsity: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(LLMC), str(ROOT / "bench/peers/llmcompressor_reap.py"), "--model", str(MODEL), "--calib",
               str(calib), "--eval", str(held_path), "--sparsity", str(sparsity), "--out", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            return {"method": "llm-compressor REAP", "error": run.stderr.strip().splitlines()[-1][:160]}
        r = json.loads(run.stdout.strip().splitlines()[-1])
        return {"method": "llm-compressor REAP", "ppl": r["perplexity"], "params": r["params"],
                "bytes": r["bytes_on_disk"], "tok_s": r["decode_tok_s"], "seconds": r["seconds"],
                "reloads": r["reloads"]}


def rows(args, base, ctx, held, calib_path, held_path):
    for frac in args.fractions:
        yield f"routed experts −{frac:.0%}", None
        for imp in ("reap", "reconstruction", "frequency", "usage"):
            yield None, dsc_row(base, ctx, held, f"dsc {imp}", experts=frac, expert_importance=imp)
        for imp in ("reap", "reconstruction"):
            yield None, dsc_row(base, ctx, held, f"dsc {imp} + merge", experts=frac, expert_importance=imp,
                                expert_merge="merge")
        runs = [dsc_row(base, ctx, held, "r", experts=frac, expert_importance="random", seed=s) for s in range(3)]
        yield None, {**runs[0], "method": "dsc random (mean of 3 seeds)",
                     "ppl": statistics.mean(r["ppl"] for r in runs)}
        if "llmcompressor" in args.peers:
            yield None, peer_row(calib_path, held_path, frac)
    titles = {"heads": "MLA heads", "latent": "MLA latent ranks (q_lora_rank, kv_lora_rank)",
              "channels": "expert + dense channels"}
    for kind, title in titles.items():
        for frac in (0.25, 0.5):
            yield f"{title} −{frac:.0%}", None
            for imp in ("activation", "magnitude", "random"):
                yield None, dsc_row(base, ctx, held, f"dsc {imp}", **{kind: frac}, importance=imp)


STUDENT = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4, "intermediate_size": 172}


def distill_rows(base, tok, held, steps: int):
    """The dense student from the MoE teacher: KD (KL + features) against LM loss, same tokens."""
    from dsc.data.sources import TeacherSource
    from dsc.distill import DistillConfig

    src = TeacherSource(num_sequences=256, length=127, block_size=128, splits={"train": 1.0}, batch_size=64)
    ctx = Context.create(tok, {"generated": src}, teacher=base, seed=0)
    common = dict(student={"config": STUDENT}, steps=steps, batch_size=8, lr=5e-3, eval_split="none")
    yield f"dense Llama student (hidden 64, 4 layers), {steps} steps × 8 × 128 tokens", None
    for label, loss in (("dsc KD: KL + features", dict(kl=1.0, features=1.0)), ("LM loss only", dict(kl=0.0, ce=1.0))):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = apply_stage("distill", None, DistillConfig(**common, **loss), ctx)
            seconds = time.perf_counter() - t0
            yield None, {"method": label, "seconds": seconds, "reloads": True, **measure(out.model, held, Path(tmp))}


QUANT = {  # label: (stage, config); kv_b_proj reads the 32-wide latent: group 32 fits every linear
    "RTN W4 g32": ("rtn", dict(bits=4, group_size=32)),
    "AWQ W4 g32": ("awq", dict(bits=4, group_size=32)),
    "RTN W3 g32": ("rtn", dict(bits=3, group_size=32)),
    "AWQ W3 g32": ("awq", dict(bits=3, group_size=32)),
    "INT8 weight-only": ("int8", dict(mode="weight_only")),
    "INT8 W8A8 (routed experts weight-only)": ("int8", dict(mode="w8a8")),
}


def quant_rows(base, ctx, held):
    """Every linear and every routed expert quantized (experts per expert, on their routed tokens)."""
    from dsc.quantize.config import AWQConfig, Int8Config, RTNConfig

    classes = {"rtn": RTNConfig, "awq": AWQConfig, "int8": Int8Config}
    yield "quantized: all linears and the fused routed experts (LM head float)", None
    for label, (stage, cfg) in QUANT.items():
        extra = {} if stage == "rtn" else {"split": "all", "num_samples": 32}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = apply_stage(stage, copy.deepcopy(base), classes[stage](**cfg, **extra), ctx)
            seconds = time.perf_counter() - t0
            row = {"method": f"dsc {label}", "seconds": seconds, "reloads": True, **measure(out.model, held, Path(tmp))}
            row["params"] = param_counts(base)["params"]
            yield None, row


def fmt(row: dict, float_ppl: float) -> str:
    if "error" in row:
        return f"| {row['method']} | failed: {row['error']} | | | | | |"
    delta = 100 * (row["ppl"] / float_ppl - 1)
    size = f"{row['bytes'] / 1e6:.2f}" if row.get("bytes") else ""
    reload = {True: "yes", False: "no (config patched)"}.get(row.get("reloads"), "")
    return (f"| {row['method']} | {row['ppl']:.3f} | {delta:+.1f} % | {row['params'] / 1e6:.3f} | {size} | "
            f"{row['tok_s']:.0f} | {row.get('seconds', 0):.1f} | {reload} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="", help="comma-separated: llmcompressor")
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--distill-steps", type=int, default=600, help="0: skip the dense-student rows")
    ap.add_argument("--no-quant", dest="quant", action="store_false", help="skip the quantization rows")
    args = ap.parse_args()
    args.peers = [p for p in args.peers.split(",") if p]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} is absent: this benchmark needs ../shared beside the checkout")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    calib_path, held_path = blocks()
    calib, held = torch.load(calib_path), torch.load(held_path)
    base = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    ctx = Context.create(AutoTokenizer.from_pretrained(MODEL), {}, device="cpu")
    ctx.data.put(TokenData("calib", calib.reshape(-1), calib.shape[1], {}, ""))
    print(__doc__.split("Protocol")[1].strip().split("\n\n")[0].replace("(printed with the table): ", "Protocol: "))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU threads\n")
    print("| method | ppl | Δ | params M | disk MB | decode tok/s | prune / train s | reloads |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        float_row = {"method": "float (tiny-deepseek-v3)", **measure(base, held, Path(tmp))}
    print(fmt(float_row, float_row["ppl"]), flush=True)
    for title, row in rows(args, base, ctx, held, calib_path, held_path):
        print(f"| **{title}** | | | | | | | |" if title else fmt(row, float_row["ppl"]), flush=True)
    if args.quant:
        for title, row in quant_rows(base, ctx, held):
            print(f"| **{title}** | | | | | | | |" if title else fmt(row, float_row["ppl"]), flush=True)
    if args.distill_steps:
        for title, row in distill_rows(base, ctx.tokenizer, held, args.distill_steps):
            print(f"| **{title}** | | | | | | | |" if title else fmt(row, float_row["ppl"]), flush=True)


if __name__ == "__main__":
    main()
