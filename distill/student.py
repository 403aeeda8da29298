"""`distill.student`: a student other than the incoming model — built fresh from a transformers
config (seeded random weights, optionally the teacher's embeddings) or loaded from a saved
folder — checked to predict over the teacher's vocabulary before any training."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from dsc import hf
from dsc.distill.config import StudentConfig
from dsc.errors import DscInputError, FieldError, did_you_mean
from dsc.models import ModelRef, build_from_config, load_model, load_tokenizer, resolve

# Facts of the tokenizer and the data that a student built from a config takes from the teacher.
INHERITED = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def _config_class(model_type: str):
    types = hf.causal_lm_model_types()
    if model_type not in types:
        hint = did_you_mean(model_type, types)
        raise ValueError(f"model_type {model_type!r} has no causal LM in transformers{hint} (e.g. llama, qwen2, "
                         "mistral)")
    return hf.config_class(model_type)


def _fields(config_cls) -> set[str]:
    """What a config class accepts: its constructor's named parameters and its serialized keys."""
    params = inspect.signature(config_cls.__init__).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return named | set(config_cls().to_dict())


def check_config(raw: dict) -> None:
    """Schema check of `student.config` without building a model: model_type names a causal-LM
    family, every key is a field of its config class (transformers would keep a misspelled key
    as a silent extra attribute), and the class accepts the values. Raises ValueError."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("needs model_type, the transformers family to build (e.g. model_type: llama)")
    config_cls = _config_class(model_type)
    known = _fields(config_cls)
    for key in raw:
        if key not in known:
            raise ValueError(f"{key!r} is not a field of {config_cls.__name__}{did_you_mean(str(key), known)}")
    try:
        config_cls(**{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as exc:  # transformers raises ValueError, TypeError or huggingface_hub's own errors
        raise ValueError(f"{config_cls.__name__} refuses it: {' '.join(str(exc).split())}") from None


def vocab(model) -> int:
    """Logits per position: what teacher and student must agree on."""
    return model.get_output_embeddings().out_features


def build(spec: StudentConfig, teacher, seed: int, tokenizer=None, base_dir: Path = Path(".")):
    """The student of `spec` in float32 on CPU, and a description of it for the stage's metrics."""
    if spec.config is not None:
        model = _from_config(spec, teacher, seed)
    else:
        model = _load(spec.path, tokenizer, base_dir)
    _check_vocab(vocab(model), teacher, "student.path" if spec.path is not None else "student.config.vocab_size")
    text = model.config.get_text_config()
    info = {"source": "config" if spec.config is not None else spec.path, "init": spec.init,
            "architecture": type(model).__name__, "model_type": model.config.model_type,
            "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
            "params": sum(p.numel() for p in model.parameters())}
    return model.float(), info


def _check_vocab(size: int, teacher, where: str) -> None:
    if size != vocab(teacher):
        raise FieldError(where, f"the student predicts {size} tokens, the teacher {vocab(teacher)}: distillation "
                                "compares next-token distributions over one vocabulary; use a student of the "
                                "teacher's tokenizer (a `config` student takes the teacher's vocab_size when it "
                                "is left out)")


def _from_config(spec: StudentConfig, teacher, seed: int):
    t = teacher.config.get_text_config()
    given = {k: v for k, v in spec.config.items() if k != "model_type"}
    inherited = {k: getattr(t, k) for k in INHERITED if getattr(t, k, None) is not None and k not in given}
    config = hf.config_for_model(spec.config["model_type"], **inherited, **given)
    _check_vocab(config.get_text_config().vocab_size, teacher, "student.config.vocab_size")  # before allocating
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's generator
        torch.manual_seed(seed)
        model = build_from_config(config, dtype=torch.float32)
    if spec.init == "teacher_embeddings":
        _copy_embeddings(model, teacher)
    return model


@torch.no_grad()
def _copy_embeddings(student, teacher) -> None:
    """The teacher's token embeddings and LM head (a tied student gets the embeddings only)."""
    ds, dt = student.config.get_text_config().hidden_size, teacher.config.get_text_config().hidden_size
    if ds != dt:
        raise FieldError("student.init", f"teacher_embeddings copies the teacher's {dt}-wide embeddings into a "
                                         f"{ds}-wide student: set student.config.hidden_size: {dt} or init: random")
    emb = student.get_input_embeddings().weight
    emb.copy_(teacher.get_input_embeddings().weight)
    head = student.get_output_embeddings().weight
    if head is not emb:
        head.copy_(teacher.get_output_embeddings().weight)


def _load(path: str, tokenizer, base_dir: Path):
    """A saved model directory, refused when it carries a tokenizer other than the teacher's."""
    from dsc.data.pipeline import tokenizer_fingerprint

    ref = ModelRef(path=path)
    try:
        source = resolve(ref, base_dir, "student.path")
        folder = Path(source.location)
        if tokenizer is not None and source.kind == "dir" and any(
                (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            theirs = tokenizer_fingerprint(load_tokenizer(source, ref, "student.path"))
            if theirs != tokenizer_fingerprint(tokenizer):
                raise FieldError("student.path", f"{folder} has a tokenizer other than the teacher's: distillation "
                                                 "compares next-token distributions over one vocabulary; choose a "
                                                 "student of the teacher's tokenizer")
        return load_model(source, ref, "student.path")
    except FieldError:
        raise
    except DscInputError as exc:  # named as a field of the stage, so the runner prefixes its recipe path
        raise FieldError(exc.path, exc.message) from None
