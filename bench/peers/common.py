"""Measurements shared by the peer quantization scripts (llmcompressor_quant.py, ao_quant.py).

Pure torch + transformers, no dsc import: every peer runs in its own virtualenv
(/work/venvs/llmc, /work/venvs/ao) where dsc is not installed, and bench/bench_quant.py reads the
one JSON line each script prints. Keep the protocol here identical to dsc's side of the benchmark.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_blocks(path: str | Path) -> torch.Tensor:
    """A LongTensor of token ids saved with torch.save: (N, L) calibration rows, (W, T) windows."""
    blocks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.long or blocks.dim() != 2:
        raise ValueError(f"{path}: expected a 2-D LongTensor of token ids, got "
                         f"{type(blocks).__name__} {getattr(blocks, 'dtype', '')} "
                         f"{tuple(getattr(blocks, 'shape', ()))}")
    return blocks


@torch.no_grad()  # not inference_mode: optimum-quanto's int4 forward fails under it
def perplexity(model, windows: torch.Tensor) -> dict:
    """Token-level perplexity over non-overlapping windows (W, T), each scored on its own
    (batch 1, no cache, no context carried over): logits at 0..T-2 predict tokens 1..T-1."""
    nll_sum, tokens = 0.0, 0
    for ids in windows:  # (T,)
        logits = model(ids[None], use_cache=False).logits[0, :-1]  # (T-1, V)
        nll_sum += F.cross_entropy(logits.double(), ids[1:], reduction="sum").item()
        tokens += ids.numel() - 1
    return {"perplexity": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens}


@torch.no_grad()
def decode_speed(model, vocab: int, prompt: int = 32, new: int = 64, repeats: int = 2) -> float:
    """Greedy decoding speed in tokens/s: `new` tokens after a fixed random prompt (seed 0),
    batch 1, KV cache on; one untimed warm-up, then the median of `repeats` timed runs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen)  # (1, prompt)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, use_cache=True, pad_token_id=model.config.eos_token_id)
    model.generate(ids, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        times.append(time.perf_counter() - t0)
        if out.shape[1] != prompt + new:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt} new tokens, not {new}")
    return new / statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(path: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) under a saved model directory."""
    root = Path(path)
    return sum(p.stat().st_size for pat in ("*.safetensors", "*.bin") for p in root.rglob(pat))
