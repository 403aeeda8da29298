"""The run directory OUT/: layout, lock, fingerprints and resume.

    OUT/recipe.yaml       the resolved recipe (every default filled in)
    OUT/manifest.json     versions and fingerprints (recipe, teacher weights, data, seed)
    OUT/stages/NN-name/   one folder per finished stage: stage.json, metrics.json, model/
    OUT/baseline/         teacher measurements, one file per evaluation protocol
    OUT/work/NN-name-FP/  checkpoints of a training stage in progress (a resume continues from
                          them; FP is the stage's fingerprint, so a changed recipe never does)
    OUT/model/            the final Lite model (with its model card, README.md)
    OUT/export/           files of the artifact stages (export: GGUF), links to stages/NN-export/export/
    OUT/tracking.json     the tracked run (MLflow run id, stages logged); by default OUT/tensorboard/
                          (cleared by --fresh), or OUT/mlflow.db + OUT/mlartifacts/ (kept: a fresh
                          run is a new MLflow run beside the old ones)
    OUT/metrics.json, OUT/report.md (+ .html), OUT/quality_vs_size.png, OUT/quality_vs_speed.png

A stage is written into `stages/.tmp-NN-name` and renamed when complete, so its folder exists
only once it is whole: `kill -9` at any moment loses at most the stage in progress.

OUT/.dsc-run marks a folder dsc made: an existing folder without it (and not empty) holds someone
else's files and is refused, never cleaned. Every checkpoint's files are recorded with their
sha256 in its stage.json (OUT/model's in dsc_source.json) and verified before a resume trusts
them; a damaged or unreadable stage is rebuilt from the last sound one.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dsc import paths
from dsc.errors import DscInputError
from dsc.fingerprint import folder_matches, read_json, write_json

MARKER = ".dsc-run"

RUN_FILES = ("manifest.json", "recipe.yaml", "metrics.json", "report.md", "report.html", "quality_vs_size.png",
             "quality_vs_speed.png")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.stages = self.path / "stages"
        self.baseline = self.path / "baseline"
        self.model = self.path / "model"
        self.data = self.path / "data"
        self.work = self.path / "work"
        self.sound: set[str] = set()  # stage folders whose checkpoint this run wrote or verified
        self.skipped: dict[int, str] = {}  # finished stages that skipped their work (why), found by finished()
        self.retry: list[int] = []  # skipped stages before the resume point: check_resume runs them again
        self._lock = None

    def claim(self) -> None:
        """Make OUT, or adopt it when dsc made it; refuse a folder that holds other files."""
        check_output(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MARKER).is_file():
                write_json(self.path / MARKER, {"made_by": "dsc", "created": datetime.now(timezone.utc).isoformat(
                    timespec="seconds")})
        except OSError as exc:
            raise paths.refused(exc, "output", self.path) from None

    def acquire(self) -> None:
        """Exclusive lock on OUT for this process; released by the OS even on kill -9."""
        self.claim()
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
        # keep_work: nothing finished yet, but a first training stage's checkpoints and the tracked
        # run they logged to are resumed: only --fresh starts a new tracked run.
        for name in ("stages", "baseline", "model", "export", "data") + (() if keep_work else ("work", "tensorboard")):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in RUN_FILES + (() if keep_work else ("tracking.json",)):
            (self.path / name).unlink(missing_ok=True)
        self.sound.clear()

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

    def finished(self) -> tuple[dict[int, dict], dict[int, str]]:
        """index → stage.json of every complete, readable stage folder; and index → what is wrong
        with each damaged one (unreadable stage.json or metrics.json, files that changed)."""
        out, damaged = {}, {}
        self.skipped = {}
        if self.stages.exists() and not self.stages.is_dir():
            raise DscInputError("output", f"{self.stages} is not a folder: this run directory is damaged beyond "
                                "repair; rerun with --fresh to start over")
        if not self.stages.is_dir():
            return out, damaged
        for d in sorted(self.stages.iterdir()):
            index = stage_index(d)
            if index is None:
                continue
            try:
                info = read_json(d / "stage.json")
                skipped = read_json(d / "metrics.json").get("skipped")
                if not isinstance(info, dict) or info["index"] != index or not isinstance(info["fingerprint"], str):
                    raise ValueError("stage.json does not describe this stage")
                files = info.get("files")
                if files is None and (d / "model").exists():
                    raise ValueError("stage.json records no files for the checkpoint beside it")
                problem = folder_matches(d / "model", files) if files is not None else None
                if problem is None and info.get("artifacts") is not None:
                    problem = folder_matches(d / "export", info["artifacts"])
            except FileNotFoundError as exc:
                damaged[index] = f"{Path(exc.filename or 'a file').name} is missing"
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                damaged[index] = f"stage.json or metrics.json is unreadable ({type(exc).__name__}: {exc})"
                continue
            if problem:
                damaged[index] = f"its files changed: {problem}"
                continue
            if skipped:  # e.g. a llama.cpp evaluation without llama-cpp-python: tried again on resume
                self.skipped[index] = str(skipped)
            out[index] = info
            self.sound.add(d.name)
        return out, damaged

    def read_manifest(self) -> dict | None:
        """manifest.json, or None when missing or damaged (it is rewritten at every start)."""
        try:
            manifest = read_json(self.path / "manifest.json")
            manifest["fingerprints"]["root"]
            return manifest
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check_resume(self, chain: list[str], names: list[str], configs: list[dict], root: dict,
                     log=None) -> int:
        """Index of the first stage to run. Refuses when finished work came from another recipe;
        a damaged stage (and every stage after it) is rebuilt from the last sound one."""
        done, damaged = self.finished()
        manifest = self.read_manifest()
        if not done:  # nothing finished: start clean, but keep a first training stage's checkpoints
            if damaged and log is not None:
                first = min(damaged)
                log.warning("stage %d is damaged (%s): rebuilding the run from its first stage", first,
                            damaged[first], extra={"event": "damaged", "index": first, "problem": damaged[first]})
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
        for i, info in sorted(done.items()):  # sound stages after a damaged one: still this recipe's
            if i > start and info["fingerprint"] != chain[i]:
                self._refuse(f"stages[{i}] changed ({names[i]}: {_diff(info['config'], configs[i])})")
        first_bad = min((i for i in damaged if i <= start), default=None)
        if first_bad is not None:
            if log is not None:
                log.warning("stage %d is damaged (%s): rebuilding it and the stages after it from the last sound "
                            "stage", first_bad, damaged[first_bad],
                            extra={"event": "damaged", "index": first_bad, "problem": damaged[first_bad]})
            start = first_bad
        self.retry = sorted(i for i in self.skipped if i < start)
        if self.retry and log is not None:
            log.info("stage(s) %s were skipped: trying them again", ", ".join(map(str, self.retry)),
                     extra={"event": "retry", "indices": self.retry})
        for d in self.stages.iterdir() if self.stages.is_dir() else ():
            index = stage_index(d)
            if index is not None and index >= start:
                shutil.rmtree(d)  # dsc's own folders, rebuilt in order from here
                self.sound.discard(d.name)
        return start

    def _refuse(self, why: str) -> None:
        raise DscInputError("output", f"{self.path} holds a run of a different recipe: {why}. "
                            "Rerun with --fresh to start over, or choose another output directory")


def stage_index(folder: Path) -> int | None:
    """NN of a finished stage folder `NN-name` (None for temporaries and anything else)."""
    head, sep, _ = folder.name.partition("-")
    return int(head) if sep and head.isdigit() and folder.is_dir() else None


def check_output(path: Path, field: str = "output") -> None:
    """OUT may be missing, empty, or a folder dsc made (its marker, or an older run's manifest):
    anything else holds someone else's files, and a run there would mix with them or clean them."""
    path = Path(path)
    found = paths.kind(path, field)
    if found not in ("missing", "dir"):
        raise DscInputError(field, f"{path} exists and is not a folder: choose another output directory")
    if found == "dir" and not (path / MARKER).is_file() and not (path / "manifest.json").is_file():
        try:
            theirs = sorted(p.name for p in path.iterdir() if p.name != ".lock")
        except OSError as exc:
            raise paths.refused(exc, field, path) from None
        if theirs:
            listed = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
            raise DscInputError(field, f"{path} already holds files dsc did not write ({listed}): choose a new or "
                                "empty output directory (dsc never deletes files it did not write, and --fresh "
                                "does not either)")


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "its inputs changed"
