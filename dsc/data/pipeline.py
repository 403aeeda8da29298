"""Tokenize → pack → split, with the token stream cached on disk by content hash.

The stream is the documents' tokens joined by EOS. It is cut into blocks of `block_size`; a
seeded permutation assigns blocks to calibration / train / eval; each split keeps its blocks
in their original order, so `stream(split)` reads as contiguous text between block seams.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from dsc import hf
from dsc.data.sources import SPLITS, TeacherSource, read_documents, source_fingerprint
from dsc.errors import DscInputError
from dsc.fingerprint import hash_bytes, hash_json

CACHE_VERSION = "tokens-v1"
log = logging.getLogger("dsc.data")


@dataclass(frozen=True)
class TokenData:
    """A tokenized source: one stream, cut into blocks, assigned to splits."""

    name: str
    tokens: torch.Tensor  # (N,) int64
    block_size: int
    assignment: dict[str, np.ndarray] = field(repr=False)  # split -> sorted block indices
    fingerprint: str = ""

    def blocks(self, split: str = "all") -> torch.Tensor:
        """(n_blocks, block_size) int64 blocks of one split, or every block for 'all'."""
        n = len(self.tokens) // self.block_size
        full = self.tokens[: n * self.block_size].view(n, self.block_size)
        if split == "all":
            return full
        idx = self.assignment.get(split)
        if idx is None or len(idx) == 0:
            raise DscInputError(f"data.{self.name}.splits", f"split {split!r} has no blocks ({n} blocks of "
                                f"{self.block_size} tokens in all): give it a fraction, add data or lower block_size")
        return full[torch.as_tensor(idx)]

    def stream(self, split: str = "all") -> torch.Tensor:
        """The split's tokens as one (N,) stream, blocks in their original order."""
        return self.blocks(split).reshape(-1)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hash_bytes(backend.to_str())
    return hash_json(sorted(tokenizer.get_vocab().items()))


def tokenize_documents(docs, tokenizer, max_tokens: int | None) -> torch.Tensor:
    """Documents → one int64 stream, EOS between documents."""
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    total = 0
    batch: list[str] = []

    def flush():
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(ids + ([eos] if eos is not None else []))
            total += len(pieces[-1])
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= 256:
            flush()
        if max_tokens and total >= max_tokens:
            break
    if batch and not (max_tokens and total >= max_tokens):
        flush()
    flat = np.fromiter((t for p in pieces for t in p), dtype=np.int64, count=total)
    return torch.from_numpy(flat[:max_tokens] if max_tokens else flat)


def assign_splits(n_blocks: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Deterministic seeded assignment of block indices to splits."""
    perm = np.random.default_rng(seed).permutation(n_blocks)
    out, start, cum = {}, 0, 0.0
    for name in SPLITS:
        cum += fractions.get(name, 0.0)
        end = n_blocks if abs(cum - 1) < 1e-9 else int(round(cum * n_blocks))
        out[name] = np.sort(perm[start:end])
        start = end
    return out


def prepare(name: str, src, tokenizer, *, base_dir: Path, cache_dirs: tuple[Path, ...] = (), seed: int,
            teacher_fp: str = "", generate: Callable[[TeacherSource], torch.Tensor] | None = None) -> TokenData:
    """Tokenize (or load from the first cache that has it) one named source and split it."""
    field_path = f"data.{name}"
    key = hash_json([CACHE_VERSION, source_fingerprint(src, base_dir, teacher_fp), tokenizer_fingerprint(tokenizer),
                     seed if isinstance(src, TeacherSource) and src.seed is None else None])
    files = [Path(d) / "tokens" / f"{key}.safetensors" for d in cache_dirs]
    tokens = None
    for f in files:
        if f.is_file():
            tokens = _load_verified(f)
            if tokens is not None:
                log.info("data %s: %d tokens from %s", name, len(tokens), f)
                break
    if tokens is None:
        if isinstance(src, TeacherSource):
            if generate is None:
                raise DscInputError(field_path, "a teacher source needs a teacher model to sample from")
            tokens = generate(src)
        else:
            tokens = tokenize_documents(read_documents(src, base_dir, field_path), tokenizer, src.max_tokens)
        log.info("data %s: %d tokens prepared", name, len(tokens))
    for f in files:
        if not f.is_file():
            _save_atomic(f, tokens)
    if len(tokens) < src.block_size:
        raise DscInputError(field_path, f"only {len(tokens)} tokens, fewer than block_size={src.block_size}: "
                            "add data or lower block_size")
    n_blocks = len(tokens) // src.block_size
    return TokenData(name, tokens, src.block_size, assign_splits(n_blocks, src.splits, seed), key)


def _save_atomic(path: Path, tokens: torch.Tensor) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = tokens.to(torch.int32).contiguous()
    save_file({"tokens": data}, tmp, metadata={"sha256": hash_bytes(data.numpy().tobytes())})
    os.replace(tmp, path)


def _load_verified(path: Path) -> torch.Tensor | None:
    """A cached token stream, or None (and the file removed: dsc wrote it) when it is damaged —
    an unreadable header, or tokens whose sha256 is not the one saved with them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            saved = (fh.metadata() or {}).get("sha256")
            data = fh.get_tensor("tokens")
        if saved is not None and hash_bytes(data.contiguous().numpy().tobytes()) != saved:
            raise ValueError("the tokens' sha256 differs from the one saved with them")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged header
        log.warning("token cache %s is damaged (%s: %s): preparing the data again", path, type(exc).__name__, exc,
                    extra={"event": "damaged", "path": str(path)})
        path.unlink(missing_ok=True)
        return None
    return data.long()


@torch.inference_mode()
def sample_from_teacher(model, tokenizer, src: TeacherSource, seed: int, progress=None) -> torch.Tensor:
    """Sample `num_sequences` × `length` tokens from the teacher; returns the EOS-joined stream."""
    device = next(model.parameters()).device
    start = tokenizer(src.prompt, add_special_tokens=False)["input_ids"] if src.prompt else []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = torch.tensor([bos] + start, device=device)
    eos = tokenizer.eos_token_id
    gen = hf.generation_config(do_sample=True, temperature=src.temperature, top_k=src.top_k, top_p=1.0,
                               max_new_tokens=src.length, min_new_tokens=src.length,
                               pad_token_id=eos if eos is not None else 0, eos_token_id=eos)
    pieces = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded without touching the caller's RNG
        torch.manual_seed(src.seed if src.seed is not None else seed)
        for begin in range(0, src.num_sequences, src.batch_size):
            b = min(src.batch_size, src.num_sequences - begin)
            ids = prefix.expand(b, -1)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            for row in out[:, ids.shape[1]:].cpu():
                pieces.append(torch.cat([row, torch.tensor([eos] if eos is not None else [], dtype=row.dtype)]))
            if progress:
                progress(begin + b, src.num_sequences)
    tokens = torch.cat(pieces).long()
    return tokens[: src.max_tokens] if src.max_tokens else tokens
