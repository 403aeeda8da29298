"""Importance of heads, KV groups, MLP channels and layers.

Width importance works on element scores S (same shape as each weight), summed over the rows and
columns a structural unit owns:
  magnitude:  S = |W| (l1) or W² (l2)
  activation: S = |W| · ‖X_col‖₂ over calibration tokens (Wanda), X the linear's input
  taylor:     S = |W ⊙ ∂L/∂W| with the LM loss summed over calibration data (LLM-Pruner)
  random:     seeded uniform scores (a baseline)
Depth importance (ShortGPT's block influence): 1 − cos(layer input, layer output), averaged over
tokens; the layers that change their input least are removed first.

Calibration is hook-based: statistics are accumulated in place during plain forward passes and no
activation is kept, so peak memory is the model plus one forward's activations.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from dsc.structure import Structure


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer: (num_heads,)
    kv: list[torch.Tensor]  # per layer: (num_kv_heads,)
    channels: list[torch.Tensor]  # per layer: (width,)
    layers: torch.Tensor | None  # (num_layers,), higher = more important


def _linears(structure: Structure) -> list[nn.Linear]:
    out = []
    for layer in structure.layers:
        a, m = layer.attn, layer.mlp
        out += [a.q, a.k, a.v, a.o, m.up, m.down] + ([m.gate] if m.gate is not None else [])
    return out


def calibration_batches(blocks: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    return [blocks[i:i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]


@torch.inference_mode()
def input_norms(model: nn.Module, structure: Structure, batches, block_influence: bool):
    """One calibration pass: ‖X_col‖² of every linear's input and, optionally, block influence."""
    sq = {id(lin): torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
          for lin in _linears(structure)}
    bi = torch.zeros(len(structure.layers), dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    hooks = []

    def pre(mod, args):
        x = args[0].detach().double()  # (B, T, in)
        sq[id(mod)] += x.pow(2).sum(dim=tuple(range(x.dim() - 1)))

    def block(index):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)  # (B, T)
            bi[index] += (1 - cos).sum().cpu()
        return hook

    for lin in _linears(structure):
        hooks.append(lin.register_forward_pre_hook(pre))
    if block_influence:
        for layer in structure.layers:
            hooks.append(layer.module.register_forward_hook(block(layer.index), with_kwargs=True))
    # Only the hooks' statistics matter: skip the (B, T, vocab) logits where the model allows it.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False, **keep)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return sq, bi / count


def taylor_grads(model: nn.Module, structure: Structure, batches) -> dict[int, torch.Tensor]:
    """∂L/∂W of every pruned linear, the LM loss summed over the calibration batches."""
    linears = _linears(structure)
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in linears:
            lin.weight.requires_grad_(True)
            lin.weight.grad = None
        with torch.enable_grad():
            for ids in batches:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss * ids.shape[0]).backward()
        grads = {id(lin): lin.weight.grad.detach() for lin in linears}
    finally:
        for lin in linears:
            lin.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return grads


def element_scores(lin: nn.Linear, kind: str, norm: str, sq=None, grads=None, gen=None) -> torch.Tensor:
    w = lin.weight.detach().float()
    if kind == "magnitude":
        return w.abs() if norm == "l1" else w.pow(2)
    if kind == "activation":
        return w.abs() * sq[id(lin)].sqrt().float()[None, :]
    if kind == "taylor":
        return (w * grads[id(lin)].float()).abs()
    return torch.rand(w.shape, generator=gen)


def unit_scores(structure: Structure, element) -> tuple[list, list, list]:
    """Sum element scores over the rows/columns each head, KV group and channel owns."""
    heads, kv, channels = [], [], []
    for layer in structure.layers:
        a, m = layer.attn, layer.mlp
        hd = a.head_dim
        sq_, sk, sv, so = (element(lin) for lin in (a.q, a.k, a.v, a.o))
        h = sq_.view(a.num_heads, hd, -1).sum((1, 2)) + so.view(so.shape[0], a.num_heads, hd).sum((0, 2))
        g = h.view(a.num_kv_heads, a.group_size).sum(1)
        g = g + sk.view(a.num_kv_heads, hd, -1).sum((1, 2)) + sv.view(a.num_kv_heads, hd, -1).sum((1, 2))
        c = element(m.up).sum(1) + element(m.down).sum(0)
        if m.gate is not None:
            c = c + element(m.gate).sum(1)
        heads.append(h.cpu())
        kv.append(g.cpu())
        channels.append(c.cpu())
    return heads, kv, channels


def compute(model: nn.Module, structure: Structure, cfg, blocks: torch.Tensor | None) -> Scores:
    """Scores for what `cfg` cuts; calibration runs only when an importance needs data."""
    device = next(model.parameters()).device
    batches = calibration_batches(blocks, cfg.batch_size, device) if blocks is not None else []
    wants_width = bool(cfg.heads or cfg.channels)
    need_bi = bool(cfg.layers) and cfg.layer_importance == "block"
    sq, bi = (input_norms(model, structure, batches, need_bi)
              if need_bi or (wants_width and cfg.importance == "activation") else (None, None))
    grads = taylor_grads(model, structure, batches) if wants_width and cfg.importance == "taylor" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    heads, kv, channels = ([], [], [])
    if wants_width:
        heads, kv, channels = unit_scores(
            structure, lambda lin: element_scores(lin, cfg.importance, cfg.norm, sq, grads, gen))
    layers = None
    if cfg.layers:
        layers = bi.float() if need_bi else torch.rand(len(structure.layers), generator=gen)
    return Scores(heads, kv, channels, layers)
