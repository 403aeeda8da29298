# Run by bench/bench_moe.py as a subprocess, with /work/venvs/llmc/bin/python (llmcompressor
# 0.14.0.1, transformers 5.17.0, torch 2.13.0+cpu); the last stdout line is one JSON object.
# No dsc import: dsc is not installed in that venv.
"""llm-compressor 0.14's REAPPruningModifier on a MoE: the peer of dsc's expert pruning.

    python bench/peers/llmcompressor_reap.py --model DIR --calib CALIB.pt --eval EVAL.pt \
        --sparsity 0.5 --out OUT

`oneshot` with REAPPruningModifier(sparsity) on exactly the rows of CALIB.pt (batch 1, sequential
pipeline); only that call is timed. The pruned model is saved to OUT/model and reloaded with
from_pretrained. llm-compressor writes the new expert count to `num_local_experts`, which a
DeepSeek-V3 config maps to `n_routed_experts` on load but not in the saved config.json here
(shared/docs/peers.md): `reloads` records whether the stock save reloads, and, where it does not,
config.json is patched (n_routed_experts) so the pruned model can be measured at all. Perplexity:
the reloaded model on EVAL.pt (rows scored on their own, token level).
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
from llmcompressor_quant import calib_dataset, log  # noqa: E402


def reload(out: Path):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), None
    except Exception as exc:  # noqa: BLE001 — what the stock checkpoint does is the measurement
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap.base import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    calib, windows = load_blocks(args.calib), load_blocks(args.eval)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    n, length = calib.shape
    t0 = time.perf_counter()
    model = oneshot(model=model, recipe=REAPPruningModifier(sparsity=args.sparsity), dataset=calib_dataset(calib),
                    num_calibration_samples=n, max_seq_length=length, batch_size=1, tokenizer=args.model)
    seconds = time.perf_counter() - t0
    log(f"oneshot REAP {args.sparsity}: {seconds:.2f} s")
    out = Path(args.out) / "model"
    model.save_pretrained(out)
    again, error = reload(out)
    if again is None:
        config = json.loads((out / "config.json").read_text())
        kept = model.model.layers[-1].mlp.gate.weight.shape[0]
        config["n_routed_experts"] = kept
        (out / "config.json").write_text(json.dumps(config, indent=2))
        again, _ = reload(out)
    print(json.dumps({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "sparsity": args.sparsity,
        "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "reloads": error is None, "reload_error": error,
        "params": sum(p.numel() for p in again.parameters()), "bytes_on_disk": dir_bytes(out),
        **perplexity(again, windows), "decode_tok_s": decode_speed(again, again.config.vocab_size),
    }), flush=True)


if __name__ == "__main__":
    main()
