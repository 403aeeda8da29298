"""`dsc run`: run directory layout, resume, refusal of a changed recipe, lock, kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from dsc.errors import DscInputError, ExitCode
from dsc.recipe import validate
from dsc.rundir import RunDir
from dsc.runner import run_recipe

EVAL = {"context_length": 32, "prompt_length": 16, "decode_tokens": 4, "repeats": 1}


def recipe_dict(model_dir: Path, text_file: Path, out: Path, stages=None) -> dict:
    return {"teacher": str(model_dir), "output": str(out),
            "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                           "splits": {"train": 0.5, "eval": 0.5}}},
            "stages": stages or [{"evaluate": EVAL}, {"cast": {"dtype": "bfloat16"}}, {"evaluate": EVAL}]}


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_writes_run_directory(tiny_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_recipe(validate(recipe_dict(tiny_dir, text_file, out), base_dir=tmp_path))
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["00-evaluate", "01-cast", "02-evaluate"]
    for name in ("recipe.yaml", "manifest.json", "metrics.json", "report.md", "quality_vs_size.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"dsc", "torch", "transformers"} <= set(manifest["versions"])
    assert {"teacher", "data", "seed", "recipe"} <= set(manifest["fingerprints"])
    lite = AutoModelForCausalLM.from_pretrained(out / "model", dtype="auto")
    assert lite.dtype == torch.bfloat16
    ckpt = out / "stages" / "01-cast" / "model" / "model.safetensors"
    assert (out / "model" / "model.safetensors").read_bytes() == ckpt.read_bytes()
    assert not os.path.samefile(out / "model" / "model.safetensors", ckpt)  # a copy: editing it spares resume
    report = (out / "report.md").read_text()
    assert "| teacher |" in report and "after cast" in report and "context 32" in report
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["evaluations"][0]["rows"]
    assert rows[-1]["weight_bytes"] * 2 == rows[0]["weight_bytes"]


def test_rerun_resumes_and_changed_recipe_refuses(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    raw = recipe_dict(llama_dir, text_file, out)
    run_recipe(validate(raw, base_dir=tmp_path))
    stamps = {p.name: (p / "stage.json").stat().st_mtime_ns for p in (out / "stages").iterdir()}
    run_recipe(validate(raw, base_dir=tmp_path))  # nothing left to do
    assert stamps == {p.name: (p / "stage.json").stat().st_mtime_ns for p in (out / "stages").iterdir()}

    changed = recipe_dict(llama_dir, text_file, out, [{"evaluate": EVAL}, {"cast": {"dtype": "float16"}}])
    with pytest.raises(DscInputError, match=r"stages\[1\] changed \(cast: dtype: 'bfloat16' -> 'float16'\).*--fresh"):
        run_recipe(validate(changed, base_dir=tmp_path))
    text_file.write_text(text_file.read_text() + " more")
    with pytest.raises(DscInputError, match="the data changed"):
        run_recipe(validate(raw, base_dir=tmp_path))
    run_recipe(validate(changed, base_dir=tmp_path), fresh=True)
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["00-evaluate", "01-cast"]
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float16"


def test_appended_stage_resumes(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, [{"cast": {}}]), base_dir=tmp_path))
    first = (out / "stages" / "00-cast" / "stage.json").stat().st_mtime_ns
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, [{"cast": {}}, {"evaluate": EVAL}]), base_dir=tmp_path))
    assert (out / "stages" / "00-cast" / "stage.json").stat().st_mtime_ns == first
    assert (out / "stages" / "01-evaluate" / "metrics.json").is_file()


def test_lock_refuses_second_run(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(llama_dir, text_file, out))
    holder = RunDir(out)
    holder.acquire()
    try:
        res = run_cli("run", recipe)
    finally:
        holder.release()
    assert res.returncode == ExitCode.BAD_INPUT
    assert "in use by another dsc run" in res.stderr
    assert not (out / "stages").exists()


# The first attempt's evaluate stage waits to be killed (or stopped); the rerun runs it at full speed.
SLOW_EVALUATE = ("import sys, time, dsc.registry as r, dataclasses as d; e = r.STAGES['evaluate']; "
                 "r.STAGES['evaluate'] = d.replace(e, apply=lambda *a: (time.sleep(120), e.apply(*a))[1]); "
                 "from dsc.cli import main; sys.exit(main())")


def test_kill_mid_run_resumes_without_redoing(llama_dir, text_file, tmp_path):
    """kill -9 while stage 1 runs; the rerun keeps stage 0 and finishes."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(llama_dir, text_file, out, [{"cast": {}}, {"evaluate": EVAL}]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVALUATE, "run", str(recipe)], stderr=subprocess.PIPE, text=True)
    first = out / "stages" / "00-cast" / "stage.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed: make stage 1 slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "01-evaluate").exists()
    stamp = first.stat().st_mtime_ns
    res = run_cli("run", recipe)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    assert first.stat().st_mtime_ns == stamp
    assert (out / "stages" / "01-evaluate" / "metrics.json").is_file()
    assert not list((out / "stages").glob(".tmp-*"))


