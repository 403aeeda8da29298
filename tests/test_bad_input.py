"""Bad input never crashes and never destroys. Recipes damaged class by class (from a tiny base
and from every shipped recipe) exit 2 naming the field, with no traceback; damaged run
directories are detected on rerun and rebuilt from the last sound stage; a folder holding other
people's files is refused and left untouched."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED
from dsc import cli
from dsc.errors import DscInputError
from dsc.recipe import load_recipe, validate
from dsc.runner import run_recipe

EVAL = {"context_length": 32, "prompt_length": 8, "decode_tokens": 2, "repeats": 1}


def _base_text(model_dir: Path, text_file: Path, out: Path) -> str:
    return f"""teacher: {model_dir}
data:
  t: {{type: text, path: {text_file}, block_size: 32, splits: {{calibration: 0.5, train: 0.25, eval: 0.25}}}}
stages:
  - evaluate: {{context_length: 32, prompt_length: 8, decode_tokens: 2, repeats: 1}}
  - cast: {{dtype: bfloat16}}
output: {out}
"""


def _validate_cli(path: Path, capsys) -> tuple[int, str]:
    code = cli.main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# (name, how the base recipe text changes, path named in the message, words in it)
TEXT_CASES = [
    ("duplicate key in a stage", lambda t: t.replace("dtype: bfloat16", "dtype: bfloat16, dtype: float16"),
     "stages[1].cast.dtype", "duplicate key"),
    ("stages twice", lambda t: t + "stages:\n  - evaluate: {}\n", "stages", "duplicate key"),
    ("a data source twice", lambda t: t.replace("stages:", "  t: {type: text, path: x}\nstages:", 1),
     "data.t", "duplicate key"),
    ("a source named yes", lambda t: t.replace("  t: {type", "  yes: {type"), "data.yes", "quote it"),
    ("a source named 2024", lambda t: t.replace("  t: {type", "  2024: {type"), "data.2024", "must be text"),
    ("deep nesting", lambda t: t.replace("repeats: 1}", "repeats: 1, x: " + "[" * 80 + "]" * 80 + "}"),
     "stages[0].evaluate.x", "nested deeper"),
    ("very deep nesting", lambda t: t + "z: " + "[" * 20000 + "]" * 20000 + "\n", "recipe", "nested too deeply"),
]

# (name, stages replacing the base's, path named, words)
STAGE_CASES = [
    ("a quoted integer", [{"evaluate": {**EVAL, "context_length": "32"}}], "stages[0].evaluate.context_length",
     "without quotes"),
    ("a quoted float", [{"prune": {"ratio": "0.3"}}], "stages[0].prune.ratio", "without quotes"),
    ("1e-4 read as text", [{"distill": {"steps": 1, "lr": "1e-4"}}], "stages[0].distill.lr", "write 1.0e-4"),
    ("a quoted boolean", [{"evaluate": {**EVAL, "speed": "yes"}}], "stages[0].evaluate.speed", "true or false"),
    ("a boolean for an integer", [{"evaluate": {**EVAL, "batch_size": True}}], "stages[0].evaluate.batch_size",
     "not a number"),
    ("an infinite lr", [{"distill": {"steps": 1, "lr": float("inf")}}], "stages[0].distill.lr", "finite"),
    ("an infinite kl", [{"distill": {"steps": 1, "kl": float("inf")}}], "stages[0].distill.kl", "finite"),
    ("a regex that does not compile", [{"prune": {"layers": 0.25, "ignore": ["["]}}], "stages[0].prune.ignore",
     "not a valid regular expression"),
    ("a re: pattern that does not compile", [{"awq": {"group_size": 32, "targets": ["re:("]}}],
     "stages[0].awq.targets", "not a valid regular expression"),
    ("a calibration device that does not exist", [{"awq": {"group_size": 32, "calibration_device": "tpu"}}],
     "stages[0].awq.calibration_device", "cuda:N"),
    ("awq after awq", [{"awq": {"group_size": 32}}, {"awq": {"group_size": 32}}], "stages[1].awq",
     "before stages[0].awq"),
    ("lora after awq", [{"awq": {"group_size": 32}}, {"lora": {"steps": 1}}], "stages[1].lora", "quantize last"),
    ("prune after awq", [{"awq": {"group_size": 32}}, {"prune": {"layers": 0.25}}], "stages[1].prune",
     "quantize last"),
    ("distill after awq", [{"awq": {"group_size": 32}}, {"distill": {"steps": 1}}], "stages[1].distill",
     "quantize last"),
    ("int8 after awq", [{"awq": {"group_size": 32}}, {"int8": {}}], "stages[1].int8", "quantize last"),
    ("rtn after int8", [{"int8": {}}, {"rtn": {"group_size": 32}}], "stages[1].rtn", "int8 weights"),
    ("qat after int8", [{"int8": {}}, {"qat": {"steps": 1, "group_size": 32}}], "stages[1].qat",
     "start it from the float model"),
    ("a prompt longer than the model's context", [{"evaluate": {**EVAL, "prompt_length": 100000}}],
     "stages[0].evaluate.prompt_length", "exceeds the teacher's context"),
]

TOP_CASES = [
    ("a seed that is true", {"seed": True}, "seed", "not a number"),
    ("a device that does not exist", {"device": "cuda:abc"}, "device", "cuda:N"),
    ("a teacher path too long", {"teacher": "/tmp/" + "a" * 300}, "teacher.path", "shorten the path"),
    ("a data path too long", {"data": {"t": {"type": "text", "path": "/tmp/" + "b" * 300}}}, "data.t.path",
     "shorten the path"),
    ("a task path too long", {"stages": [{"evaluate": {**EVAL, "tasks": {"x": {"type": "lambada",
                                                                                "path": "/tmp/" + "c" * 300}}}}]},
     "stages[0].evaluate.tasks.x.path", "shorten the path"),
    ("tracking twice wrong", {"tracking": {"backend": "mlflow", "dir": "x"}}, "tracking", "for backend tensorboard"),
]


@pytest.fixture
def base(llama_dir, text_file, tmp_path):
    text = _base_text(llama_dir, text_file, tmp_path / "out")
    return text, yaml.safe_load(text)


def _check(code: int, text: str, where: str, words: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    assert where in text and words in text, text


@pytest.mark.parametrize("name, change, where, words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_malformed_recipe_text(name, change, where, words, base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(change(base[0]))
    _check(*_validate_cli(path, capsys), where, words)


@pytest.mark.parametrize("name, stages, where, words", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_bad_stage_values_and_orders(name, stages, where, words, base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base[1], "stages": stages}))
    _check(*_validate_cli(path, capsys), where, words)


@pytest.mark.parametrize("name, change, where, words", TOP_CASES, ids=[c[0] for c in TOP_CASES])
def test_bad_top_level_values(name, change, where, words, base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**base[1], **change}))
    _check(*_validate_cli(path, capsys), where, words)


@pytest.mark.parametrize("encoding", ["utf-16", "cp1252", "binary"])
def test_recipe_that_is_not_utf8(encoding, base, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    text = base[0].replace("bfloat16}", "bfloat16}  # café")
    path.write_bytes(os.urandom(64) + b"\0" if encoding == "binary" else text.encode(encoding))
    code, out = _validate_cli(path, capsys)
    _check(code, out, "recipe", "UTF")


def test_valid_orders_still_validate(base, tmp_path):
    ok = [{"awq": {"group_size": 32}}, {"evaluate": EVAL}, {"qat": {"steps": 1, "group_size": 32, "init": "auto"}},
          {"evaluate": EVAL}]
    validate({**base[1], "stages": ok}, base_dir=tmp_path)
    student = {"distill": {"steps": 1, "student": {"config": {"model_type": "llama", "hidden_size": 16,
                                                               "intermediate_size": 32, "num_hidden_layers": 1,
                                                               "num_attention_heads": 2}}}}
    validate({**base[1], "stages": [{"awq": {"group_size": 32}}, student]}, base_dir=tmp_path)


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
MUTATIONS = [  # applied to every shipped recipe's text
    ("duplicate stages", lambda t: t + "\nstages:\n  - evaluate: {}\n", "stages", "duplicate key"),
    ("an unknown tracker", lambda t: t + "\ntracking: {backend: wandb}\n", "tracking.backend", "must be one of"),
    ("a quoted seed", lambda t: t.replace("\nseed: 0", '\nseed: "0"') if "\nseed: 0" in t else t + '\nseed: "0"\n',
     "seed", "without quotes"),
]


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("name, change, where, words", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_shipped_recipes_damaged(recipe, name, change, where, words, tmp_path, capsys):
    if not SHARED.is_dir():
        pytest.skip("the shipped recipes read ../shared")
    path = recipe.parent / f".damaged-{tmp_path.name}.yaml"  # beside it: its relative paths still resolve
    try:
        path.write_text(change(recipe.read_text()))
        _check(*_validate_cli(path, capsys), where, words)
    finally:
        path.unlink(missing_ok=True)


# -- run directories -----------------------------------------------------------------------------

@pytest.fixture
def finished(base, tmp_path):
    """A finished run (evaluate → cast) and its recipe file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(base[0])
    out = run_recipe(load_recipe(recipe))
    return recipe, out


