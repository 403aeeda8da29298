"""`distill` and `lora`: both are the shared loop around an Objective; they differ only in what
is trainable (every weight, or a LoRA adapter merged at the end)."""
from __future__ import annotations

import shutil

import torch

from dsc.distill import lora as peft_adapter
from dsc import parallel
from dsc.distill import student as student_builder, teacher_cache
from dsc.distill.batches import Batches
from dsc.distill.config import DistillConfig, KDConfig, LoraConfig
from dsc.distill.loop import Loop
from dsc.distill.objective import Objective, check_pair
from dsc.errors import FieldError
from dsc.fingerprint import hash_json, weights_fingerprint
from dsc.log import Progress
from dsc.models import build_from_config
from dsc.stages import StageOutput


def _blocks(cfg: KDConfig, data, split: str, student) -> torch.Tensor:
    length = cfg.seq_len or data.block_size
    if length > data.block_size:
        raise FieldError("seq_len", f"{length} > data.{data.name}.block_size ({data.block_size}): a sequence "
                         "would join blocks that are not adjacent; lower seq_len or raise block_size")
    limit = getattr(student.config.get_text_config(), "max_position_embeddings", None)
    if limit and length > limit:
        raise FieldError("seq_len", f"{length} exceeds the model's max_position_embeddings ({limit}): set "
                         f"seq_len: {limit} or lower")
    return data.blocks(split)[:, :length]


def _teacher_top(cfg: KDConfig, ctx, teacher, blocks: torch.Tensor, data, split: str, device):
    """Top-k of the teacher over `blocks`, from the stage's work folder when already computed."""
    teacher_fp = ctx.data.teacher_fp or weights_fingerprint(teacher())
    key = hash_json(["topk-v2", teacher_fp, data.fingerprint, split, list(blocks.shape), cfg.top_k,
                     cfg.temperature])
    path = ctx.work_dir / f"teacher_topk_{split}.safetensors" if ctx.work_dir else None

    def make():
        bar = Progress(f"teacher top-{cfg.top_k} ({split})", len(blocks), ctx.log)
        out = teacher_cache.compute(teacher(), blocks, cfg.top_k, cfg.temperature, cfg.batch_size, device, bar.update)
        bar.close()
        return out

    return teacher_cache.load_or_compute(path, key, make)


def _objective(student, cfg: KDConfig, ctx, device):
    """The objective and its data: (Objective, train Batches, held-out Batches or None)."""
    rank, world = parallel.rank(), parallel.world_size()
    data = ctx.data[cfg.data or ctx.data.default()]
    train_blocks = _blocks(cfg, data, cfg.split, student)
    eval_blocks = None if cfg.eval_split == "none" else _blocks(cfg, data, cfg.eval_split, student)
    if cfg.split == "all" and eval_blocks is not None:
        ctx.log.warning("split: all trains on the held-out blocks too: its evaluation is not held out",
                        extra={"event": "warning"})
    teacher = ctx.teacher() if cfg.needs_teacher else None
    tops = {}
    if cfg.teacher_cache:
        check_pair(student, teacher)
        tops = {s: _teacher_top(cfg, ctx, ctx.teacher, b, data, s, device)
                for s, b in ((cfg.split, train_blocks), (cfg.eval_split, eval_blocks)) if b is not None}
        teacher = None
        ctx.release_teacher()  # the student trains alone
    seed = ctx.seed if cfg.seed is None else cfg.seed
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the feature projections' initial weights
        objective = Objective(student, cfg, teacher)
    train = Batches(train_blocks, cfg.batch_size, cfg.grad_accum, seed, rank, world, tops.get(cfg.split))
    held = None if eval_blocks is None else Batches(eval_blocks, cfg.batch_size, 1, seed, rank, world,
                                                    tops.get(cfg.eval_split))
    return objective, train, held


