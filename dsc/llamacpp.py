"""The llama-cpp-python adapter: every llama_cpp call of dsc is in this file.

`evaluate` with `runtime: llama.cpp` measures a GGUF file where it is deployed: perplexity under
the same protocol, from the same token ids (fed to llama.cpp as ids, so its tokenizer plays no
part), and prefill / decode tokens per second with llama.cpp's own kernels. llama-cpp-python is
an optional extra (`pip install "dsc[llama]"`, a C++ build; on x86 machines whose CPU reports AMX,
build with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF": the native build dies with "Illegal instruction" on quantized models).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dsc.errors import FieldError

INSTALL = ('pip install "dsc[llama]" (llama-cpp-python; see docs/benchmarks.md for the build flags on CPUs '
           'that report AMX)')


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def version() -> str | None:
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):
        return None
    return llama_cpp.__version__


@contextlib.contextmanager
def _quiet():
    """llama.cpp writes its load log to fd 2 from C: silence it unless DSC_LLAMA_VERBOSE is set."""
    if os.environ.get("DSC_LLAMA_VERBOSE"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load(path: Path, n_ctx: int, threads: int, logits_all: bool = True):
    """A llama.cpp context on `path` (CPU)."""
    try:
        from llama_cpp import Llama
    except (ImportError, OSError, RuntimeError) as exc:
        raise FieldError("runtime", f"llama.cpp needs llama-cpp-python ({exc}): {INSTALL}") from exc
    with _quiet():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False, seed=0)


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of a fresh sequence `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def perplexity(path: Path, stream: torch.Tensor, windows: list[tuple[int, int, int]], threads: int,
               progress=None) -> dict:
    """Token-level perplexity of `stream` over `windows` (dsc.evaluation.windows), scored as the
    transformers path scores them: in each window, the `n_new` last tokens from those before."""
    n_ctx = max(e - b for b, e, _ in windows)
    llm = load(path, n_ctx, threads)
    nll, count = 0.0, 0
    try:
        for k, (b, e, n_new) in enumerate(windows):
            ids = stream[b:e].tolist()
            out = torch.from_numpy(logits(llm, ids))  # (T, V)
            first = max(len(ids) - n_new - 1, 0)  # positions whose next token is scored
            pred, target = out[first:-1], torch.tensor(ids[first + 1:])
            nll += torch.nn.functional.cross_entropy(pred.double(), target, reduction="sum").item()
            count += len(target)
            if progress:
                progress(k + 1, len(windows))
    finally:
        llm.close()
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "tokens_scored": count, "windows": len(windows)}


def speed(path: Path, vocab_size: int, prompt_length: int, decode_tokens: int, repeats: int, threads: int,
          seed: int = 0) -> dict:
    """Prefill (one batch of `prompt_length` random tokens) and greedy decode throughput, median of
    `repeats` after a warm-up, with llama.cpp's kernels and `threads` threads."""
    from dsc.evaluation import CpuContention

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (prompt_length,), generator=gen).tolist()
    llm = load(path, prompt_length + decode_tokens + 1, threads, logits_all=False)
    prefill, decode = [], []
    try:
        with CpuContention() as busy:
            for rep in range(repeats + 1):
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(prompt)
                t1 = time.perf_counter()
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                for _ in range(decode_tokens):
                    llm.eval([token])
                    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                t2 = time.perf_counter()
                if rep:
                    prefill.append(t1 - t0)
                    decode.append(t2 - t1)
    finally:
        llm.close()
    return {
        "prefill_tokens_per_s": prompt_length / statistics.median(prefill),
        "decode_tokens_per_s": decode_tokens / statistics.median(decode) if decode_tokens else None,
        "other_cpu_load": busy.others,
        "speed_protocol": {"batch_size": 1, "prompt_length": prompt_length, "decode_tokens": decode_tokens,
                           "repeats": repeats, "threads": threads, "device": "cpu", "runtime": "llama.cpp"},
    }
