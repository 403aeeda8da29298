# Run by bench/bench_quant.py as a subprocess, with /work/venvs/ao/bin/python (torchao 0.18.0,
# optimum-quanto 0.2.7, transformers 5.23.0, torch 2.13.0+cpu); the last stdout line is one JSON
# object. No dsc import: dsc is not installed in that venv.
"""torchao 0.18.0 and optimum-quanto 0.2.7 on a float32 causal LM: peers of dsc's quantization.

    python bench/peers/ao_quant.py --tool {torchao,quanto} --scheme {int8-wo,int4-wo,w8a8} \
        --model DIR --eval EVAL.pt [--calib CALIB.pt] --group 64 --out OUT

Every nn.Linear except lm_head is quantized (the tied embedding stays float32).
torchao (`quantize_(model, config, filter_fn)`, round-to-nearest, no calibration):
- int8-wo: Int8WeightOnlyConfig() - int8 symmetric weights per output row (PerRow), float acts.
- int4-wo: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(--group)),
  symmetric (its default MappingType.SYMMETRIC), unpacked-to-int8 storage. Int4WeightOnlyConfig
  does not run on CPU in 0.18 (shared/docs/peers.md).
- w8a8: Int8DynamicActivationInt8WeightConfig() - int8 weights per row, int8 activations
  quantized dynamically per token, symmetric.
optimum-quanto (`quantize(model, weights=..., activations=..., exclude="lm_head")`, `freeze`):
- int8-wo: weights qint8 (symmetric, per output channel).
- int4-wo: weights qint4 (quanto's default MaxOptimizer: affine, with a shift) and
  weight_group_size forced to --group on every QLinear between quantize() and freeze() (quanto
  would pick 128, 96, 64 or 32 itself, or per-channel for inputs <= 128 or when none divides).
- w8a8: weights qint8 + activations qint8 (static scales): calibrated with the first 8 rows of
  --calib, batch 1, under `quanto.Calibration()`, then frozen.
For int4-wo a group that does not divide some Linear's input width is refused up front, naming
the layers (both tools would fail on it too, less clearly); there is no fallback.
The timed step (quant_seconds) is quantize_ / quantize + (calibration) + freeze. Then the
state_dict is saved with torch.save to OUT/model.pt (bytes_on_disk; null if that fails) and
the in-memory model is measured: perplexity on EVAL.pt (under no_grad: quanto's int4 forward
fails under inference_mode) and greedy decode speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import decode_speed, load_blocks, peak_rss_mb, perplexity  # noqa: E402

SCHEMES = ("int8-wo", "int4-wo", "w8a8")
QUANTO_CALIB_ROWS = 8


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def quantize_torchao(model, scheme: str, group: int) -> None:
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_)
    from torchao.quantization.granularity import PerGroup

    config = {
        "int8-wo": lambda: Int8WeightOnlyConfig(),
        "int4-wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                granularity=PerGroup(group)),
        "w8a8": lambda: Int8DynamicActivationInt8WeightConfig(),
    }[scheme]()
    quantize_(model, config,
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")


@torch.no_grad()
def quantize_quanto(model, scheme: str, group: int, calib: torch.Tensor | None) -> None:
    from optimum.quanto import Calibration, QModuleMixin, freeze, qint4, qint8, quantize

    weights = qint4 if scheme == "int4-wo" else qint8
    activations = qint8 if scheme == "w8a8" else None
    quantize(model, weights=weights, activations=activations, exclude="lm_head")
    if scheme == "int4-wo":  # quanto picks its own group size: force ours
        for m in model.modules():
            if isinstance(m, QModuleMixin):
                m.weight_group_size = group
    if scheme == "w8a8":
        with Calibration():
            for ids in calib[:QUANTO_CALIB_ROWS]:
                model(ids[None], use_cache=False)
    freeze(model)


def check_groups(model, group: int) -> None:
    """Both tools refuse an input width that the group does not divide, deep inside (torchao: a
    bare AssertionError; quanto: a ValueError at freeze); name the layers up front instead."""
    bad = [f"{n} (in_features={m.in_features})" for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.in_features % group]
    if bad:
        raise ValueError(f"--group {group} does not divide the input width of: {', '.join(bad)}; "
                         "pick a group size that divides every width")


def save_state_dict(model, out: Path) -> int | None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.pt"
    try:
        torch.save(model.state_dict(), path)
    except Exception as e:  # noqa: BLE001 - a tool whose tensors do not pickle reports null
        log(f"torch.save of the state_dict failed: {type(e).__name__}: {e}")
        path.unlink(missing_ok=True)
        return None
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", required=True, choices=("torchao", "quanto"))
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", help="LongTensor (N, L); required for --tool quanto --scheme w8a8")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.tool == "quanto" and args.scheme == "w8a8" and not args.calib:
        ap.error("--tool quanto --scheme w8a8 calibrates activation scales: pass --calib")

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    windows = load_blocks(args.eval)
    calib = load_blocks(args.calib) if args.calib else None
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tool_version = version("torchao" if args.tool == "torchao" else "optimum-quanto")
    log(f"{args.tool} {tool_version}: {args.scheme} group {args.group}")

    if args.scheme == "int4-wo":
        check_groups(model, args.group)
    t0 = time.perf_counter()
    if args.tool == "torchao":
        quantize_torchao(model, args.scheme, args.group)
    else:
        quantize_quanto(model, args.scheme, args.group, calib)
    quant_seconds = time.perf_counter() - t0
    log(f"quantize: {quant_seconds:.2f} s")

    bytes_on_disk = save_state_dict(model, Path(args.out))
    ppl = perplexity(model, windows)
    tok_s = decode_speed(model, model.config.vocab_size)
    print(json.dumps({
        "tool": args.tool, "version": tool_version, "scheme": args.scheme,
        "group": args.group if args.scheme == "int4-wo" else None,
        "quant_seconds": quant_seconds, "peak_rss_mb": peak_rss_mb(), **ppl,
        "decode_tok_s": tok_s, "bytes_on_disk": bytes_on_disk,
    }), flush=True)


if __name__ == "__main__":
    main()
