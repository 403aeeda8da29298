"""Data source schemas and readers: local text, JSONL, parquet, `datasets`, and text sampled
from the teacher (data-free). A source only yields documents; packing and splitting live in
`dsc.data.pipeline`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Literal, Union

from pydantic import Field, field_validator, model_validator

from dsc import paths
from dsc.config import Config
from dsc.errors import DscInputError
from dsc.fingerprint import hash_files, hash_json

SPLITS = ("calibration", "train", "eval")


class SourceBase(Config):
    max_tokens: int | None = Field(None, gt=0, description="keep only the first N tokens of the stream")
    block_size: int = Field(512, gt=1, description="tokens per packed block")
    splits: dict[str, float] = Field(
        default_factory=lambda: {"calibration": 0.1, "train": 0.8, "eval": 0.1},
        description="fraction of blocks in each split (calibration, train, eval); must sum to 1")

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, v: dict[str, float]) -> dict[str, float]:
        for name, frac in v.items():
            if name not in SPLITS:
                raise ValueError(f"unknown split {name!r}: splits are {', '.join(SPLITS)}")
            if not 0 <= frac <= 1:
                raise ValueError(f"fraction of {name!r} must be in [0, 1]")
        if abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (they sum to {sum(v.values()):g})")
        return v

    @model_validator(mode="after")
    def _enough_tokens(self):
        if self.max_tokens is not None and self.max_tokens < self.block_size:
            raise ValueError(f"max_tokens ({self.max_tokens}) < block_size ({self.block_size}): not one block")
        return self


class FileSource(SourceBase):
    path: str = Field(description="file path (relative paths are relative to the recipe's folder)")


class TextSource(FileSource):
    type: Literal["text"] = "text"
    line_join: str | None = Field(None, description="if set: drop empty lines and join the rest with this string "
                                                     "(WikiText convention: '\\n\\n'); else the file is one document")


class JsonlSource(FileSource):
    type: Literal["jsonl"] = "jsonl"
    field: str = Field("text", description="the JSON key holding the text")


class ParquetSource(FileSource):
    type: Literal["parquet"] = "parquet"
    field: str = Field("text", description="the column holding the text")


class DatasetsSource(SourceBase):
    type: Literal["datasets"] = "datasets"
    path: str = Field(description="a folder written by `Dataset.save_to_disk`, or a hub dataset id")
    name: str | None = Field(None, description="dataset configuration name (hub datasets)")
    split: str = Field("train", description="the dataset's own split to read")
    field: str = Field("text", description="the column holding the text")


class TeacherSource(SourceBase):
    """Data-free: sequences sampled from the teacher itself (as in LLM-QAT)."""

    type: Literal["teacher"] = "teacher"
    num_sequences: int = Field(64, gt=0, description="how many sequences to sample")
    length: int = Field(256, gt=1, description="tokens per sequence")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int = Field(0, ge=0, description="sample from the top-k tokens only (0: the full distribution)")
    prompt: str = Field("", description="text every sequence starts from (empty: the BOS token)")
    batch_size: int = Field(16, gt=0, description="sequences generated at once")
    seed: int | None = Field(None, ge=0, description="sampling seed (default: the recipe's seed)")

    @model_validator(mode="after")
    def _enough_samples(self):
        total = self.num_sequences * (self.length + 1)  # each sequence ends with EOS
        if total < self.block_size:
            raise ValueError(f"num_sequences × (length + 1) = {total} tokens < block_size ({self.block_size}): "
                             "sample more or lower block_size")
        return self


DataSource = Union[TextSource, JsonlSource, ParquetSource, DatasetsSource, TeacherSource]
SOURCE_CLASSES = {"text": TextSource, "jsonl": JsonlSource, "parquet": ParquetSource,
                  "datasets": DatasetsSource, "teacher": TeacherSource}


def resolve_file(path: str, base_dir: Path) -> Path:
    """A recipe's path: `~` expanded, relative paths from the recipe's folder."""
    full = Path(path).expanduser()
    return full if full.is_absolute() else (Path(base_dir) / full).resolve()


def require_file(path: str, base_dir: Path, field: str) -> Path:
    """The resolved file, or an error naming the field (missing files fail before any model loads)."""
    full = resolve_file(path, base_dir)
    found = paths.kind(full, field)
    if found == "dir":
        raise DscInputError(field, f"{full} is a folder, not a file")
    if found != "file":
        raise DscInputError(field, f"file not found: {full} (relative paths start at the recipe's folder)")
    return full


def resolve_path(src: Config, base_dir: Path) -> Path:
    return resolve_file(src.path, base_dir)


def check_exists(src: Config, base_dir: Path, field: str) -> None:
    """Missing files fail during validation, before any model loads."""
    if isinstance(src, FileSource):
        require_file(src.path, base_dir, f"{field}.path")
    if isinstance(src, DatasetsSource):
        path = resolve_path(src, base_dir)
        found = paths.kind(path, f"{field}.path")
        looks_local = src.path.startswith((".", "/", "~")) or found != "missing"
        if looks_local and found != "dir":
            raise DscInputError(f"{field}.path", f"dataset folder not found: {path}")


def source_fingerprint(src: Config, base_dir: Path, teacher_fp: str) -> str:
    """Hash of what the source reads, computed without tokenizing."""
    options = src.model_dump(exclude={"block_size", "splits"})
    if isinstance(src, FileSource):
        return hash_json([options, hash_files([resolve_path(src, base_dir)])])
    if isinstance(src, DatasetsSource):
        path = resolve_path(src, base_dir)
        if path.is_dir():
            return hash_json([options, hash_files(sorted(p for p in path.rglob("*") if p.is_file()))])
        return hash_json([options, "hub"])
    return hash_json([options, teacher_fp])


def read_documents(src: Config, base_dir: Path, field: str) -> Iterator[str]:
    """Yield the documents of a file or `datasets` source, in order."""
    if isinstance(src, TextSource):
        text = resolve_path(src, base_dir).read_text(encoding="utf-8")  # text mode folds CRLF
        if src.line_join is None:
            yield text
        else:
            yield src.line_join.join(line for line in text.splitlines() if line.strip())
    elif isinstance(src, JsonlSource):
        with open(resolve_path(src, base_dir), encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DscInputError(f"{field}.path", f"line {lineno} is not JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise DscInputError(f"{field}.path", f"line {lineno} is not a JSON object") from None
                text = _field(row, src.field, f"{field}.field", f"line {lineno}")
                if text:
                    yield text
    elif isinstance(src, ParquetSource):
        import pyarrow.parquet as pq

        table = pq.read_table(resolve_path(src, base_dir))
        if src.field not in table.column_names:
            raise DscInputError(f"{field}.field", f"no column {src.field!r}; columns: {table.column_names}")
        yield from (t for t in table.column(src.field).to_pylist() if t)
    elif isinstance(src, DatasetsSource):
        yield from _read_datasets(src, base_dir, field)
    else:
        raise DscInputError(field, f"source type {src.type!r} produces tokens, not documents")


def _field(row: dict, key: str, field: str, where: str) -> str:
    if key not in row:
        raise DscInputError(field, f"{where} has no key {key!r}; keys: {sorted(row)}")
    return row[key]


def _read_datasets(src: DatasetsSource, base_dir: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DscInputError(field, "a `datasets` source needs the package: pip install 'dsc[data]'") from exc
    path = resolve_path(src, base_dir)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DscInputError(f"{field}.split", f"no split {src.split!r}; the folder has {list(ds)}")
            ds = ds[src.split]
    else:
        ds = datasets.load_dataset(src.path, src.name, split=src.split)
    if src.field not in ds.column_names:
        raise DscInputError(f"{field}.field", f"no column {src.field!r}; columns: {ds.column_names}")
    yield from (t for t in ds[src.field] if t)
