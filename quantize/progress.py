"""Layer-by-layer progress of a calibrated stage, in the stage's work folder: a run killed during
calibration restarts after the last finished layer, not from layer 0 (hours on a large model).
The quantizers and prune's least-squares refit (dsc.prune.reconstruct) both keep it.

After each layer: `layer-NNNN.pt` (the layer's state — quantized, norms with folded scales
included, or pruned and refit — and what the stage records of it), then `inputs.pt` (the next
layer's inputs), then `meta.json`, renamed into place last, which says how far the work got. The
runner keys the work folder by the stage's fingerprint (recipe, model, data), so a changed run
never reads it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file renamed into place: a kill never leaves half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Progress:
    def __init__(self, work_dir: Path | None):
        self.dir = None if work_dir is None else Path(work_dir) / "layers"

    def finished(self) -> int:
        """Index of the last finished layer (-1: none)."""
        meta = self.dir / "meta.json" if self.dir else None
        return json.loads(meta.read_text())["layer"] if meta and meta.is_file() else -1

    def save(self, index: int, layer: nn.Module, done: dict, searches: list, inputs) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"state": layer.state_dict(), "done": done, "searches": searches}
        atomic_save(state, self.dir / f"layer-{index:04d}.pt")
        atomic_save(inputs, self.dir / "inputs.pt")
        tmp = self.dir / ".tmp-meta.json"
        tmp.write_text(json.dumps({"layer": index}))
        os.replace(tmp, self.dir / "meta.json")

    def restore(self, index: int, layer: nn.Module) -> tuple[dict, list]:
        saved = torch.load(self.dir / f"layer-{index:04d}.pt", map_location="cpu", weights_only=False)
        layer.load_state_dict(saved["state"])
        return saved["done"], saved["searches"]

    def inputs(self, device: torch.device):
        return torch.load(self.dir / "inputs.pt", map_location=device, weights_only=False)
