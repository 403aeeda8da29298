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
    """Frozen, strict base for every recipe section and stage config."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

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
}


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
            msg += f", got {err['input']!r}"
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
