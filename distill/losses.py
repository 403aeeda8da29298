"""Distillation losses: divergences between teacher and student next-token distributions (full
vocabulary, or the teacher's top-k plus one bucket for the rest), hidden-state matching, and
the plain LM loss. Everything is computed in float32 and averaged over tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsc.errors import FieldError

_EPS = 1e-8
_LOG_TINY = -69.0  # log 1e-30: floor of the tail bucket (empty when top_k covers the vocabulary)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) over the last dim, per position (0·log 0 = 0, e.g. masked vocabulary entries)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def divergence(log_t: torch.Tensor, log_s: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence between teacher and student log-probs over the same categories."""
    if kind == "forward":
        return _kl(log_t, log_s)
    if kind == "reverse":
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = torch.logaddexp(log_t, log_s) - torch.log(torch.tensor(2.0, device=log_t.device))
        return 0.5 * (_kl(log_t, log_m) + _kl(log_s, log_m))
    raise ValueError(f"unknown divergence {kind!r}")


def over_topk(logits: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs at T on the tokens `idx`, plus one bucket with the exact log-mass of the rest."""
    z = logits.float() / temperature
    norm = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, idx) - norm
    rest = torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True) - norm
    return torch.cat([top, rest.clamp_min(_LOG_TINY)], dim=-1)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position: (k+1 log-probs at T — the tokens, then the
    rest of the mass —, token ids)."""
    if k > teacher_logits.shape[-1]:
        raise FieldError("top_k", f"{k} exceeds the vocabulary ({teacher_logits.shape[-1]} tokens): lower it "
                         "or set top_k: null for the full distribution")
    idx = teacher_logits.topk(k, dim=-1).indices
    return over_topk(teacher_logits, idx, temperature), idx


def logit_kd(student_logits: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
             teacher_top: tuple[torch.Tensor, torch.Tensor] | None = None, kind: str = "forward",
             temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Mean divergence over positions, scaled by T² (Hinton et al.) so its gradient does not
    shrink with the temperature. Give the teacher's full logits, or its precomputed top-k
    (`teacher_topk`: k+1 log-probs at `temperature`, indices)."""
    if teacher_top is None and top_k is not None:
        teacher_top = teacher_topk(teacher_logits, top_k, temperature)
    if teacher_top is None and kind == "forward":
        return forward_kl(student_logits, teacher_logits, temperature).mean() * temperature ** 2
    if teacher_top is not None:
        log_t, idx = teacher_top
        log_t = log_t.float()
        log_s = over_topk(student_logits, idx.long(), temperature)
    else:
        log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence(log_t, log_s, kind).mean() * temperature ** 2


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher‖student) per position over the full vocabulary, from the logits: Σ p·log p (the
    teacher's, no gradient) − Σ p·z + logsumexp(z) for the student's z: the same value (up to
    float32 rounding, ~1e-4 per position) and the same gradient (softmax(z) − p) with fewer
    full-vocabulary passes and saved tensors than log_softmax on both sides."""
    with torch.no_grad():
        log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p = log_t.exp()
        neg_entropy = (p * log_t).nan_to_num_(0.0).sum(-1)  # 0·log 0 = 0 for masked entries
    z = student_logits.float()
    z = z / temperature if temperature != 1 else z
    return neg_entropy - (p * z).sum(-1) + torch.logsumexp(z, dim=-1)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Every student layer output j (1-based) → the teacher layer at the same relative depth;
    the last layers always meet (after depth pruning: the surviving layers spread over the teacher)."""
    return {j: max(1, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)}


def feature_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, kind: str) -> torch.Tensor:
    """Hidden-state matching: mse normalized by the teacher's mean square, or 1 − cosine."""
    s, t = student_h.float(), teacher_h.float()
    if kind == "mse":
        return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(_EPS)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=_EPS)).mean()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on packed blocks (every position has a label but the last)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
