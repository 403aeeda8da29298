"""Every notebook under notebooks/ runs top to bottom, and shows what it claims.

A notebook that needs ../shared names the paths in its metadata (`dsc.requires_shared`) and is
skipped where they are absent. A notebook's cell tagged `summary` asserts its quality ordering
in the notebook itself and prints its numbers as JSON; the checks below read them back.
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, SHARED

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data"))


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stdout")


def _summary(nb) -> dict:
    cells = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "expected one cell tagged 'summary'"
    return json.loads(_stdout(cells[0]).strip().splitlines()[-1])


def check_quickstart(nb):
    text = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "float32   ppl" in text and "bfloat16  ppl" in text and "# " in text  # both evaluations and the report


def check_pruning_explorer(nb):
    assert _images(nb) >= 4  # heads, channels, layers, sweep
    s = _summary(nb)
    sweep, base = s["sweep"], s["float_ppl"]
    for r, ppl in sweep["activation"].items():
        assert base < ppl <= min(sweep["magnitude"][r], sweep["random"][r]), (r, sweep)
    ratios = sorted(sweep["activation"], key=float)
    assert all(sweep["activation"][a] < sweep["activation"][b] for a, b in zip(ratios, ratios[1:]))  # more cut, worse
    assert s["drop_layer"] == [min(range(len(s["ppl_without_layer"])), key=s["ppl_without_layer"].__getitem__)]
    assert s["config_after"]["num_attention_heads"] < 8 and s["config_after"]["intermediate_size"] < 172
    assert s["reload_max_abs_diff"] < 1e-4


def check_quantization_comparison(nb):
    assert _images(nb) >= 1
    s = _summary(nb)
    by = {(r["label"], r["stage"]): r for r in s["results"]}
    pairs = [label for label, stage in by if stage == "awq"]
    assert {label.split()[0] for label in pairs} == {"W3", "W4"}
    for label in pairs:  # AWQ no worse than RTN on the same grid, at the same bytes
        assert s["float_ppl"] < by[label, "awq"]["ppl"] <= by[label, "rtn"]["ppl"], label
        assert by[label, "awq"]["bytes"] == by[label, "rtn"]["bytes"] < s["float_bytes"]
    int8 = [r for r in s["results"] if r["stage"] == "int8"]
    assert len(int8) == 2 and all(abs(r["increase"]) < 1 for r in int8)
    assert s["reload_max_abs_diff"] < 1e-4


CHECKS = {"quickstart.ipynb": check_quickstart, "pruning_explorer.ipynb": check_pruning_explorer,
          "quantization_comparison.ipynb": check_quantization_comparison}


def test_every_notebook_has_a_check():
    assert {p.name for p in NOTEBOOKS} <= set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    missing = [p for p in nb.metadata.get("dsc", {}).get("requires_shared", []) if not (SHARED / p).exists()]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(str(SHARED / p) for p in missing)} (../shared not beside this checkout)")
    # the kernel inherits the environment: tiny models run best on one thread (unless the caller says otherwise)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("DSC_SHARED", str(SHARED))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for o in _outputs(nb, "error")]
    assert not errors
    CHECKS[path.name](nb)
