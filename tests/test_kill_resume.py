"""`dsc run` killed with SIGKILL at random moments (a real crash: no handler, no cleanup), then
run again until it exits 0, ends exactly where a run that was never interrupted ends.

One tiny recipe on the trained stories260K chains prune → distill (a checkpoint every few steps,
so kills land mid-training) → awq (layer-by-layer progress) → evaluate, on text sampled from the
teacher. The reference run is measured first; each seed then kills its attempts at seeded times,
uniform over the reference's working time (from taking the run directory's lock to its last log
line), counted from the moment each attempt takes the lock (the seconds before, importing torch
and validating the recipe, write nothing). A seed's first kill is uniform over the middle half of
one phase of the reference (seed mod 3: setup, data and prune | distill | awq, evaluate, report
and the final model), timed from the event that starts that phase in the attempt itself, so the
default seeds hit every phase however loaded the machine is; later kills land anywhere.

After every kill the run directory must be consistent (finished stages whole, no half-written
final model, the lock free); every attempt that ends on its own must exit 0 (never 2, e.g. from a
stale lock); every log line must be JSON; and the finished run must match the reference: stage
metrics, training log, fingerprints, the final model's tensors (timings excepted).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import STORIES
from dsc.rundir import RunDir
from dsc.fingerprint import folder_hashes as file_stats

SEEDS = [0, 1, 2]
# Where a seed's first kill is timed from: the lock (setup, data, prune), the start of distill,
# its end (awq, evaluate, report, the final model).
PHASES = [None, ("stage_start", "distill"), ("stage_done", "distill")]
SLOW_SEEDS = list(range(3, 11))
# Keys whose values are measurements of time or memory, not of the model: never compared.
VOLATILE = re.compile(r"seconds|tokens_per_s|speedup|memory|eta_s|resumed_at_step|^finished$")


def _recipe(out: Path) -> dict:
    return {
        "teacher": str(STORIES),
        "data": {"gen": {"type": "teacher", "num_sequences": 16, "length": 64, "block_size": 64,
                         "splits": {"calibration": 0.25, "train": 0.5, "eval": 0.25}}},
        "stages": [
            {"prune": {"channels": 0.25, "channel_multiple": 32, "num_samples": 4}},
            {"distill": {"steps": 30, "save_every": 4, "log_every": 2, "eval_every": 10, "batch_size": 2,
                         "lr": 3.0e-3, "eval_batches": 2}},
            {"awq": {"group_size": 32, "num_samples": 4, "batch_size": 4, "n_grid": 5, "loss_samples": 2}},
            {"evaluate": {"context_length": 64, "speed": False}},
        ],
        "output": str(out),
        "seed": 0,
    }


class Attempt:
    """One `dsc --log-format json run` in a subprocess, its stderr read as it comes."""

    def __init__(self, recipe: Path, out: Path, cache: Path, python: tuple = ("-m", "dsc.cli")):
        self.lines: list[str] = []
        self.lines_at: list[float] = []
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, *python, "--log-format", "json", "run", str(recipe)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "DSC_CACHE_DIR": str(cache)})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines_at.append(time.monotonic())
            self.lines.append(line)

    def _wait_for_lock(self, timeout: float) -> float:
        """The moment OUT/.lock names this process: it owns the run directory from here."""
        mine, deadline = f"pid {self.proc.pid}", time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if (self.out / ".lock").read_text().strip() == mine:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        return time.monotonic()

    def _wait_for_event(self, event: tuple[str, str], timeout: float) -> float:
        """When the attempt logged `event` (name, stage)."""
        deadline, seen = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            ended = self.proc.poll() is not None
            n = min(len(self.lines), len(self.lines_at))  # the reader appends the time first
            for i in range(seen, n):
                if f'"event": "{event[0]}"' in self.lines[i] and json.loads(self.lines[i]).get("stage") == event[1]:
                    return self.lines_at[i]
            seen = n
            if ended:
                break
            time.sleep(0.005)
        return time.monotonic()

    def run(self, kill_after: float | None = None, anchor: tuple[str, str] | None = None,
            timeout: float = 300) -> bool:
        """Wait for the exit, or SIGKILL `kill_after` seconds after the attempt takes the lock (or
        logs the `anchor` event); True if killed."""
        killed = False
        self.locked_at = self._wait_for_lock(timeout)
        if kill_after is None:
            self.proc.wait(timeout=timeout)
        else:
            start = self.locked_at if anchor is None else self._wait_for_event(anchor, timeout)
            try:
                self.proc.wait(timeout=max(0.0, start + kill_after - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                killed = True
        self._reader.join(timeout=30)
        return killed

    def events(self) -> list[dict]:
        """Every whole line is one JSON object (a kill may cut the last one short)."""
        out = []
        for line in self.lines:
            if not line.endswith("\n"):
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
        return out

    def where(self) -> str:
        """The last thing the attempt logged: where the kill landed."""
        events = [e for e in self.events() if e.get("event")]
        if not events:
            return "before its first log line"
        last = events[-1]
        return f"after {last['event']}" + (f" (step {last['step']})" if "step" in last else "") + \
            (f" of {last['stage']}" if "stage" in last else "")

    def kill_on(self, event: str, timeout: float = 300) -> None:
        """SIGKILL as soon as the attempt logs `event`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline and \
                not any(f'"event": "{event}"' in line for line in self.lines):
            time.sleep(0.01)
        assert self.proc.poll() is None, f"the attempt ended before {event}:\n{self.stderr_tail()}"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=30)

    def stderr_tail(self) -> str:
        return "".join(self.lines)[-3000:]


