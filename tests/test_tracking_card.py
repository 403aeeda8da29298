"""Experiment trackers (MLflow with a SQLite store, TensorBoard event files), read back through
each library's own reader, also across a kill -9 and a resume; model cards read with
huggingface_hub; `dsc push` without a network."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from dsc.errors import DscInputError
from dsc.recipe import validate

STEPS = 10
EVAL = {"context_length": 32, "prompt_length": 8, "decode_tokens": 2, "repeats": 1}
# Step 6 is reported (after the checkpoint at 4), then the process waits to be killed.
STALL_AFTER_6 = ("import sys, time, dsc.distill.loop as l; f = l.Loop.report; "
                 "l.Loop.report = lambda self, *a: (f(self, *a), self.step == 6 and time.sleep(120))[0]; "
                 "from dsc.cli import main; sys.exit(main())")


def _recipe(tmp_path: Path, model_dir: Path, text_file: Path, tracking: dict, distill_first: bool = False) -> Path:
    """evaluate → distill → evaluate; or distill → evaluate (killed in the first stage, nothing
    finished yet: the tracked run must survive that too)."""
    distill = {"distill": {"steps": STEPS, "save_every": 4, "log_every": 1, "eval_every": 5, "batch_size": 2,
                           "lr": 3e-3, "eval_batches": 1}}
    evaluate = {"evaluate": {**EVAL, "split": "eval"}}
    raw = {"teacher": str(model_dir), "output": str(tmp_path / "out"), "tracking": tracking,
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32,
                          "splits": {"train": 0.75, "eval": 0.25}}},
           "stages": [distill, evaluate] if distill_first else [evaluate, distill, evaluate]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _killed_then_resumed(recipe: Path, out: Path) -> None:
    """One attempt SIGKILLed after step 6 was tracked (2 steps past its checkpoint), then a rerun."""
    cwd = out.parent / "cwd"  # the job's working folder: nothing may land there (MLflow's ./mlruns)
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STALL_AFTER_6, "--log-format", "json", "run", str(recipe)],
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        seen.append(line)
        if '"train_progress"' in line and json.loads(line).get("step") == 6:
            break
        if time.monotonic() > deadline:
            break
    assert proc.poll() is None, "".join(seen)[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob("work/*/checkpoint/meta.json")), "no checkpoint before the kill"
    res = run_cli("--log-format", "json", "run", recipe, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(cwd.iterdir()), list(cwd.iterdir())
    events = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]  # the trackers print no text
    assert any(e.get("event") == "train_resume" and e["step"] == 4 for e in events)


def test_mlflow_sqlite_tracks_each_step_once_across_a_kill(llama_dir, text_file, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = _recipe(tmp_path, llama_dir, text_file, {"backend": "mlflow", "uri": "sqlite:///mlflow.db",
                                                       "experiment": "tiny"})
    out = tmp_path / "out"
    _killed_then_resumed(recipe, out)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # relative to the recipe's folder
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resumed run must continue the tracked run, not start another"
    run = runs[0]
    assert run.info.run_id == json.loads((out / "tracking.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    for key in ("01-distill/loss", "01-distill/kl", "01-distill/lr", "01-distill/tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, STEPS + 1)), key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "01-distill/eval/ppl")) == [0, 5, 10]
    ppl = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/perplexity")}
    metrics = {i: json.loads((out / "stages" / f"{i:02d}-evaluate" / "metrics.json").read_text()) for i in (0, 2)}
    assert ppl == {0: pytest.approx(metrics[0]["model"]["perplexity"]), 2: pytest.approx(metrics[2]["model"]["perplexity"])}
    assert client.get_metric_history(run.info.run_id, "teacher/perplexity")[0].value == \
        pytest.approx(metrics[0]["teacher"]["perplexity"])
    assert len(client.get_metric_history(run.info.run_id, "stages/02-evaluate/model/perplexity")) == 1
    params = run.data.params
    assert params["versions.transformers"] and params["recipe.stages.1.distill.steps"] == str(STEPS)
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_tensorboard_tracks_each_step_once_across_a_kill(llama_dir, text_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _recipe(tmp_path, llama_dir, text_file, {"backend": "tensorboard"})
    out = tmp_path / "out"
    _killed_then_resumed(recipe, out)
    _tensorboard_steps_once(out, "01-distill")
    evals = EventAccumulator(str(out / "tensorboard" / "eval"))
    evals.Reload()
    final = json.loads((out / "stages" / "02-evaluate" / "metrics.json").read_text())["model"]["perplexity"]
    assert [e.step for e in evals.Scalars("perplexity")] == [0, 2]
    assert evals.Scalars("perplexity")[-1].value == pytest.approx(final, rel=1e-6)
    stages = EventAccumulator(str(out / "tensorboard" / "stages"))
    stages.Reload()
    assert [e.step for e in stages.Scalars("01-distill/tokens_per_s")] == [1]
    run = EventAccumulator(str(out / "tensorboard" / "run"))
    run.Reload()
    assert "recipe/text_summary" in run.Tags()["tensors"]


def _tensorboard_steps_once(out: Path, scope: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train = EventAccumulator(str(out / "tensorboard" / scope))
    train.Reload()
    assert len(list((out / "tensorboard" / scope).glob("events.*"))) == 2  # one file per attempt
    for tag in ("loss", "kl", "lr", "tokens_per_s"):
        assert [e.step for e in train.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    assert [e.step for e in train.Scalars("eval/ppl")] == [0, 5, 10]


@pytest.mark.parametrize("backend", [pytest.param("mlflow", marks=pytest.mark.slow), "tensorboard"])
def test_killed_in_the_first_stage_keeps_the_tracked_run(backend, llama_dir, text_file, tmp_path):
    """Killed while the first stage trains (no stage finished): the rerun resumes the training
    checkpoint and the tracked run it logged to."""
    recipe = _recipe(tmp_path, llama_dir, text_file, {"backend": backend}, distill_first=True)
    out = tmp_path / "out"
    _killed_then_resumed(recipe, out)
    if backend == "tensorboard":
        _tensorboard_steps_once(out, "00-distill")
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dsc").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "00-distill/loss")] == list(range(1, STEPS + 1))


def test_tracking_fields_are_checked_per_backend(llama_dir, text_file, tmp_path):
    raw = yaml.safe_load(_recipe(tmp_path, llama_dir, text_file, {"backend": "tensorboard"}).read_text())
    for tracking, message in [({"backend": "tensorboard", "uri": "sqlite:///x.db"}, "`uri` is for backend mlflow"),
                              ({"backend": "mlflow", "dir": "tb"}, "`dir` is for backend tensorboard"),
                              ({"backend": "wandb"}, "tracking.backend"),
                              ({"backend": "mlflow", "experment": "x"}, "experiment")]:
        with pytest.raises(DscInputError, match=message):
            validate({**raw, "tracking": tracking}, base_dir=tmp_path)


# -- model cards -------------------------------------------------------------------------------------

def test_model_cards_parse_with_huggingface_hub(llama_dir, text_file, tmp_path):
    """OUT/model and the checkpoint carry a Hub card: metadata, the evaluation table with its
    protocol, the stages and the recipe; the license comes from the teacher's own card."""
    import shutil

    from huggingface_hub import ModelCard

    from dsc.runner import run_recipe

    teacher = tmp_path / "teacher"
    shutil.copytree(llama_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n# a teacher\n")
    raw = {"teacher": str(teacher), "output": str(tmp_path / "out"),
           "data": {"t": {"type": "text", "path": str(text_file), "block_size": 32, "splits": {"eval": 1.0}}},
           "stages": [{"evaluate": EVAL}, {"cast": {"dtype": "bfloat16"}}, {"evaluate": EVAL}]}
    out = run_recipe(validate(raw, base_dir=tmp_path))
    card = ModelCard.load(out / "model" / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "mit" and data.base_model is None  # a local teacher has no Hub id
    assert {"dsc", "cast"} <= set(data.tags)
    final = json.loads((out / "stages" / "02-evaluate" / "metrics.json").read_text())["model"]["perplexity"]
    (ppl,) = [r for r in data.eval_results if r.metric_type == "perplexity"]
    assert ppl.metric_value == pytest.approx(final, abs=1e-4) and ppl.dataset_name == "t"
    assert "| teacher |" in card.text and "Protocol: perplexity on data `t`" in card.text
    assert "| 1 | cast |" in card.text and "```yaml" in card.text and "bfloat16" in card.text
    ckpt = ModelCard.load(out / "stages" / "01-cast" / "model" / "README.md")
    assert ckpt.data.model_name.endswith("stage 1 (cast)") and ckpt.data.eval_results is None
    # the checkpoint's card is part of what the stage recorded: a rerun verifies it and changes nothing
    assert "README.md" in json.loads((out / "stages" / "01-cast" / "stage.json").read_text())["files"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "model" in p.parts}
    stamp = (out / "stages" / "01-cast" / "stage.json").stat().st_mtime_ns
    run_recipe(validate(raw, base_dir=tmp_path))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "model" in p.parts} == before
    assert (out / "stages" / "01-cast" / "stage.json").stat().st_mtime_ns == stamp


def test_embedded_teacher_card_facts():
    from dsc.models import ModelRef, card_facts, resolve

    ref = ModelRef(path="default")
    try:
        source = resolve(ref, Path("."))
    except DscInputError:
        pytest.skip("the embedded teacher's package is not installed")
    assert card_facts(ref, source) == {"path": "default", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                       "license": "apache-2.0"}


def test_quantized_card_metadata(tmp_path):
    from huggingface_hub import ModelCard

    from dsc import hub

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4}, "input_activations": None}}}}))
    quant = hub.quantization(tmp_path)
    assert quant == {"quant_method": "compressed-tensors", "format": "pack-quantized", "weight_bits": [4],
                     "activation_bits": []}
    text = hub.card_text(title="x", teacher={"path": "org/m", "hub_id": "org/m", "license": None},
                         stages=[{"index": 0, "name": "awq", "config": {"bits": 4}}], tables=[], own_rows=[],
                         quant=quant, recipe_yaml="stages: []", version="0")
    hub.write_card(tmp_path, text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/m" and {"awq", "4-bit", "compressed-tensors"} <= set(card.data.tags)
    assert card.data.quantization["weight_bits"] == [4] and "weights 4-bit" in card.text


def test_push_without_network_exits_4_with_a_message(tmp_path):
    folder = tmp_path / "out" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    res = run_cli("push", tmp_path / "out", "me/lite", env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}, timeout=120)
    assert res.returncode == 4, res.stderr
    assert "could not push" in res.stderr and "me/lite" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("push", tmp_path, "me/lite", env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 2 and "no config.json" in res.stderr
