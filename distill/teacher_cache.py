"""Teacher top-k log-probs computed once and kept on disk, so the student trains without the
teacher in memory (for a teacher that does not fit beside the student)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsc import parallel
from dsc.distill.losses import teacher_topk


@torch.no_grad()
def compute(teacher, blocks: torch.Tensor, k: int, temperature: float, batch_size: int,
            device: torch.device, progress=None) -> dict[str, torch.Tensor]:
    """The teacher's top-k at `temperature` over `blocks`: (N, L, k) float16 log-probs, (N, L, 1)
    float32 log-mass of the other tokens (exact, computed from the logits), (N, L, k) int32 ids."""
    values, tails, indices = [], [], []
    for begin in range(0, len(blocks), batch_size):
        logits = teacher(input_ids=blocks[begin:begin + batch_size].to(device), use_cache=False).logits
        v, i = teacher_topk(logits, k, temperature)
        values.append(v[..., :k].to(torch.float16).cpu())
        tails.append(v[..., k:].cpu())
        indices.append(i.to(torch.int32).cpu())
        if progress:
            progress(min(begin + batch_size, len(blocks)), len(blocks))
    return {"values": torch.cat(values), "tail": torch.cat(tails), "indices": torch.cat(indices)}


def assemble(values: torch.Tensor, tail: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored rows → what `logit_kd(teacher_top=...)` takes: (k+1 log-probs, token ids)."""
    return torch.cat([values.float(), tail.float()], dim=-1), indices.long()


def load_or_compute(path: Path | None, key: str, make) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached top-k at `path` when it was made for `key`, else `make()` (on rank 0) saved there."""
    if path is None:
        out = make()
    else:
        if parallel.rank() == 0 and not _valid(path, key):
            out = make()
            tmp = path.with_name(f".tmp-{path.name}")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata={"key": key})
            os.replace(tmp, path)
        parallel.barrier()
        out = load_file(path)
    return out["values"], out["tail"], out["indices"]


def _valid(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return (fh.metadata() or {}).get("key") == key
