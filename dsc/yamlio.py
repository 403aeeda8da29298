"""Reading a recipe file strictly: UTF-8 text, YAML with no duplicate keys, keys that are text,
a bounded depth. Every problem is a DscInputError naming the file, the line and the fix.

PyYAML (YAML 1.1) lets the last of two equal keys win silently, reads `yes:` / `off:` as boolean
keys, and recurses once per nesting level; each is refused here before the schema sees the
recipe. Integer keys pass (`layer_map: {0: 3}`); where a key is a name (a data source, a task),
the recipe's validation asks for text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dsc.errors import DscInputError, RecipeError

MAX_DEPTH = 64  # far beyond any recipe; keeps the composer's recursion bounded
MAX_BYTES = 16 << 20  # a recipe is a few KB: a huge file is a wrong path


def read_text(path: Path, field: str = "recipe") -> str:
    """The file as UTF-8 text (a byte-order mark is allowed), or an error naming what it is."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DscInputError(field, f"{path} is {size:,} bytes: not a recipe (they are a few KB); check the path")
        data = path.read_bytes()
    except OSError as exc:
        raise DscInputError(field, f"cannot read {path}: {exc.strerror or exc}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DscInputError(field, f"{path} is UTF-16 text: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DscInputError(field, f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                            "save it as UTF-8 (a binary file is not a recipe)") from None
    if "\x00" in text:
        raise DscInputError(field, f"{path} holds NUL bytes: a binary file is not a recipe")
    return text


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _check_nodes(root: yaml.Node, path: Path) -> list[DscInputError]:
    """Duplicate keys and boolean / null keys, with their field path and line (iterative: no recursion)."""
    problems: list[DscInputError] = []
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    seen_nodes: set[int] = set()  # an alias is the same node again: visit it once (no "billion laughs")
    while stack:
        node, where, depth = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if depth > MAX_DEPTH:
            problems.append(DscInputError(where or "recipe", f"nested deeper than {MAX_DEPTH} levels ({_where(node)})"))
            continue
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, f"{where}[{i}]", depth + 1) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], yaml.Node] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    problems.append(DscInputError(where or "recipe", f"a key that is a list or mapping ({_where(key)})"))
                    continue
                name = key.value
                child = f"{where}.{name}" if where else name
                if key.tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"):  # yes: no: on: off: ~:
                    kind = "a boolean" if key.tag.endswith("bool") else "null"
                    problems.append(DscInputError(child, f"YAML reads the key {name!r} as {kind}, not text "
                                                         f"({_where(key)}): quote it, e.g. '{name}':"))
                elif (key.tag, name) in seen:
                    first = seen[(key.tag, name)]
                    problems.append(DscInputError(child, f"duplicate key ({_where(key)}; first at {_where(first)}): "
                                                         "YAML would silently keep the last one; remove one"))
                else:
                    seen[(key.tag, name)] = key
                stack.append((value, child, depth + 1))
    return problems


def load(path: Path, field: str = "recipe") -> Any:
    """Parse a recipe file into plain Python data, refusing what PyYAML would accept silently."""
    text = read_text(path, field)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise DscInputError(field, f"{path} is nested too deeply to be a recipe") from None
    except yaml.YAMLError as exc:
        raise DscInputError(field, f"{path} is not valid YAML: {exc}") from None
    if node is None:
        return None
    problems = _check_nodes(node, path)
    if problems:
        raise RecipeError(problems)
    try:
        return yaml.SafeLoader(text).get_single_data()
    except RecursionError:
        raise DscInputError(field, f"{path} is nested too deeply to be a recipe") from None
    except yaml.YAMLError as exc:
        raise DscInputError(field, f"{path} is not valid YAML: {exc}") from None
