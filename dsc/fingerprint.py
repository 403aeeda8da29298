"""Content hashes and atomic writes: what resume and the data cache rely on."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

CHUNK = 1 << 20


def hash_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str))


def hash_files(paths: Iterable[Path]) -> str:
    """sha256 over file names and contents (streamed: multi-GB checkpoints stay out of RAM)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode() + b"\0")
        _feed(h, path)
    return h.hexdigest()


def _feed(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)


def file_hash(path: Path) -> str:
    """sha256 of one file's contents."""
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def folder_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """name → [size, sha256] of every file in `folder` (not recursive): what a run directory
    records of the checkpoints and models it wrote, to verify them before it trusts them."""
    return {p.name: [p.stat().st_size, file_hash(p)] for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name not in skip}


def folder_matches(folder: Path, recorded: dict, skip: tuple[str, ...] = ()) -> str | None:
    """None when `folder` holds exactly the recorded files, else what differs. Entries written by
    dsc before 0.2 record [size, mtime_ns] instead of [size, sha256]: compared as such."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is missing"
    have = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in skip)
    if have != sorted(recorded):
        gone, extra = sorted(set(recorded) - set(have)), sorted(set(have) - set(recorded))
        return f"files {'missing: ' + ', '.join(gone) if gone else ''}{'; ' if gone and extra else ''}" \
               f"{'added: ' + ', '.join(extra) if extra else ''}"
    for name, (size, check) in sorted(recorded.items()):
        p = folder / name
        st = p.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, {size} were written"
        if isinstance(check, str) and file_hash(p) != check:
            return f"{name} differs from what was written (its sha256 changed)"
        if isinstance(check, int) and st.st_mtime_ns != check:
            return f"{name} changed since it was written"
    return None


def weights_fingerprint(model) -> str:
    """sha256 over a model's state dict (names, dtypes, bytes): identifies in-memory weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
