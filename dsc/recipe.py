"""The recipe: YAML → a validated, frozen `Recipe`, checked whole before any model loads.

    teacher: default                  # or {path: ..., trust_remote_code: false, dtype: float32}
    student: ../models/small          # optional: where the stages start (default: the teacher)
    data:                             # named sources (default: text sampled from the teacher)
      wiki: {type: text, path: ../data/wiki.valid.raw, splits: {eval: 1.0}}
    stages:                           # ordered; the same stage may appear twice
      - evaluate: {data: wiki, context_length: 512}
    output: ../runs/demo              # or {dir: ..., save_model: true}
    seed: 0

Relative paths resolve against the recipe file's folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
from typing import Any

import yaml
from pydantic import Field, field_validator

from dsc import paths, yamlio
from dsc.config import Config, check_device
from dsc.data.sources import SOURCE_CLASSES, check_exists, require_file
from dsc.errors import DscInputError, RecipeError, did_you_mean, gather
from dsc.models import ModelRef, resolve
from dsc.registry import STAGES
from dsc.rundir import check_output
from dsc.tracking import TrackingConfig

TOP_LEVEL = ("teacher", "student", "data", "stages", "output", "seed", "device", "cache_dir", "tracking")
DEFAULT_DATA = {"generated": {"type": "teacher"}}


class Output(Config):
    dir: str = Field(description="run directory (relative to the recipe's folder)")
    save_model: bool = Field(True, description="write the final Lite model to OUT/model")


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: Config
    path: str  # "stages[1].evaluate", used to prefix errors raised while the stage runs


@dataclass(frozen=True)
class Recipe:
    teacher: ModelRef
    data: dict[str, Any]
    stages: tuple[StageSpec, ...]
    output: Output
    seed: int = 0
    device: str = "auto"
    cache_dir: str | None = None
    base_dir: Path = field(default=Path("."))
    student: ModelRef | None = None  # where the stages start (default: the teacher itself)
    tracking: TrackingConfig | None = None  # experiment tracker (TensorBoard / MLflow)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every default filled in, as written to OUT/recipe.yaml."""
        return {
            "teacher": self.teacher.model_dump(),
            **({"student": self.student.model_dump()} if self.student else {}),
            "data": {k: v.model_dump() for k, v in self.data.items()},
            "stages": [{s.name: s.config.model_dump()} for s in self.stages],
            "output": self.output.model_dump(),
            "seed": self.seed,
            "device": self.device,
            "cache_dir": self.cache_dir,
            **({"tracking": self.tracking.model_dump()} if self.tracking else {}),
        }

    def to_yaml(self) -> str:
        """`to_dict()` as written to OUT/recipe.yaml (and into model cards and trackers)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _Top(Config):
    seed: int = Field(0, ge=0, lt=2**32)
    device: str = "auto"
    cache_dir: str | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)


def load_recipe(path: str | Path, output: str | None = None) -> Recipe:
    """Read and validate a recipe file. `output` (a CLI override) is relative to the CWD."""
    path = Path(path)
    if paths.kind(path, "recipe") != "file":
        raise DscInputError("recipe", f"file not found: {path}")
    raw = yamlio.load(path)
    if output is not None and isinstance(raw, dict):  # the CLI's -o replaces the directory, keeps the other fields
        kept = raw.get("output") if isinstance(raw.get("output"), dict) else {}
        raw = dict(raw, output={**kept, "dir": str(Path(output).resolve())})
    return validate(raw, base_dir=path.resolve().parent, default_output=f"runs/{path.stem}")


def validate(raw: Any, base_dir: Path = Path("."), default_output: str | None = None) -> Recipe:
    """Validate a whole recipe; every problem found is reported at once (RecipeError)."""
    if not isinstance(raw, dict):
        raise DscInputError("recipe", f"must be a mapping with keys {', '.join(TOP_LEVEL)}, got {type(raw).__name__}")
    problems: list[DscInputError] = []
    known = ", ".join(TOP_LEVEL)
    for key in raw:
        if key not in TOP_LEVEL:
            hint = did_you_mean(str(key), TOP_LEVEL) or f" (known: {known})"
            problems.append(DscInputError(str(key), f"unknown top-level key{hint}"))
    top = gather(problems, _Top.parse, {k: raw[k] for k in ("seed", "device", "cache_dir") if k in raw}, "")
    teacher = gather(problems, _model_ref, raw.get("teacher", "default"), base_dir, "teacher")
    student = gather(problems, _model_ref, raw["student"], base_dir, "student") if "student" in raw else None
    data = gather(problems, _data, raw.get("data"), base_dir) or {}
    stages = gather(problems, _stages, raw.get("stages")) or ()
    for spec in stages:  # model folders a stage names (distill.student.path) must exist now, not hours in
        for name, path in spec.config.model_refs().items():
            gather(problems, resolve, ModelRef(path=path), base_dir, f"{spec.path}.{name}")
        for name, path in spec.config.file_refs().items():  # and files (evaluate.tasks.*.path)
            gather(problems, require_file, path, base_dir, f"{spec.path}.{name}")
    output = gather(problems, _output, raw.get("output", default_output))
    tracking = gather(problems, TrackingConfig.parse, raw["tracking"], "tracking") if "tracking" in raw else None
    if output is not None:
        gather(problems, check_output, (base_dir / output.dir).resolve(), "output")
    if top is not None and top.cache_dir is not None:
        gather(problems, _check_cache_dir, (base_dir / top.cache_dir).resolve())
    if stages:
        gather(problems, _stage_order, stages)
    if data and stages:
        gather(problems, _cross_stage, stages, data, _position_limit(teacher, base_dir))
    if problems:
        raise RecipeError(problems)
    return Recipe(teacher=teacher, student=student, data=data, stages=stages, output=output, seed=top.seed,
                  device=top.device, cache_dir=top.cache_dir, base_dir=base_dir, tracking=tracking)


def _model_ref(raw: Any, base_dir: Path, name: str) -> ModelRef:
    ref = ModelRef.parse({"path": raw} if isinstance(raw, str) else raw, name)
    resolve(ref, base_dir, f"{name}.path")  # a missing path or package fails now, not after minutes of work
    return ref


def _data(raw: Any, base_dir: Path) -> dict[str, Any]:
    raw = DEFAULT_DATA if raw is None else raw
    if not isinstance(raw, dict) or not raw:
        raise DscInputError("data", f"must map source names to sources ({{name: {{type: text, path: ...}}}}), got {raw!r}")
    out, problems = {}, []
    for name, spec in raw.items():
        where = f"data.{name}"
        if not isinstance(name, str):
            problems.append(DscInputError(where, f"a source name must be text; YAML read {name!r} as "
                                          f"{type(name).__name__}: quote it, e.g. '{name}':"))
            continue
        kind = spec.get("type") if isinstance(spec, dict) else spec
        if not isinstance(kind, str) or kind not in SOURCE_CLASSES:
            hint = did_you_mean(kind, SOURCE_CLASSES) if isinstance(kind, str) else ""
            problems.append(DscInputError(f"{where}.type", f"must be one of {', '.join(SOURCE_CLASSES)}, got {kind!r}{hint}"))
            continue
        src = gather(problems, SOURCE_CLASSES[kind].parse, spec, where)
        if src is not None and gather(problems, check_exists, src, base_dir, where) is None:
            out[name] = src
    if problems:
        raise RecipeError(problems)
    return out


def _stages(raw: Any) -> tuple[StageSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise DscInputError("stages", "must be a non-empty list like [{evaluate: {}}], got " + repr(raw))
    specs, problems = [], []
    for i, entry in enumerate(raw):
        where = f"stages[{i}]"
        entry = {entry: {}} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(DscInputError(where, f"must be a mapping with one stage name, like {{evaluate: {{...}}}}, got {entry!r}"))
            continue
        (name, cfg), = entry.items()
        if name not in STAGES:
            problems.append(DscInputError(where, f"unknown stage {name!r}{did_you_mean(str(name), STAGES)} "
                                                 f"(stages: {', '.join(STAGES)})"))
            continue
        config = gather(problems, STAGES[name].config.parse, cfg, f"{where}.{name}")
        if config is not None:
            specs.append(StageSpec(name, config, f"{where}.{name}"))
    if problems:
        raise RecipeError(problems)
    return tuple(specs)


def _check_cache_dir(path: Path) -> None:
    if paths.kind(path, "cache_dir") not in ("missing", "dir"):
        raise DscInputError("cache_dir", f"{path} is a file, not a folder")


def _output(raw: Any) -> Output:
    if raw is None:
        raise DscInputError("output", "required: the run directory, e.g. `output: ../runs/my_run`")
    return Output.parse({"dir": raw} if isinstance(raw, str) else raw, "output")


def _position_limit(teacher: ModelRef | None, base_dir: Path) -> int | None:
    """The teacher's context limit (config.json's max_position_embeddings, or a GGUF file's
    context_length), read without loading it."""
    import json

    try:
        source = resolve(teacher, base_dir) if teacher else None
        if source is not None and source.kind == "dir":
            return json.loads((Path(source.location) / "config.json").read_text()).get("max_position_embeddings")
        if source is not None and source.kind == "gguf":
            return gguf_context_length(Path(source.location) / source.gguf_file)
    except (DscInputError, OSError, ValueError, KeyError, struct_error):
        pass
    return None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_context_length(path: Path) -> int | None:
    """`{arch}.context_length` from a GGUF file's key-value header, read up to that key (gguf's
    reader parses the whole tokenizer first: seconds, for a check that must be instant)."""
    import mmap
    import struct

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            return None
        pos, arch = 24, None  # magic, version (u32), tensor count (u64), kv count (u64)
        (count,) = struct.unpack_from("<Q", mm, 16)

        def read(kind: int):
            nonlocal pos
            if kind == 8:  # string: u64 length + bytes
                (n,) = struct.unpack_from("<Q", mm, pos)
                pos += 8 + n
                return bytes(mm[pos - n:pos]).decode("utf-8", "replace")
            if kind == 9:  # array: item type (u32), count (u64), items
                item, n = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                for _ in range(n):
                    read(item)
                return None
            fmt = "<" + _GGUF_SCALARS[kind]
            (value,) = struct.unpack_from(fmt, mm, pos)
            pos += struct.calcsize(fmt)
            return value

        for _ in range(count):
            key = read(8)
            (kind,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            value = read(kind)
            if key == "general.architecture":
                arch = value
            elif arch is not None and key == f"{arch}.context_length":
                return int(value)
    return None


def _stage_order(stages: tuple[StageSpec, ...]) -> None:
    """Each stage gets weights it can work on: after a quantizer, only what takes quantized
    weights (evaluate; qat on a 3/4/8-bit grid) may follow. Checked here, not hours in."""
    problems, kind, by = [], "float", None
    for spec in stages:
        stage = STAGES[spec.name]
        takes_own_student = getattr(spec.config, "student", None) is not None  # distill: the incoming model is unused
        if kind not in stage.takes and not takes_own_student:
            what = {"grid": "3/4/8-bit grid weights", "int8": "int8 weights"}[kind]
            fix = (f"put {spec.name} before {by} (quantize last)" if stage.takes == ("float",) else
                   f"{spec.name} takes {' or '.join(stage.takes)} weights: start it from the float model instead")
            problems.append(DscInputError(spec.path, f"would get the {what} that {by} wrote: {fix}"))
        if stage.gives is not None:
            kind, by = stage.gives, spec.path
    problems += _artifact_rules(stages)
    if problems:
        raise RecipeError(problems)


def _artifact_rules(stages: tuple[StageSpec, ...]) -> list[DscInputError]:
    """Export files land side by side in OUT/export/ (one name each), and a llama.cpp evaluation
    measures the GGUF of an export before it."""
    problems, files, fresh = [], {}, False
    for spec in stages:
        cfg = spec.config
        if STAGES[spec.name].artifact:
            if cfg.file in files:
                problems.append(DscInputError(f"{spec.path}.file", f"{files[cfg.file]} writes {cfg.file} too: give "
                                              "each export its own file name (both land in OUT/export/)"))
            files.setdefault(cfg.file, spec.path)
            fresh = fresh or cfg.format == "gguf"  # a report is no model file
        elif STAGES[spec.name].changes_model:
            fresh = False  # an export before this stage holds the model as it was
        if getattr(cfg, "runtime", "transformers") == "llama.cpp":
            from dsc import llamacpp

            if not fresh:
                problems.append(DscInputError(f"{spec.path}.runtime", "llama.cpp measures a GGUF file: put an "
                                              "`export` stage (format: gguf) after the last stage that changes the "
                                              "model and before this evaluate stage"))
            elif cfg.if_missing == "error" and not llamacpp.available():
                problems.append(DscInputError(f"{spec.path}.runtime", f"llama.cpp needs llama-cpp-python, which is "
                                              f"not installed: {llamacpp.INSTALL}; or set `if_missing: skip`"))
    return problems


def _cross_stage(stages: tuple[StageSpec, ...], data: dict[str, Any], limit: int | None) -> None:
    """Rules that span sections: a stage's data source must exist and have the split it reads,
    and its windows must fit the blocks and the model."""
    problems = []
    for spec in stages:
        cfg, where = spec.config, spec.path
        name = getattr(cfg, "data", None)
        if name is not None and name not in data:
            problems.append(DscInputError(f"{where}.data", f"unknown data source {name!r}"
                                          f"{did_you_mean(name, data)} (defined: {', '.join(data)})"))
            continue
        name = name or next(iter(data))  # stages default to the first source
        if not cfg.needs_data:  # e.g. fp8 dynamic, int8 weight-only: no calibration
            continue
        split, length = getattr(cfg, "split", None), getattr(cfg, "context_length", None)
        if split not in (None, "all") and data[name].splits.get(split, 0) == 0:
            problems.append(DscInputError(f"{where}.split", f"source {name!r} gives split {split!r} no blocks: "
                                          "add it to that source's `splits` or use split: all"))
        eval_split = getattr(cfg, "eval_split", None)
        if eval_split not in (None, "none", "all") and data[name].splits.get(eval_split, 0) == 0:
            problems.append(DscInputError(f"{where}.eval_split", f"source {name!r} gives split {eval_split!r} no "
                                          "blocks: add it to that source's `splits`, or use eval_split: none"))
        seq_len = getattr(cfg, "seq_len", None)
        if seq_len and seq_len > data[name].block_size:
            problems.append(DscInputError(f"{where}.seq_len", f"{seq_len} > data.{name}.block_size "
                                          f"({data[name].block_size}): lower seq_len or raise block_size"))
        if length and split not in (None, "all") and length > data[name].block_size:
            problems.append(DscInputError(f"{where}.context_length", f"{length} > data.{name}.block_size "
                                          f"({data[name].block_size}): windows would join blocks that are not adjacent "
                                          "in the text; raise block_size or use split: all"))
        if length and limit and length > limit:
            problems.append(DscInputError(f"{where}.context_length", f"{length} exceeds the teacher's "
                                          f"max_position_embeddings ({limit}): lower it"))
        prompt, decode = getattr(cfg, "prompt_length", None), getattr(cfg, "decode_tokens", 0) or 0
        if getattr(cfg, "speed", True) and prompt and limit and prompt + decode > limit:
            problems.append(DscInputError(f"{where}.prompt_length", f"prompt_length + decode_tokens = {prompt + decode}"
                                          f" exceeds the teacher's context ({limit} positions): lower them"))
    if problems:
        raise RecipeError(problems)