def train_student(student, cfg: KDConfig, ctx) -> tuple[torch.nn.Module | None, dict]:
    """Train `student` (plain or peft-wrapped) against the teacher with the shared loop. Under
    FSDP the trained model is gathered on rank 0; the other processes get None."""
    device = parallel.init_from_env(ctx.device)
    objective, train, held = _objective(student, cfg, ctx, device)  # teacher top-k first, if cached
    objective.to(device)
    if cfg.gradient_checkpointing:
        _checkpointing(student, True)
    # a loss without the logit terms, or a partial layer map, leaves some weights without gradients
    partial = not (cfg.kl or cfg.ce) or bool(cfg.layer_map)
    try:
        model = parallel.wrap(objective, cfg.parallel, device, find_unused=partial)
    except ValueError as exc:
        raise FieldError("parallel", str(exc)) from None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(train.seed * 1009 + parallel.rank())  # dropout; the data order has its own
        loop = Loop(model, cfg, train, held, device, ctx.log, state_dir=ctx.work_dir, tracker=ctx.tracker,
                    scope=ctx.scope)
        metrics = loop.run()
    metrics["precision"] = "bf16" if loop.amp is not None else "fp32"
    if len(objective.projections):
        metrics["projection_params"] = sum(p.numel() for p in objective.projections.parameters())
    if cfg.gradient_checkpointing:
        _checkpointing(student, False)
    if parallel.active() and cfg.parallel == "fsdp":
        student = _unsharded(objective.student)
    if ctx.work_dir and ctx.stage_dir and (ctx.work_dir / "train_log.jsonl").is_file():
        shutil.copy(ctx.work_dir / "train_log.jsonl", ctx.stage_dir / "train_log.jsonl")
    return student, metrics


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing, by its transformers 5 name where it has one."""
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _unsharded(student):
    """A plain copy of an FSDP-sharded student on rank 0 (gathered to CPU); None elsewhere."""
    state = parallel.full_state(student)  # collective; the full weights land on rank 0 only
    if parallel.rank() != 0:
        return None
    return rebuilt(student.config, state, "gathered FSDP state")


def rebuilt(config, state: dict, what: str):
    """A fresh plain model of `config` holding `state` (a tied LM head may be absent from it)."""
    plain = build_from_config(config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if plain.config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{what} does not fit {type(plain).__name__}: missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    plain.tie_weights()
    return plain.eval()


def apply(model, cfg: DistillConfig, ctx) -> StageOutput:
    """Full-parameter distillation; the model keeps the dtype it came in (trained in float32).
    With `student`, that student trains instead (in float32) and is the output."""
    if cfg.student is not None:
        return _apply_student(cfg, ctx)
    dtype = next(model.parameters()).dtype
    model.float().requires_grad_(True)  # the model may arrive frozen (the teacher object itself)
    student, metrics = train_student(model, cfg, ctx)
    return StageOutput(None if student is None else student.to(dtype).eval(), metrics)


def _apply_student(cfg: DistillConfig, ctx) -> StageOutput:
    """The incoming model is left as it came; the student (checked against the teacher first)
    trains and replaces it. Relative student paths resolve where the recipe's data paths do."""
    seed = ctx.seed if cfg.seed is None else cfg.seed
    student, info = student_builder.build(cfg.student, ctx.teacher(), seed, ctx.tokenizer, ctx.data.base_dir)
    student, metrics = train_student(student.requires_grad_(True), cfg, ctx)
    return StageOutput(None if student is None else student.eval(), {**metrics, "student": info})


def apply_lora(model, cfg: LoraConfig, ctx) -> StageOutput:
    """A LoRA adapter trained with the KD (or LM) loss, then merged: the output is a plain model."""
    peft_model, base_info = peft_adapter.wrap(model, cfg, ctx)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model, metrics = train_student(peft_model, cfg, ctx)
    merged = peft_adapter.merge(peft_model, cfg)
    metrics.update(trainable_params=trainable, **base_info)
    return StageOutput(merged.eval(), metrics)
