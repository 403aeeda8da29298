"""`export`: the model as a file for a deployment runtime (GGUF for llama.cpp).

An artifact stage: it leaves the model as it is and writes files, which the runner fingerprints
(sha256 in stage.json), verifies before a resume trusts them, and publishes under OUT/export/.
After writing, the file is read back and every tensor stored from a dsc grid is dequantized by
gguf-py's reference code and compared with the model's weight: the stage fails rather than ship a
file that computes something other than what dsc measured.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from dsc import __version__
from dsc.config import StageConfig
from dsc.errors import DscInputError
from dsc.stages import StageOutput

Kind = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]


class ExportConfig(StageConfig):
    """Write the model for a runtime. `format: gguf`: one GGUF file for llama.cpp (llama-cli,
    llama-server, ollama), also readable by transformers' `from_pretrained(gguf_file=...)`."""

    format: Literal["gguf"] = Field("gguf", description="gguf: llama.cpp's file format")
    file: str = Field("model.gguf", description="file name under OUT/export/")
    weights: Literal["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"] = Field(
        "auto", description="how float linears are stored (q8_0/q4_0/q4_1: rounded by gguf-py as llama-quantize "
                            "does); auto: linears on a dsc grid keep it exactly (4-bit symmetric → Q4_0, asymmetric → "
                            "Q4_1, 8-bit → Q8_0), float ones stay f32")
    embedding: Kind = Field("q8_0", description="how the token embedding and an untied float LM head are stored "
                                                "(tied stays tied)")
    requantize: bool = Field(False, description="re-round grids GGUF cannot hold exactly (3-bit, groups of 16, "
                                                "float32 scales) into its nearest block type, reporting the error it "
                                                "adds; false: refuse them, naming the fix")
    pre_tokenizer: str | None = Field(None, description="llama.cpp's pre-tokenizer name (llama-bpe, qwen2, smollm, "
                                                        "gpt-2, ...); default: the teacher GGUF's, or recognized from "
                                                        "the tokenizer")

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        if not v.endswith(".gguf") or "/" in v or "\\" in v or v.startswith(".") or not v[:-5]:
            raise ValueError(f"must be a plain file name ending in .gguf (it lands in OUT/export/), got {v!r}")
        return v


def export_gguf(model, tokenizer, path: str | Path, cfg: ExportConfig | None = None, *, provenance: dict | None = None,
                teacher_gguf: Path | None = None, name: str = "dsc model", log=None) -> dict:
    """Write `model` (a dsc model: float, or on a dsc grid) with `tokenizer` as a GGUF file at
    `path`, atomically; returns what was written (bytes, tensor types, grid check). Usable from a
    notebook as it is."""
    from dsc.export import gguf as G

    cfg = cfg or ExportConfig()
    path = Path(path)
    t0 = time.perf_counter()
    plan = G.plan(model, cfg.weights, cfg.embedding, cfg.requantize)
    pre = cfg.pre_tokenizer or (G.teacher_pre_tokenizer(teacher_gguf) if teacher_gguf else None)
    tok = G.tokenizer_metadata(tokenizer, model.config.vocab_size, pre)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        G.write(tmp, model, plan, tok, name, {"version": __version__, **(provenance or {})})
        checked = _check(tmp, plan)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    out = {"format": "gguf", "file": path.name, "architecture": plan.arch, "file_bytes": path.stat().st_size,
           "pre_tokenizer": tok["pre"], "grid_tensors_checked": checked, "seconds": round(time.perf_counter() - t0, 3),
           **plan.summary()}
    if log is not None:
        log.info("exported %s: %.1f MB, %s", path.name, out["file_bytes"] / 1e6, out["tensor_types"],
                 extra={"event": "export", "file": str(path), "bytes": out["file_bytes"]})
    return out


@torch.no_grad()
def _check(path: Path, plan) -> int:
    """Dequantize every grid tensor of the written file (gguf-py's reference code) and compare it
    with the weight it came from, bit for bit; returns how many were checked."""
    from dsc.export import gguf as G
    from gguf import GGUFReader

    by_name = {t.name: t for t in plan.tensors if t.how == "grid"}
    checked = 0
    for t in GGUFReader(str(path)).tensors:
        ours = by_name.get(t.name)
        if ours is None:
            continue
        w = ours.expected.float()
        back = torch.from_numpy(G.dequantize(t.data, ours.kind, w.shape))
        if not torch.equal(back, w):
            raise RuntimeError(f"GGUF export: {t.name} does not dequantize to {ours.source} "
                               f"(max difference {(back - w).abs().max().item():.3g}); this is a dsc bug")
        checked += 1
    return checked


def apply(model, cfg: ExportConfig, ctx) -> StageOutput:
    if ctx.artifact_dir is None:
        raise DscInputError("export", "the export stage writes into a run directory: from Python, call "
                            "dsc.export.export_gguf(model, tokenizer, path) instead")
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    metrics = export_gguf(model, ctx.tokenizer, ctx.artifact_dir / cfg.file, cfg, provenance=ctx.provenance,
                          teacher_gguf=ctx.teacher_file, name=ctx.provenance.get("name", "dsc model"), log=ctx.log)
    return StageOutput(model, metrics)
