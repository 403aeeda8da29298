"""Experiment trackers behind one adapter: TensorBoard event files and MLflow runs.

    tracking: {backend: tensorboard}                      # OUT/tensorboard/NN-stage/
    tracking: {backend: tensorboard, dir: ../tb}
    tracking: {backend: mlflow}                           # sqlite:///OUT/mlflow.db
    tracking: {backend: mlflow, uri: sqlite:///runs.db, experiment: smollm2-lite}

What is logged: the recipe and the versions as parameters (and the recipe as text), each training
step's loss terms, lr, grad norm and tokens/s (`NN-stage/loss`, by step), each held-out evaluation
(`NN-stage/eval/...`), and every numeric metric of every finished stage (`stages/NN-stage/...`,
with the stage index as step); an evaluate stage's model metrics also as `eval/...` and the
teacher's as `teacher/...`, so perplexity and accuracy plot across the pipeline.

A run killed and resumed continues the same tracked run and logs each step once: MLflow resumes
the run id kept in OUT/tracking.json and skips steps it already holds (a resumed run recomputes
them bit for bit); TensorBoard writes each stage into its own folder and reopens it with
`purge_step` at the step training resumed from, so events a killed run wrote after its last
checkpoint are dropped by TensorBoard's reader. Writes are flushed at once: a kill loses none.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dsc.config import Config
from dsc.errors import DscInputError
from dsc.fingerprint import read_json, write_json

STATE = "tracking.json"


class TrackingConfig(Config):
    """Where a run reports its metrics (recipe key `tracking`)."""

    backend: Literal["tensorboard", "mlflow"] = Field(description="tensorboard (event files) or mlflow")
    dir: str | None = Field(None, description="tensorboard: log folder, relative to the recipe (default OUT/tensorboard)")
    uri: str | None = Field(None, description="mlflow: tracking URI, e.g. sqlite:///mlflow.db (relative to the recipe), "
                                              "file:///abs/mlruns or http://server:5000 (default sqlite:///OUT/mlflow.db)")
    experiment: str = Field("dsc", min_length=1, description="mlflow: experiment name")
    run_name: str | None = Field(None, description="mlflow: run name (default: the run directory's name)")

    @model_validator(mode="after")
    def _fields_of_backend(self):
        if self.backend == "tensorboard" and self.uri is not None:
            raise ValueError("`uri` is for backend mlflow; tensorboard takes `dir`")
        if self.backend == "mlflow" and self.dir is not None:
            raise ValueError("`dir` is for backend tensorboard; mlflow takes `uri` (e.g. sqlite:///mlflow.db)")
        return self


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as `a/b/c` → value (finite numbers only; bools out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _params(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested recipe as flat `a.b.c` → text parameters."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_params(v, f"{prefix}.{i}"))
        return out
    return {prefix: str(tree)[:5000]}


class Tracker:
    """No tracking: every call is a no-op. The base of the real ones."""

    name = "none"

    def start(self, params: dict, recipe_yaml: str) -> None: ...

    def resume(self, scope: str, step: int) -> None:
        """Training of `scope` (a stage folder name) starts at `step` (0: from scratch)."""

    def log(self, scope: str, values: dict[str, float], step: int) -> None: ...

    def stage_done(self, out: Path, index: int, folder: str, metrics: dict, is_evaluate: bool) -> None:
        """A finished stage's metrics, logged once per run directory (kept in OUT/tracking.json)."""
        if self.name == "none":
            return
        state = read_json(out / STATE) if (out / STATE).is_file() else {}
        logged = state.get("stages_logged", []) if state.get("backend") == self.name else []
        if folder in logged:
            return
        self.log("stages", flatten(metrics, folder), index)
        if is_evaluate:
            model = {k: v for k, v in metrics.get("model", {}).items() if k != "speed_protocol"}
            self.log("eval", flatten(model), index)
            if "teacher" in metrics:
                self.log("teacher", flatten(metrics["teacher"]), 0)
        write_json(out / STATE, {**state, "backend": self.name, "stages_logged": logged + [folder]})

    def close(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED (interrupted; a rerun resumes the same tracked run)."""


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise DscInputError("tracking.backend", f"tensorboard needs its package: pip install 'dsc[tracking]' "
                                f"({exc})") from None
        self._writer_cls, self.folder, self.writers = SummaryWriter, folder, {}

    def _writer(self, scope: str, purge_step: int | None = None):
        if scope not in self.writers:
            self.writers[scope] = self._writer_cls(str(self.folder / scope), purge_step=purge_step, flush_secs=5)
        return self.writers[scope]

    def start(self, params: dict, recipe_yaml: str) -> None:
        w = self._writer("run")
        w.add_text("recipe", "```yaml\n" + recipe_yaml + "\n```", 0)
        w.add_text("versions", ", ".join(f"{k} {v}" for k, v in params.get("versions", {}).items()), 0)
        w.flush()

    def resume(self, scope: str, step: int) -> None:
        # Events at steps >= purge_step from earlier attempts are hidden; the step a checkpoint was
        # taken at was logged before it, so it stays (from scratch: everything goes).
        if scope in self.writers:
            self.writers.pop(scope).close()
        self._writer(scope, purge_step=step + 1 if step else 0)

    def log(self, scope: str, values: dict[str, float], step: int) -> None:
        w = self._writer(scope)
        for key, value in values.items():
            w.add_scalar(key, value, step)
        w.flush()

    def close(self, status: str = "FINISHED") -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, out: Path):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise DscInputError("tracking.backend", f"mlflow needs its package: pip install 'dsc[tracking]' "
                                f"({exc})") from None
        for name in ("alembic", "mlflow"):  # schema migrations and store notices would break JSON logs
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        self._last: dict[str, int] = {}  # metric key → the last step the run holds
        state = read_json(out / STATE) if (out / STATE).is_file() else {}
        self.run_id = None
        if state.get("backend") == "mlflow" and state.get("uri") == uri and state.get("run_id"):
            try:
                self.client.update_run(state["run_id"], status="RUNNING")
                self.run_id = state["run_id"]  # a resumed run continues its tracked run
            except Exception as exc:  # noqa: BLE001 - MlflowException: the run is gone from this store
                logging.getLogger("dsc").warning("MLflow run %s is not in %s any more (%s): starting a new one",
                                                 state["run_id"], uri, type(exc).__name__,
                                                 extra={"event": "tracking_new_run"})
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, _artifacts(uri))
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"dsc.run_dir": str(out)}).info.run_id
            write_json(out / STATE, {"backend": "mlflow", "uri": uri, "run_id": self.run_id})

    def start(self, params: dict, recipe_yaml: str) -> None:
        have = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in _params(params).items() if k not in have}  # MLflow params never change
        from mlflow.entities import Param

        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in list(new.items())[i:i + 100]])
        if "recipe.yaml" not in {f.path for f in self.client.list_artifacts(self.run_id)}:
            self.client.log_text(self.run_id, recipe_yaml, "recipe.yaml")

    def _last_step(self, key: str) -> int:
        if key not in self._last:
            history = self.client.get_metric_history(self.run_id, key)
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def log(self, scope: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now, fresh = int(time.time() * 1000), []
        for key, value in values.items():
            name = f"{scope}/{key}"
            if step > self._last_step(name):  # else logged before a kill, recomputed identically now
                fresh.append(Metric(name, value, now, step))
                self._last[name] = step
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _artifacts(uri: str) -> str | None:
    """Artifacts of a SQLite store lie beside the database (MLflow's default is ./mlruns in
    whatever folder the job runs from); file stores and servers keep their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def _mlflow_uri(uri: str | None, base_dir: Path, out: Path) -> str:
    """Relative SQLite and file-store paths resolve against the recipe's folder, like every path."""
    if uri is None:
        return f"sqlite:///{(out / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base_dir / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri and not uri.startswith("file:"):
        return (base_dir / uri).resolve().as_uri()
    return uri


def open_tracker(cfg: TrackingConfig | None, base_dir: Path, out: Path) -> Tracker:
    if cfg is None:
        return Tracker()
    if cfg.backend == "tensorboard":
        folder = (base_dir / cfg.dir).resolve() if cfg.dir else out / "tensorboard"
        return TensorBoardTracker(folder)
    try:
        return MLflowTracker(_mlflow_uri(cfg.uri, base_dir, out), cfg.experiment, cfg.run_name or out.name, out)
    except DscInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own MlflowException for a bad store
        raise DscInputError("tracking.uri", f"MLflow cannot open {cfg.uri or 'the default store'}: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