def _volatile_free(obj):
    if isinstance(obj, dict):
        return {k: _volatile_free(v) for k, v in obj.items() if not VOLATILE.search(k)}
    if isinstance(obj, list):
        return [_volatile_free(v) for v in obj]
    return obj


def _same(a, b, path="") -> None:
    """Equal structures; floats to a relative 1e-9 (the runs are deterministic on one machine)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} entries != {len(b)}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _read_json(path: Path):
    return json.loads(path.read_text())


def _summary(out: Path) -> dict:
    """What a finished run must reproduce: per stage its metrics, fingerprint, config, file sizes
    and training log; the run's metrics.json; all without timings."""
    stages = {}
    for d in sorted((out / "stages").iterdir()):
        info = _read_json(d / "stage.json")
        entry = {"metrics": _read_json(d / "metrics.json"), "fingerprint": info["fingerprint"],
                 "config": info["config"],
                 # the model card holds this run's timings: its size is not the model's
                 "file_sizes": None if info["files"] is None else
                 {k: v[0] for k, v in info["files"].items() if k != "README.md"}}
        if (d / "train_log.jsonl").is_file():
            entry["train_log"] = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        stages[d.name] = entry
    return _volatile_free({"stages": stages, "run": _read_json(out / "metrics.json")})


def _check_consistent(out: Path, context: str) -> None:
    """The state a kill may leave: whole stages only, no half-written final model, a free lock."""
    from safetensors import safe_open

    if (out / "stages").is_dir():
        for d in (out / "stages").iterdir():
            if d.name.startswith("."):
                continue  # a temporary: the next run removes it
            assert (d / "stage.json").is_file() and (d / "metrics.json").is_file(), f"{context}: {d} is partial"
            info = _read_json(d / "stage.json")
            _read_json(d / "metrics.json")
            if info["files"] is not None:
                assert file_stats(d / "model") == info["files"], f"{context}: {d / 'model'} is not what was written"
    model = out / "model"
    if model.exists():
        assert (model / "dsc_source.json").is_file() and (model / "config.json").is_file(), \
            f"{context}: {model} is half-written"
        for f in model.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                assert list(fh.keys()), f"{context}: {f} is empty"
    for name in ("manifest.json", "metrics.json"):
        if (out / name).exists():
            _read_json(out / name)
    for ckpt in out.glob("work/*/checkpoint"):
        assert (ckpt / "meta.json").is_file() and (ckpt / "state.pt").is_file(), f"{context}: {ckpt} is partial"
    lock = RunDir(out)
    lock.acquire()  # the killed process held the lock: it must be free now (never a stale lock)
    lock.release()


