"""Core stages (evaluate, cast). Compression stages live in dsc.prune, dsc.distill, dsc.quantize."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageOutput:
    """What a stage returns: the (possibly new) model and its metrics."""

    model: Any
    metrics: dict = field(default_factory=dict)
