"""What the `evaluate` stage measures: perplexity under a stated protocol, parameter counts,
bytes, inference speed and peak memory. Plain functions over a model, reused by `dsc eval`
and the benchmarks, so the teacher and every Lite model are measured by the same code."""
from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsc import hf


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, end, n_new) as in the transformers perplexity guide: a window
    covers the `n_new` tokens after the previous window's end, with context before them.

    A token is scored from the tokens before it in its window, so the first token of a window
    with no context (every window when stride == context_length) is not scored: a stream of N
    tokens in W such windows scores N - W tokens. `perplexity` reports the exact count."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(model, stream: torch.Tensor, context_length: int, stride: int, batch_size: int = 1,
               max_windows: int | None = None, progress=None) -> dict:
    """Token-level perplexity of `stream` (N,) under sliding windows.

    Returns the summed negative log-likelihood and the count of scored tokens, so results
    from several calls combine exactly."""
    device = next(model.parameters()).device
    wins = windows(len(stream), context_length, stride)[:max_windows]
    nll, count = 0.0, 0
    # Windows of equal length are batched; the last one may be shorter and runs alone.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    done = 0
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            ids = torch.stack([stream[b:e] for b, e, _ in chunk]).to(device)  # (B, T)
            # targets[t] = ids[t + 1]; context tokens (already scored) and the last slot are ignored.
            # Shifting the labels, not the logits, keeps the (B, T, V) logits a view: no copy.
            targets = torch.full_like(ids, -100)
            targets[:, :-1] = ids[:, 1:]
            for row, (_, _, n_new) in enumerate(chunk):
                targets[row, : max(length - n_new - 1, 0)] = -100
            logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
            done += len(chunk)
            if progress:
                progress(done, len(wins))
    return {"perplexity": math.exp(nll / count), "nll_sum": nll, "tokens_scored": count, "windows": len(wins)}


def param_counts(model) -> dict:
    """Total and non-embedding parameters; tied weights counted once; the scales and zero points
    of quantized linears are storage (counted in bytes), not parameters."""
    from dsc.quantize.ct import qparam_names

    skip = qparam_names(model)
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() not in seen and name not in skip:
            seen.add(p.data_ptr())
            total += p.numel()
    embedding = 0
    emb_ptrs = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and module.weight.data_ptr() not in emb_ptrs:
            emb_ptrs.add(module.weight.data_ptr())
            embedding += module.weight.numel()
    return {"params": total, "params_non_embedding": total - embedding}


def weight_bytes(model) -> int:
    """Bytes of the weights as saved: unique tensors of the state dict, quantized weights at their
    bit width (their scales and zero points are tensors of the state dict too)."""
    from dsc.quantize.ct import experts_qparam_bytes, stored_bits

    bits = stored_bits(model)
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * bits[name] // 8 if name in bits else t.numel() * t.element_size()
    return total + experts_qparam_bytes(model)  # fused experts' scales live outside the state dict


def disk_bytes(folder: Path) -> int:
    """Bytes of a saved checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


class PeakMemory:
    """Peak extra memory of a block of work: CUDA allocator peak on GPU; on CPU the process's
    resident-set high-water mark (reset through /proc/self/clear_refs), after returning freed
    heap to the OS so earlier work does not hide new allocations."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "cpu rss high-water mark"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.before = _proc_status("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.method = "cpu rss high-water mark (not resettable here: upper bound)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.extra = max(0, _proc_status("VmHWM") - self.before)
        return False


class CpuContention:
    """How many cores other processes kept busy while a block ran (machine-wide busy time from
    /proc/stat minus this process's own, over the wall time). Timings taken while others held
    the CPU are not what the model does alone: torch's and llama.cpp's threads wait on them."""

    def __enter__(self):
        self.others = None
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, t0 = self._start
        now = _busy_seconds()
        if busy is not None and now is not None:
            wall = max(time.perf_counter() - t0, 1e-9)
            self.others = round(max(0.0, (now - busy) - (_own_seconds() - own)) / wall, 3)
        return False


def _busy_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def speed(model, vocab_size: int, batch_size: int, prompt_length: int, decode_tokens: int,
          repeats: int, seed: int = 0) -> dict:
    """Prefill and greedy-decode throughput (median of `repeats`, after one warm-up) and the
    peak extra memory of that work."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, prompt_length), generator=gen).to(device)
    prefill, decode = [], []
    # Generation needs only the last position's logits: skip the (B, T, V) tensor where supported.
    keep = hf.keep_logits(model, 1)
    cache_name = hf.cache_argument(model)  # looked up once: not inside the timed loop
    if decode_tokens and cache_name is None:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache: decode speed cannot be measured")
    with PeakMemory(device) as mem, CpuContention() as busy:
        for rep in range(repeats + 1):  # rep 0 warms up kernels and allocator
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **keep)
            _sync(device)
            t1 = time.perf_counter()
            past, token = hf.output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(decode_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_name: past})
                past, token = hf.output_cache(out), out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if rep:
                prefill.append(t1 - t0)
                decode.append(t2 - t1)
            del out, past, token  # the next repeat must not count this one's KV cache
    return {
        "prefill_tokens_per_s": batch_size * prompt_length / statistics.median(prefill),
        "decode_tokens_per_s": batch_size * decode_tokens / statistics.median(decode) if decode_tokens else None,
        "activation_peak_bytes": mem.extra,
        "memory_method": mem.method,
        "other_cpu_load": busy.others if device.type == "cpu" else None,
        "speed_protocol": {"batch_size": batch_size, "prompt_length": prompt_length, "decode_tokens": decode_tokens,
                           "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device)},
    }
