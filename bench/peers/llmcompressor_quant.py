# Run by bench/bench_quant.py as a subprocess, with /work/venvs/llmc/bin/python (llmcompressor
# 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu); the last stdout
# line is one JSON object. No dsc import: dsc is not installed in that venv.
"""llm-compressor 0.14.0.1 on a float32 causal LM: the peer of dsc's quantization stages.

    python bench/peers/llmcompressor_quant.py --model DIR --calib CALIB.pt --eval EVAL.pt \
        --scheme {rtn-w4,awq-w4,w8a8-sq,int8-wo} --group 64 --out OUT

Schemes (all through `oneshot`, Linear targets, lm_head always ignored, default observers =
min-max; the presets W4A16 / W8A16 are group 128, so the schemes are spelled out in
`config_groups`):
- rtn-w4: QuantizationModifier, weights int4 symmetric, strategy "group", group_size=--group
  (W4A16 with the group spelled out), round-to-nearest, no calibration data (datafree pipeline).
- awq-w4: AWQModifier() (default Llama mappings, duo_scaling=True, n_grid=20) followed by the
  same int4 group QuantizationModifier; calibrated on CALIB.pt (sequential pipeline).
  Needs the CPU patch from shared/docs/peers.md: IntermediatesCache.pin_memory becomes a no-op.
- w8a8-sq: SmoothQuantModifier(smoothing_strength=0.8) (default mappings) followed by
  QuantizationModifier (round-to-nearest after smoothing, not GPTQ): weights int8 symmetric
  per-channel, input activations int8 symmetric per-token, dynamic (compressed-tensors INT8_W8A8).
- int8-wo: QuantizationModifier, weights int8 symmetric per-channel, activations float; no data.
Calibration: exactly the rows of CALIB.pt (N, L) as a datasets.Dataset with input_ids and
attention_mask, num_calibration_samples=N, max_seq_length=L, batch size 1.

Only the `oneshot(...)` call is timed (quant_seconds). The model is then saved with
save_compressed=True to OUT/model (pack-quantized / int-quantized compressed-tensors) and the
in-memory model (fake-quant forward) is measured: perplexity on EVAL.pt and greedy decode speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import decode_speed, dir_bytes, load_blocks, peak_rss_mb, perplexity  # noqa: E402

SCHEMES = ("rtn-w4", "awq-w4", "w8a8-sq", "int8-wo")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def config_groups(scheme: str, group: int) -> dict:
    """compressed-tensors schemes, spelled out (the W4A16 / W8A16 presets are group 128)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme in ("rtn-w4", "awq-w4"):
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group,
                                   symmetric=True, dynamic=False)
        acts = None
    else:
        weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True,
                                   dynamic=False)
        acts = (QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True,
                                 dynamic=True) if scheme == "w8a8-sq" else None)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights,
                                          input_activations=acts)}


def recipe(scheme: str, group: int) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    quant = QuantizationModifier(config_groups=config_groups(scheme, group), ignore=["lm_head"])
    if scheme == "awq-w4":
        return [AWQModifier(), quant]
    if scheme == "w8a8-sq":
        return [SmoothQuantModifier(smoothing_strength=0.8), quant]
    return [quant]


def calib_dataset(calib: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})


def patch_pin_memory() -> None:
    """Stock AWQ calls pin_memory() unconditionally, which raises 'Cannot access accelerator
    device when none is available' on a CPU-only torch (shared/docs/peers.md)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    calib, windows = load_blocks(args.calib), load_blocks(args.eval)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    has_tok = (Path(args.model) / "tokenizer_config.json").exists()

    kwargs = {}
    if args.scheme in ("awq-w4", "w8a8-sq"):  # RTN schemes need no data: datafree pipeline
        n, length = calib.shape
        kwargs = dict(dataset=calib_dataset(calib), num_calibration_samples=n,
                      max_seq_length=length, batch_size=1)
    if args.scheme == "awq-w4":
        patch_pin_memory()
    if has_tok:
        kwargs["tokenizer"] = args.model
    log(f"llm-compressor {llmcompressor.__version__}: {args.scheme} group {args.group}")

    t0 = time.perf_counter()
    model = oneshot(model=model, recipe=recipe(args.scheme, args.group), **kwargs)
    quant_seconds = time.perf_counter() - t0
    log(f"oneshot: {quant_seconds:.2f} s")

    out = Path(args.out) / "model"
    model.save_pretrained(out, save_compressed=True)
    if has_tok:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.model).save_pretrained(out)

    model.eval()
    ppl = perplexity(model, windows)
    tok_s = decode_speed(model, model.config.vocab_size)
    print(json.dumps({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "scheme": args.scheme,
        "group": args.group if args.scheme in ("rtn-w4", "awq-w4") else None,
        "quant_seconds": quant_seconds, "peak_rss_mb": peak_rss_mb(), **ppl,
        "decode_tok_s": tok_s, "bytes_on_disk": dir_bytes(out),
    }), flush=True)


if __name__ == "__main__":
    main()
