"""The context a stage runs in: tokenizer, data, teacher, device, logger, scratch folder.

Passed explicitly to every stage (no module-level state). The runner builds one from a recipe;
a notebook builds one with `Context.create(...)` around models it already holds.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsc.data.pipeline import TokenData, prepare, sample_from_teacher
from dsc.data.sources import TeacherSource
from dsc.errors import DscInputError, did_you_mean
from dsc.fingerprint import read_json, weights_fingerprint, write_json
from dsc.log import Progress
from dsc.tracking import Tracker


def default_cache_dir(configured: str | None = None, base_dir: Path = Path(".")) -> Path:
    """The shared token cache: the recipe's `cache_dir`, else $DSC_CACHE_DIR, else ~/.cache/dsc."""
    if configured:
        return (Path(base_dir) / configured).resolve()
    return Path(os.environ.get("DSC_CACHE_DIR", Path.home() / ".cache" / "dsc"))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DscInputError("device", f"{name!r} requested but CUDA is not available here: use device: cpu or auto")
    return torch.device(name)


@dataclass
class DataStore:
    """Named sources, prepared (tokenized or sampled) on first use and memoized."""

    sources: dict[str, Any]
    tokenizer: Any
    base_dir: Path = Path(".")
    cache_dirs: tuple[Path, ...] = ()  # looked up in order; a new stream is written to each
    seed: int = 0
    teacher_fp: str = ""  # identifies the teacher in the cache key of sampled data
    teacher: Callable[[], Any] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("dsc"))
    _ready: dict[str, TokenData] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TokenData:
        if name not in self._ready:
            if name not in self.sources:
                raise DscInputError("data", f"unknown data source {name!r}{did_you_mean(name, self.sources)}")
            src = self.sources[name]
            if isinstance(src, TeacherSource) and not self.teacher_fp and self.teacher is not None:
                self.teacher_fp = weights_fingerprint(self.teacher())  # an in-memory teacher (notebooks)
            self._ready[name] = prepare(name, src, self.tokenizer, base_dir=self.base_dir, cache_dirs=self.cache_dirs,
                                        seed=self.seed, teacher_fp=self.teacher_fp, generate=self._generate)
        return self._ready[name]

    def default(self) -> str:
        return next(iter(self.sources))

    def put(self, data: TokenData) -> None:
        """Register tokens prepared elsewhere (benchmarks, notebooks) under `data.name`."""
        self.sources.setdefault(data.name, None)
        self._ready[data.name] = data

    def _generate(self, src: TeacherSource) -> torch.Tensor:
        if self.teacher is None:
            raise DscInputError("data", "teacher-generated data needs a teacher: pass teacher= to the Context")
        progress = Progress("sampling teacher data", src.num_sequences, self.log)
        tokens = sample_from_teacher(self.teacher(), self.tokenizer, src, self.seed, progress.update)
        progress.close()
        return tokens


@dataclass
class Context:
    tokenizer: Any
    data: DataStore
    device: torch.device = torch.device("cpu")
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("dsc"))
    stage_dir: Path | None = None  # scratch folder of the running stage (renamed when it finishes)
    work_dir: Path | None = None  # the running stage's checkpoints: survive a kill, removed once it finishes
    baseline_dir: Path | None = None  # where teacher measurements are kept across stages and resumes
    teacher_loader: Callable[[], Any] | None = None
    tracker: Tracker = field(default_factory=Tracker)  # the recipe's `tracking` (no-op without)
    scope: str = "train"  # the running stage's folder name (NN-name): its metrics' prefix
    artifact_dir: Path | None = None  # where an artifact stage (export) writes its files
    artifacts: list[dict] = field(default_factory=list)  # files of finished artifact stages: {index, format, path}
    teacher_file: Path | None = None  # the teacher's GGUF file, when it came as one
    provenance: dict = field(default_factory=dict)  # what exported files say of their making (name, recipe, stage)
    _teacher: Any = None
    _baselines: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def create(cls, tokenizer, data: dict[str, Any] | None = None, teacher=None, *, seed: int = 0,
               device: str = "auto", cache_dir: str | Path | None = None, base_dir: str | Path = ".",
               log: logging.Logger | None = None) -> "Context":
        """For notebooks: a context around models already in memory."""
        log = log or logging.getLogger("dsc")
        ctx = cls(tokenizer=tokenizer, data=None, device=pick_device(device), seed=seed, log=log, _teacher=teacher)
        caches = (Path(cache_dir),) if cache_dir else ()
        ctx.data = DataStore(data or {}, tokenizer, Path(base_dir), caches, seed,
                             teacher=ctx.teacher if teacher is not None else None, log=log)
        return ctx

    def teacher(self):
        """The frozen teacher (loaded on first use)."""
        if self._teacher is None:
            if self.teacher_loader is None:
                raise DscInputError("teacher", "this stage needs the teacher: pass teacher= to Context.create")
            self._teacher = self.teacher_loader()
        self._teacher.eval().requires_grad_(False)
        return self._teacher

    def release_teacher(self) -> None:
        """Free the teacher's memory (reloaded if a later stage asks for it)."""
        if self.teacher_loader is not None:
            self._teacher = None

    def forget_teacher_if(self, model) -> None:
        """The runner shares the teacher object as the working model until a stage changes it."""
        if self._teacher is model:
            self._teacher = None

    def teacher_is(self, model) -> bool:
        return self._teacher is model

    def baseline(self, key: str, measure: Callable[[], dict]) -> dict:
        """Teacher metrics under one protocol, measured once per run (persisted for resumes)."""
        if key in self._baselines:
            return self._baselines[key]
        path = self.baseline_dir / f"{key[:16]}.json" if self.baseline_dir else None
        result = None
        if path is not None and path.is_file():
            try:
                result = read_json(path)
            except (OSError, ValueError) as exc:
                self.log.warning("teacher baseline %s is damaged (%s): measuring it again", path, exc,
                                 extra={"event": "damaged", "path": str(path)})
        if result is None:
            result = measure()
            if path is not None:
                write_json(path, result)
        self._baselines[key] = result
        return result
