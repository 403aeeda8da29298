"""`evaluate`: perplexity under a recorded protocol, size, speed and memory, of the current
model and of the teacher (measured by the same code in the same run, once per protocol)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from dsc.config import StageConfig
from dsc.errors import DscInputError, FieldError, RecipeError, did_you_mean, gather
from dsc.evaluation import param_counts, perplexity, speed, weight_bytes, windows
from dsc.fingerprint import hash_bytes, hash_json
from dsc.log import Progress
from dsc.stages import StageOutput
from dsc.zeroshot import TASK_CLASSES, Task, evaluate_task


class EvaluateConfig(StageConfig):
    data: str | None = Field(None, description="data source name (default: the recipe's first source)")
    split: Literal["eval", "train", "calibration", "all"] = Field("eval", description="which split to score")
    context_length: int = Field(512, gt=1, description="tokens per perplexity window")
    stride: int | None = Field(None, gt=0, description="window step (default: context_length, no overlap)")
    max_windows: int | None = Field(None, gt=0, description="score only the first N windows")
    batch_size: int = Field(1, gt=0, description="windows per forward pass")
    speed: bool = Field(True, description="measure prefill/decode tokens/s and peak memory")
    speed_batch_size: int = Field(1, gt=0, description="batch size of the speed measurement")
    prompt_length: int = Field(128, gt=0, description="prompt tokens for the prefill measurement")
    decode_tokens: int = Field(32, ge=0, description="tokens generated for the decode measurement")
    repeats: int = Field(3, gt=0, description="timed repeats (median reported) after one warm-up")
    teacher: bool = Field(True, description="also measure the teacher under the same protocol (once a run)")
    int8_kernels: bool = Field(False, description="measure an int8 model (`int8` stage) on CPU int8 kernels "
                                                  "(dsc.quantize.cpu), on a copy: the stage's model is unchanged")
    runtime: Literal["transformers", "llama.cpp"] = Field(
        "transformers", description="where the model is measured: transformers (the model in memory), or llama.cpp "
                                    "(the GGUF file of the last `export` stage before this one, through "
                                    "llama-cpp-python; the teacher is measured there as an F32 GGUF)")
    threads: int | None = Field(None, gt=0, description="llama.cpp threads (default: torch's thread count)")
    if_missing: Literal["error", "skip"] = Field(
        "error", description="runtime llama.cpp without llama-cpp-python installed: error (at `dsc validate`), or "
                             "skip (the stage records why; a later `dsc run` tries it again)")
    tasks: dict[str, Task] = Field(default_factory=dict, description="zero-shot tasks under lm-eval's conventions: "
                                   "name → {type: lambada|multiple_choice|piqa, path, limit, ...} (dsc.zeroshot)")

    @classmethod
    def parse(cls, data, path: str) -> "EvaluateConfig":
        """Tasks are parsed by their `type` first, so errors read `tasks.NAME.FIELD`."""
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            return super().parse(data, path)
        problems, tasks = [], {}
        for name, spec in data["tasks"].items():
            where = f"{path}.tasks.{name}"
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in TASK_CLASSES:
                hint = did_you_mean(kind, TASK_CLASSES) if isinstance(kind, str) else ""
                problems.append(DscInputError(f"{where}.type", f"must be one of {', '.join(TASK_CLASSES)}, "
                                              f"got {kind!r}{hint}"))
                continue
            tasks[name] = gather(problems, TASK_CLASSES[kind].parse, spec, where)
        cfg = gather(problems, super().parse, {**data, "tasks": {k: v for k, v in tasks.items() if v}}, path)
        if problems:
            raise RecipeError(problems)
        return cfg

    def file_refs(self) -> dict[str, str]:
        """Files this stage reads (field → path), checked when the recipe is validated."""
        return {f"tasks.{name}.{key}": p for name, task in self.tasks.items() for key, p in task.files().items()}

    @model_validator(mode="after")
    def _runtime(self):
        if self.runtime == "llama.cpp":
            if self.int8_kernels:
                raise ValueError("int8_kernels is a transformers CPU path: leave it out with runtime: llama.cpp")
            if self.tasks:
                raise ValueError("zero-shot tasks run under runtime: transformers only; evaluate them in a separate "
                                 "evaluate stage")
            if self.speed_batch_size != 1:
                raise ValueError("runtime: llama.cpp measures speed at batch size 1: leave speed_batch_size out")
        return self

    @model_validator(mode="after")
    def _stride(self):
        if self.stride is not None and self.stride > self.context_length:
            raise ValueError(f"stride ({self.stride}) must be <= context_length ({self.context_length}): "
                             "larger strides would skip tokens")
        return self


def protocol(cfg: EvaluateConfig, data, stream) -> dict:
    """Everything that fixes the perplexity number, recorded next to it; `tokens` hashes the
    very tokens scored (source, tokenizer, split, seed all end up in it)."""
    out = {"dataset": data.name, "tokens": hash_bytes(stream.numpy().tobytes())[:16], "split": cfg.split,
           "context_length": cfg.context_length, "stride": cfg.stride or cfg.context_length,
           "max_windows": cfg.max_windows, "level": "token", "block_size": data.block_size}
    if cfg.runtime != "transformers":
        out["runtime"] = cfg.runtime  # its own table: a deployed row is compared with the deployed teacher
    return out


def _threads(cfg: EvaluateConfig) -> int:
    return cfg.threads or torch.get_num_threads()


def measure_gguf(path: Path, model, cfg: EvaluateConfig, ctx, label: str) -> dict:
    """The metrics of a GGUF file in llama.cpp, under `cfg`'s protocol; parameter counts from the
    model it was written from, bytes from the file (what is deployed)."""
    from dsc import llamacpp

    data = ctx.data[cfg.data or ctx.data.default()]
    _fits(model, cfg)
    stream = data.stream(cfg.split)
    wins = windows(len(stream), cfg.context_length, cfg.stride or cfg.context_length)[:cfg.max_windows]
    bar = Progress(f"perplexity ({label}, llama.cpp)", 0, ctx.log)
    ppl = llamacpp.perplexity(path, stream, wins, _threads(cfg), progress=bar.update)
    bar.close()
    out = {**ppl, "protocol": protocol(cfg, data, stream), **param_counts(model),
           "weight_bytes": path.stat().st_size, "runtime": f"llama.cpp {llamacpp.version()}", "file": path.name}
    if cfg.speed:
        out.update(llamacpp.speed(path, model.config.vocab_size, cfg.prompt_length, cfg.decode_tokens, cfg.repeats,
                                  _threads(cfg), seed=ctx.seed))
    ctx.log.info("%s (llama.cpp): perplexity %.4f over %d tokens", label, out["perplexity"], out["tokens_scored"],
                 extra={"event": "metric", "model": label, "perplexity": out["perplexity"], "runtime": "llama.cpp"})
    return out


def _last_gguf(ctx) -> Path:
    found = [a for a in ctx.artifacts if a["format"] == "gguf"]
    if not found:
        raise FieldError("runtime", "llama.cpp measures a GGUF file: put an `export` stage (format: gguf) before "
                                    "this evaluate stage")
    return Path(found[-1]["path"])


def _teacher_gguf(cfg: EvaluateConfig, ctx) -> dict:
    """The teacher in llama.cpp: exported as an F32 GGUF (its exact weights) and measured there."""
    from dsc.export import ExportConfig, export_gguf

    teacher = ctx.teacher()
    folder = ctx.work_dir or ctx.stage_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "teacher-f32.gguf"
    try:
        export_gguf(teacher, ctx.tokenizer, path, ExportConfig(weights="f32", embedding="f32"),
                    teacher_gguf=ctx.teacher_file, name="teacher")
        return measure_gguf(path, teacher, cfg, ctx, "teacher")
    finally:
        path.unlink(missing_ok=True)


def _fits(model, cfg: EvaluateConfig) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.context_length > limit:
        raise FieldError("context_length", f"{cfg.context_length} exceeds the model's max_position_embeddings "
                            f"({limit}): lower it")


def measure(model, cfg: EvaluateConfig, ctx, label: str, stored: int | None = None) -> dict:
    """All metrics of one model under `cfg` (`stored`: its weight bytes, when they cannot be read
    off its state dict, as for int8-kernel modules)."""
    data = ctx.data[cfg.data or ctx.data.default()]
    _fits(model, cfg)
    stream = data.stream(cfg.split)
    bar = Progress(f"perplexity ({label})", 0, ctx.log)
    ppl = perplexity(model, stream, cfg.context_length, cfg.stride or cfg.context_length, cfg.batch_size,
                     cfg.max_windows, progress=bar.update)
    bar.close()
    out = {**ppl, "protocol": protocol(cfg, data, stream), **param_counts(model),
           "weight_bytes": stored or weight_bytes(model)}
    if cfg.tasks:
        out["zero_shot"] = zero_shot(model, cfg, ctx, label)
    if cfg.speed:
        s = speed(model, model.config.vocab_size, cfg.speed_batch_size, cfg.prompt_length, cfg.decode_tokens,
                  cfg.repeats, seed=ctx.seed)
        out.update(s, peak_memory_bytes=out["weight_bytes"] + s["activation_peak_bytes"])
    ctx.log.info("%s: perplexity %.4f over %d tokens", label, out["perplexity"], out["tokens_scored"],
                 extra={"event": "metric", "model": label, "perplexity": out["perplexity"]})
    return out


def zero_shot(model, cfg: EvaluateConfig, ctx, label: str) -> dict:
    """Each task of `cfg.tasks` under lm-eval's conventions (dsc.zeroshot)."""
    out = {}
    for name, task in cfg.tasks.items():
        bar = Progress(f"{name} ({label})", 0, ctx.log)
        res = evaluate_task(model, ctx.tokenizer, task, ctx.data.base_dir, f"tasks.{name}", bar.update)
        bar.close()
        extra = f", acc_norm {res['acc_norm']:.4f}" if res["acc_norm"] is not None else \
            f", perplexity {res['perplexity']:.3f}"
        ctx.log.info("%s: %s acc %.4f%s over %d items", label, name, res["acc"], extra, res["items"],
                     extra={"event": "metric", "model": label, "task": name, "acc": res["acc"],
                            "acc_norm": res["acc_norm"], "items": res["items"]})
        out[name] = res
    return out


