# Run by bench/bench_quant.py as a subprocess, with /work/venvs/llmc/bin/python (llmcompressor
# 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu); the last stdout
# line is one JSON object. No dsc import: dsc is not installed in that venv.
"""llm-compressor 0.14.0.1 on a float32 causal LM: the peer of dsc's quantization stages.

    python bench/peers/llmcompressor_quant.py --model DIR --calib CALIB.pt --eval EVAL.pt \
        --scheme {rtn-w4,awq-w4,gptq-w4,w8a8-sq,int8-wo,fp8-dynamic,fp8-block,nvfp4,nvfp4-w,
                  mxfp4,mxfp4-w} --group 64 --out OUT

Schemes (all through `oneshot`, Linear targets, lm_head always ignored, default observers =
min-max, memoryless for the weights; the presets W4A16 / W8A16 are group 128, so the integer
schemes are spelled out in `config_groups`; --group only applies to the int4 schemes):
- rtn-w4: QuantizationModifier, weights int4 symmetric, strategy "group", group_size=--group
  (W4A16 with the group spelled out), round-to-nearest, no calibration data (datafree pipeline).
- awq-w4: AWQModifier() (default Llama mappings, duo_scaling=True, n_grid=20) followed by the
  same int4 group QuantizationModifier; calibrated on CALIB.pt (sequential pipeline).
  Needs the CPU patch from shared/docs/peers.md: IntermediatesCache.pin_memory becomes a no-op.
- gptq-w4: GPTQModifier with the same int4 group scheme, actorder="static" (compressed-tensors
  alias of "weight": columns processed in decreasing Hessian-diagonal order, groups stay the
  contiguous original columns, so no g_idx is saved; "group"/"dynamic" act-order are removed in
  this release), block_size=128 and dampening_frac=0.01 (the defaults); calibrated on CALIB.pt
  (sequential pipeline). Runs on CPU unpatched.
- w8a8-sq: SmoothQuantModifier(smoothing_strength=0.8) (default mappings) followed by
  QuantizationModifier (round-to-nearest after smoothing, not GPTQ): weights int8 symmetric
  per-channel, input activations int8 symmetric per-token, dynamic (compressed-tensors INT8_W8A8).
- int8-wo: QuantizationModifier, weights int8 symmetric per-channel, activations float; no data.
- Presets, QuantizationModifier(scheme=PRESET, targets=["Linear"], ignore=["lm_head"]):
  - fp8-dynamic (FP8_DYNAMIC): weights FP8 E4M3 per-channel static, inputs FP8 per-token
    dynamic; no data. Saved as "float-quantized".
  - fp8-block (FP8_BLOCK): weights FP8 in 128x128 blocks (static), inputs FP8 per-token groups of
    128, dynamic; no data. Saved as "float-quantized". Widths not divisible by 128 (SmolLM2's
    576): llm-compressor does not check them for BLOCK (only for group / tensor_group). The
    weights are fine: the block grid is rounded up (strategy_cdiv warns "block quantization
    strategy requires strict division ..."), the partial blocks are padded for the fake-quant
    and scaled by their own max, nothing is padded on disk (q_proj 576x576: weight (576, 576),
    weight_scale (5, 5)); oneshot and the save succeed. The inputs' dynamic 128-groups are not
    padded: the first forward of a Linear with 576 inputs (q/k/v/o/gate/up; down_proj's 1536 is
    fine) fails in compute_dynamic_scales_and_zp with "unflatten: Provided sizes [5, 128] don't
    multiply up to the size of dim 2 (576)". So check_block_widths refuses fp8-block up front
    on such models (exit 1, no JSON line): no SmolLM2 row.
  - nvfp4 (NVFP4): weights FP4 E2M1, groups of 16 with FP8 E4M3 scales and a per-tensor fp32
    global scale (shared by q/k/v and by gate/up); inputs FP4 groups of 16, local scales dynamic
    but the global input scale static, observed on CALIB.pt (static_minmax), so the sequential
    pipeline runs. Saved as "nvfp4-pack-quantized".
  - nvfp4-w (NVFP4A16): the NVFP4 weights only, activations float; no data.
  - mxfp4 (MXFP4): weights FP4 E2M1, groups of 32 with uint8 (E8M0 power-of-two) scales, inputs
    the same, dynamic; no data. mxfp4-w (MXFP4A16): the weights only. Saved as
    "mxfp4-pack-quantized".
  The group-16 / 32 presets need widths divisible by 16 / 32 (576 is; llm-compressor checks it
  at initialize). The FP4 formats need the float32 patch patch_fp4_decompress (below).
Calibration (for the schemes whose recipe requires data: awq-w4, gptq-w4, w8a8-sq, nvfp4):
exactly the rows of CALIB.pt (N, L) as a datasets.Dataset with input_ids and attention_mask,
num_calibration_samples=N, max_seq_length=L, batch size 1. oneshot refuses a dataset without
a processor, so these schemes need a tokenizer in DIR (passed as `tokenizer`).

Only the `oneshot(...)` call is timed (quant_seconds). The model is then saved with
save_compressed=True to OUT/model (compressed-tensors, format as above; pack-quantized /
int-quantized for the integer schemes) and the in-memory model (fake-quant forward) is
measured: perplexity on EVAL.pt and greedy decode speed. The JSON's "group" is the weights'
group size (None for per-channel), "block" the FP8 weight block (None elsewhere).
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

PRESETS = {"fp8-dynamic": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "nvfp4": "NVFP4",
           "nvfp4-w": "NVFP4A16", "mxfp4": "MXFP4", "mxfp4-w": "MXFP4A16"}
SCHEMES = ("rtn-w4", "awq-w4", "gptq-w4", "w8a8-sq", "int8-wo", *PRESETS)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def config_groups(scheme: str, group: int) -> dict:
    """compressed-tensors schemes, spelled out (the W4A16 / W8A16 presets are group 128)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme in ("rtn-w4", "awq-w4", "gptq-w4"):
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
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    if scheme in PRESETS:
        return [QuantizationModifier(scheme=PRESETS[scheme], targets=["Linear"],
                                     ignore=["lm_head"])]
    if scheme == "gptq-w4":  # block_size=128, dampening_frac=0.01: the defaults
        return [GPTQModifier(config_groups=config_groups(scheme, group), ignore=["lm_head"],
                             actorder="static")]
    quant = QuantizationModifier(config_groups=config_groups(scheme, group), ignore=["lm_head"])
    if scheme == "awq-w4":
        return [AWQModifier(), quant]
    if scheme == "w8a8-sq":
        return [SmoothQuantModifier(smoothing_strength=0.8), quant]
    return [quant]


