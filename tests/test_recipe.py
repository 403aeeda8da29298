"""Recipe validation: every error names its path and the fix; every shipped recipe validates."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED, run_cli
from dsc.errors import DscInputError, ExitCode
from dsc.recipe import validate


def base(tmp_path: Path, text_file: Path, **over) -> dict:
    recipe = {"teacher": str(tmp_path), "data": {"wiki": {"type": "text", "path": str(text_file)}},
              "stages": [{"evaluate": {"data": "wiki"}}], "output": str(tmp_path / "out")}
    (tmp_path / "config.json").write_text("{}")
    recipe.update(over)
    return recipe


BAD = [  # (change to the base recipe, path in the message, words in the message)
    ({"stages": [{"evaluate": {"contxt_length": 128}}]}, "stages[0].evaluate.contxt_length",
     "did you mean context_length"),
    ({"stages": [{"evaluate": {"context_length": "long"}}]}, "stages[0].evaluate.context_length", "must be an integer"),
    ({"stages": [{"evaluate": {"context_length": 0}}]}, "stages[0].evaluate.context_length", "must be > 1, got 0"),
    ({"stages": [{"evaluate": {"context_length": 64, "stride": 128}}]}, "stages[0].evaluate", "stride (128)"),
    ({"stages": [{"evaluate": {"split": "test"}}]}, "stages[0].evaluate.split", "must be one of"),
    ({"stages": [{"evalute": {}}]}, "stages[0]", "did you mean evaluate"),
    ({"stages": [{"cast": {"dtype": "int4"}}]}, "stages[0].cast.dtype", "must be one of"),
    ({"stages": []}, "stages", "non-empty list"),
    ({"stages": [{"evaluate": {}, "cast": {}}]}, "stages[0]", "one stage name"),
    ({"stages": [{"evaluate": {"data": "wik"}}]}, "stages[0].evaluate.data", "did you mean wiki"),
    ({"stagez": []}, "stagez", "did you mean stages"),
    ({"seed": "x"}, "seed", "must be an integer"),
    ({"device": "tpu"}, "device", "must be auto, cpu"),
    ({"teacher": "/no/such/model"}, "teacher.path", "neither an existing directory"),
    ({"teacher": {"path": "/no/such.gguf"}}, "teacher.path", "GGUF file not found"),
    ({"teacher": {"path": "org/model", "trust_remote_cod": True}}, "teacher.trust_remote_cod",
     "did you mean trust_remote_code"),
    ({"data": {"wiki": {"type": "txt", "path": "x"}}}, "data.wiki.type", "did you mean text"),
    ({"data": {"wiki": {"type": "text", "path": "/no/file.txt"}}}, "data.wiki.path", "file not found"),
    ({"data": {"wiki": {"type": "text", "path": "x", "block_sise": 4}}}, "data.wiki.block_sise",
     "did you mean block_size"),
    ({"data": {"wiki": {"type": "teacher", "splits": {"eval": 0.5}}}}, "data.wiki.splits", "sum to 1"),
    ({"data": {"wiki": {"type": "teacher", "splits": {"test": 1.0}}}}, "data.wiki.splits", "unknown split"),
    ({"data": {"wiki": {"type": "teacher", "splits": {"train": 1.0}}}}, "stages[0].evaluate.split",
     "gives split 'eval' no blocks"),
    ({"output": {"dir": "x", "save": True}}, "output.save", "did you mean save_model"),
    ({"seed": -1}, "seed", "must be >= 0"),
    ({"data": {"wiki": {"type": ["text"]}}}, "data.wiki.type", "must be one of"),
    ({"stages": [{"evaluate": {"context_length": 1024}}]}, "stages[0].evaluate.context_length",
     "block_size (512): windows would join blocks"),
    ({"data": {"wiki": {"type": "teacher", "num_sequences": 2, "length": 10}}}, "data.wiki",
     "22 tokens < block_size (512)"),
    ({"data": {"wiki": {"type": "text", "path": "x", "max_tokens": 100}}}, "data.wiki", "max_tokens (100) < block_size"),
]


@pytest.mark.parametrize("change,path,words", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_recipe_names_path_and_fix(tmp_path, text_file, change, path, words):
    with pytest.raises(DscInputError) as info:
        validate(base(tmp_path, text_file, **change), base_dir=tmp_path)
    lines = str(info.value).splitlines()
    assert any(line.startswith(path + ":") and words in line for line in lines), lines


def test_context_beyond_teacher_positions(tmp_path, text_file):
    raw = base(tmp_path, text_file, stages=[{"evaluate": {"context_length": 128, "split": "all"}}])
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 64}')
    with pytest.raises(DscInputError, match=r"stages\[0\]\.evaluate\.context_length: 128 exceeds the teacher's"):
        validate(raw, base_dir=tmp_path)


def test_cli_output_override_keeps_output_fields(tmp_path, text_file):
    from dsc.recipe import load_recipe

    raw = base(tmp_path, text_file, output={"dir": "a", "save_model": False})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml", output=str(tmp_path / "b"))
    assert recipe.output.dir == str(tmp_path / "b") and recipe.output.save_model is False


def test_all_problems_reported_at_once(tmp_path, text_file):
    recipe = base(tmp_path, text_file, seed="x", stages=[{"evaluate": {"contxt_length": 1, "stride": -1}}])
    with pytest.raises(DscInputError) as info:
        validate(recipe, base_dir=tmp_path)
    assert len(str(info.value).splitlines()) == 3


def test_valid_recipe_fills_defaults(tmp_path, text_file):
    recipe = validate(base(tmp_path, text_file, stages=["evaluate", {"cast": None}, "evaluate"]), base_dir=tmp_path)
    assert [s.name for s in recipe.stages] == ["evaluate", "cast", "evaluate"]  # the same stage twice
    resolved = recipe.to_dict()
    assert resolved["stages"][1] == {"cast": {"dtype": "bfloat16"}}
    assert resolved["data"]["wiki"]["block_size"] == 512
    assert validate(resolved | {"output": resolved["output"]}, base_dir=tmp_path).to_dict() == resolved


def test_configs_are_frozen(tmp_path, text_file):
    recipe = validate(base(tmp_path, text_file), base_dir=tmp_path)
    with pytest.raises(Exception):
        recipe.stages[0].config.context_length = 3


def test_no_data_means_teacher_generated(tmp_path, text_file):
    raw = base(tmp_path, text_file, stages=["evaluate"])
    del raw["data"]
    recipe = validate(raw, base_dir=tmp_path)
    assert recipe.data["generated"].type == "teacher"


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    from dsc.recipe import load_recipe

    if "shared/" in path.read_text() and not SHARED.is_dir():
        pytest.skip("recipe reads ../shared, absent here")
    recipe = load_recipe(path)
    assert recipe.stages


def test_validate_cli_exit_codes(tmp_path, text_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(tmp_path, text_file, stages=[{"evaluate": {"contxt_length": 2}}])))
    res = run_cli("validate", bad)
    assert res.returncode == ExitCode.BAD_INPUT
    assert "stages[0].evaluate.contxt_length: unknown field; did you mean context_length?" in res.stderr
    assert run_cli("validate", tmp_path / "missing.yaml").returncode == ExitCode.BAD_INPUT
    (tmp_path / "broken.yaml").write_text("stages: [evaluate\n")
    res = run_cli("validate", tmp_path / "broken.yaml")
    assert res.returncode == ExitCode.BAD_INPUT and "not valid YAML" in res.stderr
