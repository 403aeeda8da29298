"""`.ci/lock.py`: the check `.ci/run` runs after `make install` fails on an environment that
differs from the constraints, and the upgrade's pyproject rewriting keeps upper bounds at the
newest tested minor."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT

LOCK = ROOT / ".ci" / "lock.py"


def _lock_module():
    spec = importlib.util.spec_from_file_location("dsc_ci_lock", LOCK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(path):
    return subprocess.run([sys.executable, str(LOCK), "check", "--constraints", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """Constraints written from this very environment: the check passes on them."""
    path = tmp_path_factory.mktemp("lock") / "constraints.txt"
    subprocess.run([sys.executable, str(LOCK), "write", "--constraints", str(path)], check=True, timeout=120,
                   capture_output=True)
    return path


def test_check_passes_on_the_environment_it_pinned(pinned):
    res = _check(pinned)
    assert res.returncode == 0, res.stderr
    text = pinned.read_text()
    for name in ("transformers", "torch", "compressed-tensors", "peft", "tokenizers", "safetensors", "pydantic"):
        assert f"\n{name}==" in text


def test_check_fails_on_another_version(pinned, tmp_path):
    lines = pinned.read_text().splitlines()
    other = [("transformers==0.0.1" if line.startswith("transformers==") else line) for line in lines]
    (tmp_path / "c.txt").write_text("\n".join(other) + "\n")
    res = _check(tmp_path / "c.txt")
    assert res.returncode == 1
    assert "transformers: installed" in res.stderr and "pinned 0.0.1" in res.stderr


def test_check_fails_on_an_unpinned_dependency_and_a_missing_pin(pinned, tmp_path):
    lines = [line for line in pinned.read_text().splitlines() if not line.startswith("peft==")]
    (tmp_path / "c.txt").write_text("\n".join(lines + ["no-such-dist-dsc==1.0"]) + "\n")
    res = _check(tmp_path / "c.txt")
    assert res.returncode == 1
    assert "peft==" in res.stderr and "not pinned" in res.stderr
    assert "no-such-dist-dsc==1.0 is pinned but not installed" in res.stderr


def test_shipped_constraints_pin_every_project_requirement():
    """constraints.txt names every requirement of pyproject (runtime and dev) with an exact version
    that its range admits."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = _lock_module()
    pins = lock.read_constraints(ROOT / "constraints.txt")
    for spec in lock.project_requirements(ROOT / "pyproject.toml"):
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "bitsandbytes":  # the gpu extra: not part of dsc[dev]
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"


def test_upgrade_lifts_and_raises_upper_bounds():
    lock = _lock_module()
    assert lock.lift_upper_bounds("transformers>=5.0,<5.25") == "transformers>=5.0"
    assert lock.lift_upper_bounds("dsc[demo,data]") == "dsc[data,demo]"
    assert lock.next_minor("5.25.1") == "5.26" and lock.next_minor("7") == "8"
    assert lock.lift_upper_bounds("x~=1.4") == "x>=1.4"
    text = ('[project]\ndependencies = [\n    "transformers>=5.0,<5.25",\n    "pyyaml>=6",\n]\n'
            '[project.optional-dependencies]\ntrain = ["peft>=0.13,<0.22"]\n'
            '[tool.pytest.ini_options]\nmarkers = [\n    "slow: long tests (real teacher)",\n]\n')
    new = lock.raise_upper_bounds(text, {"transformers": "5.26.0", "peft": "0.21.2", "pyyaml": "7.0"})
    assert '"transformers>=5.0,<5.27",' in new  # tested 5.26: the bound moves to the next minor
    assert '"peft>=0.13,<0.22"' in new  # inside its bound already: unchanged
    assert '"pyyaml>=6",' in new and '"slow: long tests (real teacher)"' in new  # untouched
    real = (ROOT / "pyproject.toml").read_text()
    pins = lock.read_constraints(ROOT / "constraints.txt")
    assert lock.raise_upper_bounds(real, pins) == real  # the shipped pins are inside the shipped bounds
    bumped = lock.raise_upper_bounds(real, {**pins, "transformers": "5.30.1"})
    assert '"transformers>=5.0,<5.31"' in bumped and bumped.count("\n") == real.count("\n")