def _rerun(recipe: Path, capsys) -> tuple[int, str]:
    code = cli.main(["--log-format", "json", "run", str(recipe)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _flip(path: Path, at: int) -> None:
    """One byte changed, size and mtime kept: what a stat check cannot see."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_bit_flip_in_a_checkpoint_is_rebuilt(finished, capsys):
    recipe, out = finished
    ckpt = out / "stages" / "01-cast" / "model" / "model.safetensors"
    good = ckpt.read_bytes()
    _flip(ckpt, len(good) - 10)
    code, text = _rerun(recipe, capsys)
    assert code == 0, text
    assert '"event": "damaged"' in text and "stage 1 is damaged" in text
    assert ckpt.read_bytes() == good and _weights(out / "model") == good


def test_damaged_safetensors_header_is_rebuilt(finished, capsys):
    recipe, out = finished
    ckpt = out / "stages" / "01-cast" / "model" / "model.safetensors"
    good = ckpt.read_bytes()
    _flip(ckpt, 3)  # inside the 8-byte header length: unreadable
    code, text = _rerun(recipe, capsys)
    assert code == 0 and ckpt.read_bytes() == good, text


@pytest.mark.parametrize("damage", ["truncate", "delete", "edit config", "delete tokenizer", "flip"])
def test_damaged_published_model_is_published_again(damage, finished, capsys):
    recipe, out = finished
    model = out / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    if damage == "truncate":
        (model / "model.safetensors").write_bytes(before["model.safetensors"][:100])
    elif damage == "delete":
        (model / "model.safetensors").unlink()
    elif damage == "edit config":
        (model / "config.json").write_text('{"edited": true}')
    elif damage == "delete tokenizer":
        (model / "tokenizer.json").unlink()
    else:
        _flip(model / "model.safetensors", len(before["model.safetensors"]) - 10)
    code, text = _rerun(recipe, capsys)
    assert code == 0 and "publishing it again" in text, text
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("victim", ["stages/01-cast/stage.json", "stages/00-evaluate/metrics.json", "manifest.json"])
def test_garbage_json_in_the_run_directory(victim, finished, capsys):
    recipe, out = finished
    (out / victim).write_text("{not json")
    code, text = _rerun(recipe, capsys)
    assert code == 0, text
    assert "Traceback" not in text
    json.loads((out / victim).read_text())  # rewritten whole
    if victim.startswith("stages"):
        assert "is damaged" in text


def test_damaged_token_cache_is_prepared_again(finished, capsys):
    recipe, out = finished
    (cache,) = (out / "data" / "tokens").glob("*.safetensors")
    _flip(cache, cache.stat().st_size - 3)
    (out / "stages" / "00-evaluate").rename(out / "stages" / ".tmp-gone")  # the rerun evaluates: reads the data
    code, text = _rerun(recipe, capsys)
    assert code == 0 and "token cache" in text and "is damaged" in text, text


def test_output_holding_other_files_is_refused_and_untouched(base, tmp_path, capsys):
    mine = tmp_path / "mine"
    for rel in ("data/notes.txt", "model/weights.bin", "stages/x", "baseline/y", "recipe.yaml"):
        (mine / rel).parent.mkdir(parents=True, exist_ok=True)
        (mine / rel).write_text("the user's own " + rel)
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(base[0])
    for args in (["run", str(recipe), "-o", str(mine)], ["run", str(recipe), "-o", str(mine), "--fresh"]):
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 2 and "holds files dsc did not write" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("kind", ["output is a file", "cache_dir is a file", "output under a file"])
def test_a_file_where_a_folder_is_expected(kind, base, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    raw = dict(base[1])
    if kind == "output is a file":
        raw["output"] = str(blocker)
    elif kind == "cache_dir is a file":
        raw["cache_dir"] = str(blocker)
    else:
        raw["output"] = str(blocker / "out")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(blocker) in err, err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_read_only_or_full_disk_exits_2_with_the_path(err, base, tmp_path, capsys, monkeypatch):
    """As root every folder is writable: the filesystem's refusal is simulated where dsc writes."""
    import dsc.fingerprint

    real = dsc.fingerprint.write_text

    def refuse(path, text):
        if "out" in Path(path).parts:
            raise OSError(err, os.strerror(err), str(path))
        return real(path, text)

    monkeypatch.setattr(dsc.fingerprint, "write_text", refuse)  # what write_json calls
    recipe = tmp_path / "r.yaml"
    recipe.write_text(base[0])
    code = cli.main(["run", str(recipe)])
    text = capsys.readouterr().err
    assert code == 2 and "Traceback" not in text and str(tmp_path / "out") in text, text


def test_eval_checks_its_own_arguments(llama_dir, tmp_path, capsys):
    for args, words in [(["eval", str(llama_dir), "--data", "/tmp/" + "d" * 300], "shorten the path"),
                        (["eval", str(llama_dir), "--data", str(tmp_path / "none.txt")], "not found"),
                        (["eval", str(llama_dir), "--set", "context_length=x"], "must be an integer"),
                        (["eval", str(llama_dir), "--json", str(tmp_path)], "--json")]:
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, (args, err)


def test_json_log_format_makes_stdout_json(finished, base, tmp_path, capsys):
    recipe, out = finished
    assert cli.main(["--log-format", "json", "run", str(recipe)]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    assert cli.main(["--log-format", "json", "validate", str(recipe)]) == 0
    assert json.loads(capsys.readouterr().out) == {"recipe": str(recipe), "ok": True, "stages": ["evaluate", "cast"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(base[0].replace("dtype: bfloat16", "dtype: int4"))
    assert cli.main(["--log-format", "json", "validate", str(bad)]) == 2
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem["path"] == "stages[1].cast.dtype"
    assert cli.main(["--log-format", "json", "report", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(out / "report.md")}
    assert cli.main(["--log-format", "json", "stages", "cast"]) == 0
    (cast,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cast["stage"] == "cast" and any(f["name"] == "dtype" for f in cast["fields"])
