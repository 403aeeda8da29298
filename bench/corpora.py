"""The benchmarks' text, read from ../shared/data: WikiText-2 valid (evaluation) and the C4
validation subset (calibration, training), tokenized the same way by every benchmark."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dsc.data.pipeline import tokenize_documents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def wikitext(tok, n_tokens: int) -> torch.Tensor:
    """WikiText-2 raw validation, non-empty lines joined by blank lines: the first `n_tokens`."""
    text = (SHARED / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    return tokenize_documents(["\n\n".join(line for line in text.splitlines() if line.strip())], tok, None)[:n_tokens]


def c4(tok, n_tokens: int) -> torch.Tensor:
    """The C4 validation subset, documents joined by EOS in file order: the first `n_tokens`."""
    with open(SHARED / "c4-validation-subset" / "c4_validation_2k.jsonl") as fh:
        return tokenize_documents((json.loads(line)["text"] for line in fh), tok, n_tokens)


def lambada(tok, n_tokens: int) -> torch.Tensor:
    """LAMBADA (OpenAI's test set: book passages), passages joined by EOS in file order: the first
    `n_tokens`. Text no calibration set here contains."""
    with open(SHARED / "lambada_openai" / "lambada_test.jsonl") as fh:
        return tokenize_documents((json.loads(line)["text"] for line in fh), tok, n_tokens)
