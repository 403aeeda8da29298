"""Schemas of the training stages: one `TrainConfig` (the shared loop), the KD loss fields both
stages use, and what `distill` and `lora` add."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dsc.config import Config, StageConfig
from dsc.quantize.config import GridConfig


class TrainConfig(StageConfig):
    """The shared training loop: budget, optimizer, schedule, precision, checkpoints, evaluation."""

    data: str | None = Field(None, description="training data source (default: the recipe's first)")
    split: Literal["train", "calibration", "eval", "all"] = Field("train", description="split to train on")
    eval_split: Literal["eval", "train", "calibration", "none"] = Field(
        "eval", description="held-out split for periodic evaluation (none: no evaluation)")
    steps: int | None = Field(None, gt=0, description="optimizer steps (or give `tokens`)")
    tokens: int | None = Field(None, gt=0, description="token budget: steps = tokens / tokens per step")
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch (per process)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    seq_len: int | None = Field(None, gt=1, description="tokens per sequence (default: the source's block_size; "
                                                         "shorter crops each block)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming the LR up linearly")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr × min_lr_ratio")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (null: none)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on a CUDA device that supports it, else fp32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the start and the end)")
    eval_batches: int = Field(8, gt=0, description="held-out micro-batches per evaluation")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps so a killed run resumes (0: never)")
    log_every: int = Field(10, gt=0, description="log loss, tokens/s and ETA every N steps")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun / accelerate launch: ddp (replicas) or fsdp (sharded); auto: ddp")
    seed: int | None = Field(None, ge=0, description="seed of data order, dropout and of a built student's "
                                                     "initial weights (default: the recipe's)")

    @model_validator(mode="after")
    def _budget(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one budget: `steps` or `tokens`")
        return self


class KDConfig(TrainConfig):
    """Loss = kl·KL(teacher ‖ student, T) + features·feature loss + ce·cross-entropy on the labels."""

    kl: float = Field(1.0, ge=0, description="weight of the logit distillation term")
    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward", description="forward KL(teacher‖student), reverse KL(student‖teacher), or Jensen–Shannon")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both sides (the term is scaled by T²)")
    top_k: int | None = Field(None, gt=0, description="compare over the teacher's top-k tokens plus one bucket "
                                                      "for the rest (null: the full vocabulary)")
    teacher_cache: bool = Field(False, description="precompute the teacher's top-k log-probs to disk once and "
                                                   "train from them (needs top_k; no feature term)")
    features: float = Field(0.0, ge=0, description="weight of the hidden-state matching term")
    feature_loss: Literal["mse", "cosine"] = Field(
        "cosine", description="mse (normalized by the teacher's mean square) or 1 − cosine similarity")
    layer_map: dict[int, int] | None = Field(
        None, description="student layer → teacher layer (1-based outputs; 0 = embeddings); default: every "
                          "student layer to the teacher layer at the same relative depth")
    ce: float = Field(0.0, ge=0, description="weight of the cross-entropy on the data's next tokens")

    @model_validator(mode="after")
    def _loss(self):
        if not (self.kl or self.features or self.ce):
            raise ValueError("the loss is empty: give kl, features or ce a weight above 0")
        if self.teacher_cache and self.top_k is None:
            raise ValueError("teacher_cache stores the teacher's top-k log-probs: set top_k (e.g. 64)")
        if self.teacher_cache and self.features:
            raise ValueError("teacher_cache keeps logits only: set features: 0 or teacher_cache: false")
        return self

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kl or self.features)


class StudentConfig(Config):
    """`distill.student`: train this model instead of the incoming one (which passes through
    untouched); it reads the teacher's tokens and becomes the stage's output.

        student: {config: {model_type: llama, hidden_size: 64, num_hidden_layers: 4}}
        student: {path: ../runs/pruned/model}
    """

    config: dict[str, Any] | None = Field(
        None, description="a transformers config to build a fresh model from: model_type and that family's fields; "
                          "vocab_size, bos/eos/pad token ids and max_position_embeddings default to the teacher's")
    path: str | None = Field(None, description="a saved model directory to train (e.g. a pruned copy); relative "
                                               "to the recipe's folder")
    init: Literal["random", "teacher_embeddings"] = Field(
        "random", description="weights of a `config` student: random (seeded by `seed`), or random with the "
                              "teacher's token embeddings and LM head copied (needs the teacher's hidden_size)")

    @field_validator("config")
    @classmethod
    def _known_family(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from dsc.distill.student import check_config  # imports transformers: only when used

            check_config(v)
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of `config` (build a fresh model) or `path` (load a saved one)")
        if self.path is not None and self.init != "random":
            raise ValueError("init applies to a student built from `config`: a loaded student keeps its weights")
        return self

    def model_refs(self) -> dict[str, str]:
        """Paths to check exist when the recipe is validated (field → path)."""
        return {"path": self.path} if self.path is not None else {}


class DistillConfig(KDConfig):
    """`distill`: full-parameter knowledge distillation of the working model from the teacher, or of
    a `student` built from a config or loaded from a folder."""

    student: StudentConfig | None = Field(
        None, description="train this model instead of the incoming one (config: {model_type: llama, ...} or "
                          "path: DIR); it must predict over the teacher's vocabulary and is the stage's output")

    @property
    def edits_input(self) -> bool:
        """Whether the stage may change the model it is given in place. With a `student` the
        incoming model (possibly the teacher object itself) passes through untouched."""
        return self.student is None

    def model_refs(self) -> dict[str, str]:
        """Model paths in this config, checked when the recipe is validated (field → path)."""
        refs = self.student.model_refs() if self.student is not None else {}
        return {f"student.{k}": v for k, v in refs.items()}


class LoraConfig(KDConfig):
    """`lora`: a peft LoRA adapter trained with the same loss, merged into a plain model."""

    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    rank: int = Field(16, gt=0, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="names of the linear modules to adapt (e.g. [q_proj, v_proj]), or all-linear (every linear but the LM head)")
    quantize_base: Literal["none", "nf4"] = Field(
        "none", description="nf4: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); merged into "
                            "the dequantized base so outputs match what was trained")

    @model_validator(mode="after")
    def _not_sharded(self):
        if self.parallel == "fsdp":
            raise ValueError("lora trains a small adapter: replicate the model with parallel: ddp (fsdp would "
                             "shard the frozen base and the adapter together)")
        return self


class QATConfig(KDConfig, GridConfig):
    """`qat`: quantization-aware distillation. The target linears train through their quantizer
    (fake-quantized forward, straight-through rounding), taught by the float teacher. The grid
    starts from the previous stage's quantization (awq, rtn) when there is one."""

    learn_scales: bool = Field(True, description="train the per-group scales too (LSQ); false: keep the starting "
                                                 "scales and train the weights only")
    init: Literal["auto", "rtn", "awq"] = Field(
        "auto", description="the grid training starts from. awq: AWQ's scales and clipping searched here, on "
                            "calibration blocks of `data`, the weights left in float (the best start); rtn: "
                            "round-to-nearest; auto: the previous stage's grid (after rtn / awq, whose weights are "
                            "already rounded), else rtn")
    calibration_samples: int = Field(64, gt=0, description="calibration blocks of init: awq (split calibration)")