def _write_recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(folder / "out")))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its summary, final model, working time (lock → last log line) and
    the length of each phase after its anchor event."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"{STORIES} is absent (../shared not beside this checkout)")
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "out"
    attempt = Attempt(_write_recipe(folder), out, folder / "cache")
    attempt.run()
    assert attempt.proc.returncode == 0, attempt.stderr_tail()
    events = attempt.events()
    assert {"stage_start", "train_checkpoint", "quantized_layer", "run_done"} <= {e.get("event") for e in events}
    at = {(e.get("event"), e.get("stage")): t - attempt.locked_at for e, t in zip(events, attempt.lines_at)}
    working = attempt.lines_at[-1] - attempt.locked_at + 0.1
    bounds = [0.0, at[PHASES[1]], at[PHASES[2]], working]
    phases = [(anchor, bounds[i + 1] - bounds[i]) for i, anchor in enumerate(PHASES)]
    return {"summary": _summary(out), "model": _tensors(out / "model"), "working": working, "phases": phases}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def kill_and_resume(seed: int, reference: dict, tmp_path: Path, kills: int) -> list[str]:
    """Up to `kills` attempts killed at seeded times, then one left to finish, which must exit 0
    (as must any attempt that ends before its kill); returns where each kill landed."""
    rng = random.Random(seed)
    recipe = _write_recipe(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"  # its own cache: teacher data is sampled again
    landed = []
    for k in range(kills + 1):
        anchor, kill_after = None, None
        if k == 0:  # the first kill in the middle half of phase seed mod 3, timed from its start
            anchor, length = reference["phases"][seed % 3]
            kill_after = rng.uniform(0.25 * length, 0.75 * length)
        elif k < kills:
            kill_after = rng.uniform(0, reference["working"])
        attempt = Attempt(recipe, out, cache)
        killed = attempt.run(kill_after, anchor)
        attempt.events()  # every line is JSON
        if killed:
            landed.append(f"{'/'.join(anchor or ('lock',))} +{kill_after:.2f}s: {attempt.where()}")
            _check_consistent(out, f"seed {seed}, kill {k}: {landed[-1]}")
            continue
        assert attempt.proc.returncode == 0, \
            f"seed {seed}, attempt {k} after kills {landed}: exit {attempt.proc.returncode}\n{attempt.stderr_tail()}"
        break

    leftovers = [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-")) or ".tmp-" in p.name]
    assert not leftovers, leftovers
    assert not (out / "work").exists() or not any((out / "work").iterdir()), list((out / "work").iterdir())
    try:
        _same(_summary(out), reference["summary"])
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}, kills {landed}: differs from the uninterrupted run: {exc}") from None
    model = _tensors(out / "model")
    assert model.keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(model[name], tensor), f"seed {seed}, kills {landed}: {name} differs"
    return landed


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_run_resumes_to_the_same_result(seed, reference, tmp_path):
    landed = kill_and_resume(seed, reference, tmp_path, kills=2)
    print(f"seed {seed}: working time {reference['working']:.2f}s, kills {landed}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_killed_run_resumes_to_the_same_result_more_seeds(seed, reference, tmp_path):
    landed = kill_and_resume(seed, reference, tmp_path, kills=3)
    print(f"seed {seed}: working time {reference['working']:.2f}s, kills {landed}")


# The first training checkpoint waits until the test has killed the run.
SLOW_FIRST_SAVE = ("import sys, time, dsc.distill.loop as l; f = l.Loop.save; "
                   "l.Loop.save = lambda self: (time.sleep(60), f(self))[1]; "
                   "from dsc.cli import main; sys.exit(main())")


def test_killed_before_the_first_checkpoint_logs_each_step_once(reference, tmp_path):
    """Killed after training logged steps but before its first checkpoint: the rerun trains from
    step 0 again, and its train_log.jsonl holds each step once, as the uninterrupted run's does."""
    recipe, out, cache = _write_recipe(tmp_path), tmp_path / "out", tmp_path / "cache"
    attempt = Attempt(recipe, out, cache, python=("-c", SLOW_FIRST_SAVE))
    attempt.kill_on("train_progress")
    assert not list(out.glob("work/*/checkpoint")) and list(out.glob("work/*/train_log.jsonl"))
    _check_consistent(out, "killed before the first checkpoint")
    attempt = Attempt(recipe, out, cache)
    attempt.run()
    assert attempt.proc.returncode == 0, attempt.stderr_tail()
    _same(_summary(out), reference["summary"])


# -- the scheduling examples in docs/ ----------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cronjob_manifest():
    """docs/k8s/cronjob.yaml: well-formed, runs `dsc run` with JSON logs, one Job at a time, exit 2
    not retried (which Kubernetes allows only with restartPolicy Never), and a recipe that dsc
    accepts but for the files that live on the volume."""
    from dsc.errors import DscInputError
    from dsc.recipe import validate

    docs = {d["kind"]: d for d in yaml.safe_load_all((DOCS / "k8s" / "cronjob.yaml").read_text()) if d}
    assert {"CronJob", "PersistentVolumeClaim", "ConfigMap"} <= docs.keys()
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] > 0 and pod["terminationGracePeriodSeconds"] > 30
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[0] == "dsc" and "run" in command and command[command.index("--log-format") + 1] == "json"
    rules = job["podFailurePolicy"]["rules"]
    assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2]
               and r["onExitCodes"]["containerName"] == container["name"] for r in rules)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {"DSC_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "RUN_DIR"} <= env.keys()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert all(any(env[k].startswith(m + "/") for m in mounts) for k in ("DSC_CACHE_DIR", "HF_HOME", "RUN_DIR"))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}

    recipe = yaml.safe_load(docs["ConfigMap"]["data"]["nightly.yaml"])
    with pytest.raises(DscInputError) as info:
        validate(recipe, base_dir=Path("/"))
    problems = str(info.value).splitlines()
    assert problems and all(p.startswith(("teacher.path:", "data.c4.path:")) for p in problems), problems


FAKE_DSC = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DSC_CALLS"
echo '{"event": "error", "exit_code": '"$FAKE_DSC_EXIT"'}' >&2
exit "$FAKE_DSC_EXIT"
"""


def test_cron_wrapper_resumes_until_done(tmp_path):
    """docs/cron/dsc-nightly.sh with a stand-in `dsc`: exit 3 and 1 keep the same run directory for
    the next tick (1 is reported), 0 finishes it, and a later tick that night does nothing."""
    script = DOCS / "cron" / "dsc-nightly.sh"
    assert os.access(script, os.X_OK)
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "dsc"
    fake.write_text(FAKE_DSC)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_DSC_CALLS": str(calls),
           "DSC_RUNS": str(tmp_path / "runs"), "DSC_LOGS": str(tmp_path / "logs"), "DSC_RECIPE": "r.yaml"}

    def tick(code: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env={**env, "FAKE_DSC_EXIT": str(code)}, capture_output=True,
                              text=True, timeout=60)

    first = tick(3)
    assert first.returncode == 3 and first.stdout == ""
    pending = (tmp_path / "runs" / "PENDING").read_text().strip()
    failed = tick(1)
    assert failed.returncode == 1 and "exit 1" in failed.stdout and '"exit_code": 1' in failed.stdout
    assert tick(0).returncode == 0 and not (tmp_path / "runs" / "PENDING").exists()
    assert Path(pending + ".done").is_file()
    assert tick(1).returncode == 0  # tonight's run is done: dsc is not called again
    runs = calls.read_text().splitlines()
    assert runs == [f"--log-format json run r.yaml -o {pending}"] * 3
    log = tmp_path / "logs" / f"{Path(pending).name}.jsonl"
    assert [json.loads(line)["exit_code"] for line in log.read_text().splitlines()] == [3, 1, 0]
