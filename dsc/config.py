"""Config base class and the translation of schema errors into dsc's messages.

A config class is the schema: its fields, types, defaults and descriptions are what YAML
accepts, what `dsc stages` prints and what the docs show. Configs are frozen and reject
unknown keys (a misspelled key is an error with a "did you mean", never a silent default).
"""
from __future__ import annotations

import re

from typing import Any, Iterator, Literal, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict

from dsc.errors import DscInputError, did_you_mean


class Config(BaseModel):
    """Frozen, strict base for every recipe section and stage config: no text read as a number
    or a boolean (`"1024"`, `"yes"`), no boolean taken for an integer, finite floats only."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)

    @classmethod
    def parse(cls, data: Any, path: str) -> "Config":
        """Validate `data` against this schema; errors name `path`.field and the fix."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DscInputError(path, f"must be a mapping of {cls.__name__} fields, got {data!r}")
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            from dsc.errors import RecipeError

            raise RecipeError(list(translate_errors(exc, cls, path))) from None


class StageConfig(Config):
    """What the core reads of every stage's config (dsc.recipe validates with it, dsc.runner runs
    with it); a stage overrides what differs. Fields a stage may declare and the core then reads:
    `data` (a data source name, default: the recipe's first), `split`, `context_length`, `seq_len`,
    `eval_split` — checked against the data section before anything loads."""

    @property
    def edits_input(self) -> bool:
        """Whether the stage may change the model it is given in place (the runner then hands it a
        model it can spare)."""
        return True

    @property
    def needs_data(self) -> bool:
        """Whether the stage reads its data source (its split is then checked at validation)."""
        return True

    def model_refs(self) -> dict[str, str]:
        """Model folders this config names (field → path): checked to exist at validation."""
        return {}

    def file_refs(self) -> dict[str, str]:
        """Files this config names (field → path): checked to exist at validation."""
        return {}


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(value: str | None, allow_auto: bool = True) -> str | None:
    """A torch device name: cpu, cuda, cuda:N, mps (and auto where the field allows it)."""
    if value is not None and (not DEVICE.fullmatch(value) or (value == "auto" and not allow_auto)):
        raise ValueError(f"must be {'auto, ' if allow_auto else ''}cpu, cuda, cuda:N (N a number) or mps")
    return value


def check_regexes(patterns: list[str], prefix: str | None = None) -> list[str]:
    """Each pattern compiles (with `prefix`, only the ones that carry it, the prefix removed)."""
    for p in patterns:
        if prefix is not None and not p.startswith(prefix):
            continue
        try:
            re.compile(p.removeprefix(prefix) if prefix else p)
        except re.error as exc:
            raise ValueError(f"{p!r} is not a valid regular expression: {exc}") from None
    return patterns


def _join(path: str, loc: tuple) -> str:
    out = path
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that `loc` points into, for "did you mean"."""
    model: Any = cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = next((a for a in get_args(field.annotation) if hasattr(a, "model_fields")), field.annotation)
    return list(getattr(model, "model_fields", {}).keys())


_TEMPLATES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "missing": "required field is missing",
    "finite_number": "must be a finite number",
    "int_from_bool": "must be an integer",
}
NUMBER_KINDS = ("int_type", "int_parsing", "float_type", "float_parsing", "int_from_float")


def _hint(kind: str, value: Any) -> str:
    """Why YAML gave this value the wrong type, and how to write it."""
    if kind in NUMBER_KINDS + ("bool_type", "bool_parsing") and isinstance(value, str):
        if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            mantissa, exp = re.split("[eE]", value.strip())
            return f" (YAML reads {value} as text: write {mantissa if '.' in mantissa else mantissa + '.0'}e{exp})"
        return " (a quoted value is text: write it without quotes)"
    if kind in NUMBER_KINDS and isinstance(value, bool):
        return " (true / false is not a number)"
    return ""


def translate_errors(exc: pydantic.ValidationError, cls: type[BaseModel], path: str) -> Iterator[DscInputError]:
    for err in exc.errors():
        # Tagged unions add the tag to loc ('text', 'path'): drop it so paths read as YAML.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _join(path, loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            name = str(loc[-1])
            hint = did_you_mean(name, _fields_at(cls, loc))
            known = ", ".join(_fields_at(cls, loc))
            yield DscInputError(where, f"unknown field{hint or f' (known fields: {known})'}")
            continue
        if kind in _TEMPLATES:
            msg = _TEMPLATES[kind].format(**(err.get("ctx") or {}))
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
        if kind != "missing":
            msg += f", got {err['input']!r}{_hint(kind, err['input'])}"
        yield DscInputError(where, msg)


def describe_fields(cls: type[BaseModel]) -> list[dict[str, str]]:
    """Fields of a config class as rows (name, type, default, help) for `dsc stages`."""
    rows = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if get_origin(ann) is Literal:
            type_name = "|".join(str(a) for a in get_args(ann))
        else:
            type_name = str(ann).replace("typing.", "") if get_args(ann) else getattr(ann, "__name__", str(ann))
            type_name = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", type_name)  # dsc.zeroshot.PiqaTask → PiqaTask
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        rows.append({"name": name, "type": type_name, "default": default, "help": field.description or "",
                     "nested": _config_classes(ann)})
    return rows


def _config_classes(ann) -> list[type]:
    """Config classes inside an annotation (dict[str, A | B] → [A, B]): `dsc stages` lists their fields too."""
    if isinstance(ann, type) and issubclass(ann, Config):
        return [ann]
    return [c for arg in get_args(ann) for c in _config_classes(arg)]
