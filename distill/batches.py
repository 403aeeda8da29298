"""Deterministic data order for the training loop. Sample n of the run is block
perm_epoch[n mod N] with a permutation seeded by (seed, epoch); step s, micro-batch m and rank r
read samples ((s·A + m)·W + r)·B … +B. The position is therefore just the step: a resumed run
reads what the uninterrupted one would have, and W processes × B sequences read the same samples
as one process × W·B."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batches:
    blocks: torch.Tensor  # (N, L) int64
    batch_size: int
    grad_accum: int
    seed: int
    rank: int = 0
    world: int = 1
    teacher_top: tuple[torch.Tensor, ...] | None = None  # precomputed teacher top-k rows (teacher_cache)

    def __post_init__(self):
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world * self.blocks.shape[1]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=g)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> torch.Tensor:
        first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
        n = torch.arange(first, first + self.batch_size)
        epochs, pos = n // len(self.blocks), n % len(self.blocks)
        return torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)])

    def get(self, step: int, micro: int, device: torch.device):
        idx = self.indices(step, micro)
        return self.blocks[idx].to(device), self._top(idx, device)

    def _top(self, idx: torch.Tensor, device: torch.device):
        if self.teacher_top is None:
            return None
        from dsc.distill.teacher_cache import assemble

        return tuple(t.to(device) for t in assemble(*(t[idx] for t in self.teacher_top)))

    def held_out(self, i: int, device: torch.device):
        """The i-th evaluation micro-batch of this rank, in order (no shuffling)."""
        first = (i * self.world + self.rank) * self.batch_size
        idx = torch.arange(first, first + self.batch_size) % len(self.blocks)
        return self.blocks[idx].to(device), self._top(idx, device)
