"""Run by tests/test_distill.py under `torchrun --nproc-per-node 2` (gloo, CPU): distills a tiny
student with DDP or FSDP and saves rank 0's result. Not a test module itself."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_distill import perturbed, tiny_ctx  # noqa: E402
from conftest import make_model, make_tokenizer  # noqa: E402
from dsc.distill import DistillConfig, apply  # noqa: E402
from dsc import parallel  # noqa: E402


def run(mode: str, batch_size: int, out: Path, work: Path | None = None) -> dict:
    tok = make_tokenizer()
    teacher = make_model("llama", len(tok))
    ctx = tiny_ctx(tok, teacher, work)
    cfg = DistillConfig(steps=6, lr=3e-3, batch_size=batch_size, grad_accum=2, save_every=3, eval_batches=2,
                        features=0.5, ce=0.5, parallel=mode)
    result = apply(perturbed(teacher), cfg, ctx)
    if parallel.rank() == 0:
        torch.save({"state": result.model.state_dict(), "metrics": result.metrics}, out)
    return result.metrics


if __name__ == "__main__":
    mode, batch, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    run(mode, batch, out, Path(sys.argv[4]) if len(sys.argv) > 4 else None)
    parallel.exit_process(0)