def test_sigterm_exits_3_and_resumes(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(llama_dir, text_file, out, [{"cast": {}}, {"evaluate": EVAL}]))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVALUATE, "--log-format", "json", "run", str(recipe)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "stages" / "00-cast").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert events and events[-1]["exit_code"] == 3
    assert not list((out / "stages").glob(".tmp-*"))
    stamp = (out / "stages" / "00-cast" / "stage.json").stat().st_mtime_ns
    res = run_cli("run", recipe)
    assert res.returncode == 0 and "resuming" in res.stderr, res.stderr
    assert (out / "stages" / "00-cast" / "stage.json").stat().st_mtime_ns == stamp
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["from_stage"] for s in manifest["starts"]] == [0, 1]


def test_final_model_follows_the_last_checkpoint(llama_dir, text_file, tmp_path):
    """A run killed between its last stage and publishing OUT/model republishes on rerun."""
    out = tmp_path / "out"
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, [{"cast": {}}]), base_dir=tmp_path))
    stale = (out / "model" / "dsc_source.json").read_text()
    two = recipe_dict(llama_dir, text_file, out, [{"cast": {}}, {"cast": {"dtype": "float16"}}])
    run_recipe(validate(two, base_dir=tmp_path))
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float16"
    (out / "model" / "dsc_source.json").write_text(stale)  # as if killed before publishing
    (out / "model" / "config.json").write_text('{"stale": true}')
    run_recipe(validate(two, base_dir=tmp_path))
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float16"


def test_changed_checkpoint_is_rebuilt_on_resume(llama_dir, text_file, tmp_path):
    """A checkpoint edited after its stage wrote it is not resumed from: the rerun rebuilds it
    (and what follows) from the last sound stage."""
    out = tmp_path / "out"
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, [{"cast": {}}]), base_dir=tmp_path))
    weights = out / "stages" / "00-cast" / "model" / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "ab") as fh:
        fh.write(b"\0")
    longer = recipe_dict(llama_dir, text_file, out, [{"cast": {}}, {"evaluate": EVAL}])
    run_recipe(validate(longer, base_dir=tmp_path))
    assert weights.read_bytes() == good
    assert (out / "stages" / "01-evaluate" / "metrics.json").is_file()


def test_iterative_pruning_records_each_plan(llama_dir, text_file, tmp_path):
    """Prune a little, evaluate, prune again: each step's plan is in its stage folder."""
    out = tmp_path / "out"
    prune = {"prune": {"channels": 0.25, "data": "t", "split": "train", "num_samples": 4}}
    run_recipe(validate(recipe_dict(llama_dir, text_file, out, [prune, {"evaluate": EVAL}, prune]),
                        base_dir=tmp_path))
    first = json.loads((out / "stages" / "00-prune" / "plan.json").read_text())
    second = json.loads((out / "stages" / "02-prune" / "plan.json").read_text())
    assert first["config"]["intermediate_size"] == 48 and second["config"]["intermediate_size"] == 36
    assert json.loads((out / "model" / "config.json").read_text())["intermediate_size"] == 36


def test_fields_at_their_defaults_keep_the_fingerprint(llama_dir, text_file, tmp_path):
    """A dsc upgrade that adds a stage field (at its default) must not block resuming a run;
    a field set to another value must."""
    from dsc.runner import fingerprints

    def chain(stage):
        raw = {"teacher": str(llama_dir), "output": str(tmp_path / "out"), "stages": [stage],
               "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32, "splits": {"eval": 1.0}}}}
        return fingerprints(validate(raw, base_dir=tmp_path))[1]

    plain = chain({"evaluate": {"context_length": 32}})
    assert chain({"evaluate": {"context_length": 32, "tasks": {}, "speed": True}}) == plain
    assert chain({"evaluate": {"context_length": 32, "speed": False}}) != plain


def test_edited_task_file_reruns_the_evaluation(llama_dir, text_file, tmp_path):
    """A zero-shot file edited between runs changes the stage's fingerprint (its numbers would be stale)."""
    from dsc.runner import fingerprints

    items = tmp_path / "mc.jsonl"
    items.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 0}) + "\n")
    raw = {"teacher": str(llama_dir), "output": str(tmp_path / "out"),
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32, "splits": {"eval": 1.0}}},
           "stages": [{"evaluate": {"context_length": 32, "tasks": {"mc": {"type": "multiple_choice", "path": "mc.jsonl"}}}}]}
    before = fingerprints(validate(raw, base_dir=tmp_path))[1]
    items.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 1}) + "\n")
    assert fingerprints(validate(raw, base_dir=tmp_path))[1] != before