def _on_int8_kernels(model, ctx):
    from dsc.quantize.cpu import int8_kernels

    if ctx.device.type != "cpu":
        raise FieldError("int8_kernels", f"the int8 kernels are a CPU path; this run's device is {ctx.device}")
    fast = copy.deepcopy(model)
    if not int8_kernels(fast):
        raise FieldError("int8_kernels", "the model has no int8 per-channel linears: put an `int8` stage before")
    return fast


def apply(model, cfg: EvaluateConfig, ctx) -> StageOutput:
    if cfg.runtime == "llama.cpp":
        from dsc import llamacpp

        if not llamacpp.available():
            if cfg.if_missing == "error":
                raise FieldError("runtime", f"llama.cpp needs llama-cpp-python: {llamacpp.INSTALL}")
            why = f"llama-cpp-python is not installed: {llamacpp.INSTALL}"
            ctx.log.warning("evaluate in llama.cpp skipped: %s", why, extra={"event": "skipped", "why": why})
            return StageOutput(model, {"skipped": why})
        metrics = {"model": measure_gguf(_last_gguf(ctx), model, cfg, ctx, "model")}
        if cfg.teacher:
            dump = cfg.model_dump(exclude={"teacher"}, exclude_defaults=True)
            key = hash_json([dump, metrics["model"]["protocol"], "llama.cpp", _threads(cfg)])
            metrics["teacher"] = ctx.baseline(key, lambda: _teacher_gguf(cfg, ctx))
        return StageOutput(model, metrics)
    if cfg.int8_kernels:
        fast = measure(_on_int8_kernels(model, ctx), cfg, ctx, "model", weight_bytes(model))
        metrics = {"model": {**fast, **param_counts(model), "runtime": "cpu int8 kernels"}}
    else:
        metrics = {"model": measure(model, cfg, ctx, "model")}
    if cfg.teacher:
        # Keyed by everything the numbers depend on, hardware included: a resume elsewhere re-measures.
        # Zero-shot protocols carry the task files' hashes; defaults stay out, as in the stage fingerprints.
        dump = cfg.model_dump(exclude={"teacher", "int8_kernels"}, exclude_defaults=True)
        shots = {n: r["protocol"] for n, r in metrics["model"].get("zero_shot", {}).items()}
        key = hash_json([dump, metrics["model"]["protocol"], shots, str(ctx.device), torch.get_num_threads()])
        if ctx.teacher_is(model):  # nothing changed the model yet: it is the teacher
            metrics["teacher"] = ctx.baseline(key, lambda: metrics["model"])
        else:
            metrics["teacher"] = ctx.baseline(key, lambda: measure(ctx.teacher(), cfg, ctx, "teacher"))
    return StageOutput(model, metrics)
