"""`distill` and `lora`: both are the shared loop around an Objective; they differ only in what
is trainable (every weight, or a LoRA adapter merged at the end)."""
from __future__ import annotations

import shutil

import torch

from dsc.distill import lora as peft_adapter
from dsc import parallel
from dsc.distill import teacher_cache
from dsc.distill.batches import Batches
from dsc.distill.config import DistillConfig, KDConfig, LoraConfig
from dsc.distill.loop import Loop
from dsc.distill.objective import Objective
from dsc.errors import FieldError
from dsc.fingerprint import hash_json
from dsc.log import Progress
from dsc.stages import StageOutput


def _blocks(cfg: KDConfig, data, split: str) -> torch.Tensor:
    length = cfg.seq_len or data.block_size
    if length > data.block_size:
        raise FieldError("seq_len", f"{length} > data.{data.name}.block_size ({data.block_size}): a sequence "
                         "would join blocks that are not adjacent; lower seq_len or raise block_size")
    return data.blocks(split)[:, :length]


def _teacher_top(cfg: KDConfig, ctx, teacher, blocks: torch.Tensor, data, split: str, device):
    """Top-k of the teacher over `blocks`, from the stage's work folder when already computed."""
    key = hash_json(["topk-v1", data.fingerprint, split, list(blocks.shape), cfg.top_k, cfg.temperature])
    path = ctx.work_dir / f"teacher_topk_{split}.safetensors" if ctx.work_dir else None

    def make():
        bar = Progress(f"teacher top-{cfg.top_k} ({split})", len(blocks), ctx.log)
        out = teacher_cache.compute(teacher(), blocks, cfg.top_k, cfg.temperature, cfg.batch_size, device, bar.update)
        bar.close()
        return out

    return teacher_cache.load_or_compute(path, key, make)


def train_student(student, cfg: KDConfig, ctx) -> tuple[torch.nn.Module, dict]:
    """Train `student` (plain or peft-wrapped) against the teacher with the shared loop."""
    device = parallel.init_from_env(ctx.device)
    rank, world = parallel.rank(), parallel.world_size()
    data = ctx.data[cfg.data or ctx.data.default()]
    train_blocks = _blocks(cfg, data, cfg.split)
    eval_blocks = None if cfg.eval_split == "none" else _blocks(cfg, data, cfg.eval_split)
    teacher = ctx.teacher if cfg.needs_teacher else None
    tops = {}
    if cfg.teacher_cache:
        tops = {s: _teacher_top(cfg, ctx, teacher, b, data, s, device)
                for s, b in ((cfg.split, train_blocks), (cfg.eval_split, eval_blocks)) if b is not None}
        teacher = None
        ctx.release_teacher()  # the student trains alone
    student.to(device)
    if cfg.gradient_checkpointing:
        _checkpointing(student, True)
    objective = Objective(student, cfg, teacher() if teacher else None)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    train = Batches(train_blocks, cfg.batch_size, cfg.grad_accum, seed, rank, world, tops.get(cfg.split))
    held = None if eval_blocks is None else Batches(eval_blocks, cfg.batch_size, 1, seed, rank, world,
                                                    tops.get(cfg.eval_split))
    model = parallel.wrap(objective, cfg.parallel, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1009 + rank)
        loop = Loop(model, cfg, train, held, device, ctx.log, state_dir=ctx.work_dir)
        metrics = loop.run()
    metrics["precision"] = "bf16" if loop.amp is not None else "fp32"
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
    """A plain copy of an FSDP-sharded student, on every process."""
    from transformers import AutoModelForCausalLM

    state = {k: v.cpu() for k, v in parallel.full_state(student, offload=False).items()}
    plain = AutoModelForCausalLM.from_config(student.config)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    return plain.eval()


def apply(model, cfg: DistillConfig, ctx) -> StageOutput:
    """Full-parameter distillation; the model keeps the dtype it came in (trained in float32)."""
    dtype = next(model.parameters()).dtype
    model.float().requires_grad_(True)  # the model may arrive frozen (the teacher object itself)
    student, metrics = train_student(model, cfg, ctx)
    return StageOutput(student.to(dtype).eval(), metrics)


def apply_lora(model, cfg: LoraConfig, ctx) -> StageOutput:
    """A LoRA adapter trained with the KD (or LM) loss, then merged: the output is a plain model."""
    peft_model, base_info = peft_adapter.wrap(model, cfg, ctx)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model, metrics = train_student(peft_model, cfg, ctx)
    merged = peft_adapter.merge(peft_model, cfg)
    metrics.update(trainable_params=trainable, **base_info)
    return StageOutput(merged.eval(), metrics)
