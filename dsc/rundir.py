"""The run directory OUT/: layout, lock, fingerprints and resume.

    OUT/recipe.yaml       the resolved recipe (every default filled in)
    OUT/manifest.json     versions and fingerprints (recipe, teacher weights, data, seed)
    OUT/stages/NN-name/   one folder per finished stage: stage.json, metrics.json, model/
    OUT/baseline/         teacher measurements, one file per evaluation protocol
    OUT/work/NN-name-FP/  checkpoints of a training stage in progress (a resume continues from
                          them; FP is the stage's fingerprint, so a changed recipe never does)
    OUT/model/            the final Lite model (with its model card, README.md)
    OUT/tracking.json     the tracked run (MLflow run id, stages logged); by default OUT/tensorboard/
                          (cleared by --fresh), or OUT/mlflow.db + OUT/mlartifacts/ (kept: a fresh
                          run is a new MLflow run beside the old ones)
    OUT/metrics.json, OUT/report.md (+ .html), OUT/quality_vs_size.png, OUT/quality_vs_speed.png

A stage is written into `stages/.tmp-NN-name` and renamed when complete, so its folder exists
only once it is whole: `kill -9` at any moment loses at most the stage in progress.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from dsc.errors import DscInputError
from dsc.fingerprint import read_json

RUN_FILES = ("manifest.json", "recipe.yaml", "tracking.json", "metrics.json", "report.md", "report.html", "quality_vs_size.png",
             "quality_vs_speed.png")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.stages = self.path / "stages"
        self.baseline = self.path / "baseline"
        self.model = self.path / "model"
        self.data = self.path / "data"
        self.work = self.path / "work"
        self._lock = None

    def acquire(self) -> None:
        """Exclusive lock on OUT for this process; released by the OS even on kill -9."""
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise DscInputError("output", f"{self.path} is in use by another dsc run ({owner}): wait for it to "
                                "finish or choose another output directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock = fh

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunDir":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def clear(self, keep_work: bool = False) -> None:
        """--fresh: remove everything a previous run wrote (the lock stays held)."""
        for name in ("stages", "baseline", "model", "data", "tensorboard") + (() if keep_work else ("work",)):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def remove_partial(self) -> None:
        """Drop temporaries a killed run left behind."""
        for parent in (self.path, self.stages, self.baseline, self.data / "tokens"):
            if parent.is_dir():
                for p in [*parent.glob(".tmp-*"), *parent.glob(".old-*"), *parent.glob(".*.tmp-*")]:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def stage_dir(self, index: int, name: str) -> Path:
        return self.stages / f"{index:02d}-{name}"

    def tmp_stage_dir(self, index: int, name: str) -> Path:
        return self.stages / f".tmp-{index:02d}-{name}"

    def work_dir(self, index: int, name: str, fingerprint: str) -> Path:
        return self.work / f"{index:02d}-{name}-{fingerprint[:12]}"

    def keep_work(self, valid: set[Path]) -> None:
        """Remove training checkpoints that no stage of this recipe can resume from."""
        if self.work.is_dir():
            for p in self.work.iterdir():
                if p not in valid:
                    shutil.rmtree(p, ignore_errors=True)

    def finished(self) -> dict[int, dict]:
        """index → stage.json of every stage whose folder is complete."""
        out = {}
        if self.stages.is_dir():
            for d in sorted(self.stages.iterdir()):
                if d.is_dir() and not d.name.startswith(".") and (d / "stage.json").is_file():
                    info = read_json(d / "stage.json")
                    out[info["index"]] = info
        return out

    def check_resume(self, chain: list[str], names: list[str], configs: list[dict], root: dict) -> int:
        """Index of the first stage to run. Refuses when finished work came from another recipe."""
        done = self.finished()
        manifest = read_json(self.path / "manifest.json") if (self.path / "manifest.json").is_file() else None
        if not done:  # nothing finished: start clean, but keep a first training stage's checkpoints
            self.clear(keep_work=True)
            return 0
        if manifest and manifest["fingerprints"]["root"] != root["root"]:
            changed = [k for k in ("teacher", "student", "data", "seed") if manifest["fingerprints"].get(k) != root.get(k)]
            self._refuse(f"the {' and '.join(changed) or 'inputs'} changed since this run started")
        start = 0
        for i in range(len(chain)):
            info = done.get(i)
            if info is None:
                break
            if info["fingerprint"] != chain[i]:
                if info["name"] != names[i]:
                    what = f"stage {info['name']!r} became {names[i]!r}"
                else:
                    what = f"{names[i]}: {_diff(info['config'], configs[i])}"
                self._refuse(f"stages[{i}] changed ({what})")
            start = i + 1
        extra = [i for i in done if i >= len(chain)]
        if extra:
            self._refuse(f"it holds finished stages past the recipe's last (stage {extra[0]})")
        return start

    def _refuse(self, why: str) -> None:
        raise DscInputError("output", f"{self.path} holds a run of a different recipe: {why}. "
                            "Rerun with --fresh to start over, or choose another output directory")


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "its inputs changed"
