"""What the training loop optimizes: the student, any feature projections, and the loss against
a frozen teacher, as one module whose forward returns (loss, parts). One module is what DDP and
FSDP wrap; the teacher is held outside its parameters so it is never wrapped, sharded or saved."""
from __future__ import annotations

import torch
from torch import nn

from dsc.distill.config import KDConfig
from dsc.distill.losses import default_layer_map, feature_loss, lm_loss, logit_kd
from dsc.errors import FieldError


def num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def check_pair(student, teacher) -> None:
    """The student must read the teacher's tokens and predict over its vocabulary."""
    vs, vt = student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features
    if vs != vt:
        raise FieldError("kl", f"student and teacher vocabularies differ ({vs} vs {vt} logits): distillation "
                         "needs the teacher's tokenizer; start the student from the teacher (prune it) or "
                         "retokenize with the teacher's tokenizer")


def layer_map(cfg: KDConfig, student, teacher) -> dict[int, int]:
    ls, lt = num_layers(student), num_layers(teacher)
    mapping = cfg.layer_map or default_layer_map(ls, lt)
    for s, t in mapping.items():
        if not (0 <= s <= ls and 0 <= t <= lt):
            raise FieldError("layer_map", f"{s}: {t} is outside the student's 0..{ls} or the teacher's 0..{lt} "
                             "hidden states (0 = embeddings): fix the mapping")
    return dict(sorted(mapping.items()))


class Objective(nn.Module):
    def __init__(self, student: nn.Module, cfg: KDConfig, teacher: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self._teacher = (teacher,)  # a tuple: not a submodule (never wrapped, sharded, saved or trained)
        self.layer_map: dict[int, int] = {}
        self.projections = nn.ModuleDict()
        if teacher is not None:
            check_pair(student, teacher)
        if cfg.features:
            if teacher is None:
                raise FieldError("features", "feature matching needs the teacher's hidden states: set features: 0")
            self.layer_map = layer_map(cfg, student, teacher)
            ds, dt = hidden_size(student), hidden_size(teacher)
            if ds != dt:  # learned projections student width → teacher width (dropped after training)
                ref = student.get_input_embeddings().weight
                for s in self.layer_map:
                    self.projections[str(s)] = nn.Linear(ds, dt, bias=False, device=ref.device, dtype=ref.dtype)

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, input_ids: torch.Tensor, teacher_top: tuple | None = None) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        want_h = bool(cfg.features)
        out = self.student(input_ids=input_ids, output_hidden_states=want_h, use_cache=False)
        t_out = None
        if self.teacher is not None and teacher_top is None and cfg.needs_teacher:
            with torch.no_grad():
                t_out = self.teacher(input_ids=input_ids, output_hidden_states=want_h, use_cache=False)
        parts = {}
        loss = out.logits.new_zeros((), dtype=torch.float32)
        if cfg.kl:
            parts["kl"] = logit_kd(out.logits, teacher_logits=None if t_out is None else t_out.logits,
                                   teacher_top=teacher_top, kind=cfg.divergence, temperature=cfg.temperature,
                                   top_k=cfg.top_k)
            loss = loss + cfg.kl * parts["kl"]
        if cfg.features:
            terms = []
            for s, t in self.layer_map.items():
                h = out.hidden_states[s]
                if str(s) in self.projections:
                    h = self.projections[str(s)](h)
                terms.append(feature_loss(h, t_out.hidden_states[t], cfg.feature_loss))
            parts["features"] = torch.stack(terms).mean()
            loss = loss + cfg.features * parts["features"]
        if cfg.ce or not self.training:  # evaluation always reports the student's own LM loss
            parts["ce"] = lm_loss(out.logits, input_ids)
            loss = loss + cfg.ce * parts["ce"]
        return loss, {k: v.detach() for k, v in parts.items()}