def weight_args(modifiers: list):
    """The weights' QuantizationArgs of the (single) quantization scheme in the recipe."""
    quant = modifiers[-1]
    return next(iter(quant.resolved_config.config_groups.values())).weights


def check_block_widths(model, scheme: str) -> None:
    """FP8_BLOCK quantizes inputs in per-token groups of 128; llm-compressor does not check the
    widths and the first forward of a Linear whose in_features % 128 != 0 fails (after oneshot
    and the save) with 'unflatten: Provided sizes [5, 128] don't multiply up to ... (576)'.
    Fail before quantizing instead."""
    if scheme != "fp8-block":
        return
    bad = {n: m.in_features for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n != "lm_head" and m.in_features % 128}
    if bad:
        widths = ", ".join(map(str, sorted(set(bad.values()))))
        raise SystemExit(f"fp8-block: FP8_BLOCK quantizes Linear inputs in groups of 128 and its "
                         f"forward fails on {len(bad)} Linear layers with {widths} inputs "
                         f"(e.g. {next(iter(bad))}); llm-compressor does not check this")


def calib_dataset(calib: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})


def patch_pin_memory() -> None:
    """Stock AWQ calls pin_memory() unconditionally, which raises 'Cannot access accelerator
    device when none is available' on a CPU-only torch (shared/docs/peers.md)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *a, **k: None


def patch_fp4_decompress() -> None:
    """save_pretrained(save_compressed=True) compresses the in-memory modules too; they decompress
    on the first forward and then run on the stored weights (no more weight fake-quant). The FP4
    decompressor (nvfp4-pack-quantized, reused by mxfp4-pack-quantized) unpacks to bfloat16 and
    dequantizes in bfloat16, so on a float32 model the first Linear fails with 'expected m1 and
    m2 to have the same dtype, but got: float != c10::BFloat16'. Unpack to float32 instead: the
    decompressed weights then equal the float32 fake-quant ones exactly."""
    import compressed_tensors.compressors.nvfp4.base as nvfp4

    unpack = nvfp4.unpack_fp4_from_uint8
    nvfp4.unpack_fp4_from_uint8 = lambda a, m, n, dtype=None: unpack(a, m, n, torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--scheme", required=True, choices=SCHEMES)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-extra", action="append", default=[], metavar="NAME=PATH",
                    help="also score these windows (e.g. c4=C4 held out from calibration): perplexity_NAME")
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    calib, windows = load_blocks(args.calib), load_blocks(args.eval)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    has_tok = (Path(args.model) / "tokenizer_config.json").exists()

    check_block_widths(model, args.scheme)
    modifiers = recipe(args.scheme, args.group)
    kwargs = {}
    # awq / gptq / smoothquant / nvfp4's static input global scale need data (sequential
    # pipeline); the others run the datafree pipeline
    if any(m.requires_calibration_data for m in modifiers):
        n, length = calib.shape
        kwargs = dict(dataset=calib_dataset(calib), num_calibration_samples=n,
                      max_seq_length=length, batch_size=1)
    if args.scheme == "awq-w4":
        patch_pin_memory()
    if "FP4" in PRESETS.get(args.scheme, ""):
        patch_fp4_decompress()
    if has_tok:
        kwargs["tokenizer"] = args.model
    group = f" group {args.group}" if args.scheme.endswith("-w4") else ""
    log(f"llm-compressor {llmcompressor.__version__}: {args.scheme}{group}")

    t0 = time.perf_counter()
    model = oneshot(model=model, recipe=modifiers, **kwargs)
    quant_seconds = time.perf_counter() - t0
    log(f"oneshot: {quant_seconds:.2f} s")

    out = Path(args.out) / "model"
    model.save_pretrained(out, save_compressed=True)
    if has_tok:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.model).save_pretrained(out)

    model.eval()
    weights = weight_args(modifiers)
    ppl = perplexity(model, windows)
    for extra in args.eval_extra:
        name, path = extra.split("=", 1)
        ppl[f"perplexity_{name}"] = perplexity(model, load_blocks(path))["perplexity"]
    tok_s = decode_speed(model, model.config.vocab_size)
    print(json.dumps({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "scheme": args.scheme,
        "group": weights.group_size, "block": weights.block_structure,
        "quant_seconds": quant_seconds, "peak_rss_mb": peak_rss_mb(), **ppl,
        "decode_tok_s": tok_s, "bytes_on_disk": dir_bytes(out),
    }), flush=True)


if __name__ == "__main__":
    main()
