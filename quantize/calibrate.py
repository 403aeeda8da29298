"""Layer-by-layer calibration: peak memory is the model plus one decoder layer's inputs.

    inputs = capture(model, layers, blocks, batch_size, device)   # what layer 0 receives
    for each layer: stats = observe(layer, inputs, linears)       # one float pass
                    ... quantize the layer in place ...
                    inputs = forward(layer, inputs)               # its (quantized) outputs feed the next

Statistics of a linear's input X (n, in) are reduced as they stream: the Gram matrix XᵀX
(in, in), mean |x| and max |x| per channel. The Gram matrix is what makes the searches cheap:
the output error of a weight change Δ (out, in) over every calibration token is
‖X Δᵀ‖² = Σ (Δ G) ⊙ Δ, with no second pass over the data. Linears that read the very same
tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one statistics
object, and the module that produced it (a norm, i.e. a module with a 1-D weight) is recorded:
that is where a per-channel scale can be folded. A reshaped view of a norm's output counts as
that output (MLA's kv_b reads kv_a_layernorm's output viewed as one head; MoE blocks flatten
their input). Modules that are not linears (a MoE block) can be watched the same way, and fused
routed experts keep per-expert statistics (dsc.quantize.experts).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dsc import hf


class _Captured(Exception):
    """Raised by the hook on layer 0: the rest of the model need not run during capture."""


Inputs = list[tuple[tuple, dict]]  # (args, kwargs) of one decoder-layer call per batch


@torch.no_grad()
def capture(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor, batch_size: int,
            device: torch.device) -> Inputs:
    """The arguments decoder layer 0 receives for each batch of `blocks` (N, T)."""
    inputs: Inputs = []

    def hook(_module, args, kwargs):
        inputs.append((args, hf.without_cache(kwargs)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in blocks.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def hidden(out):
    """The hidden states of a module's output (decoder layers and attention may return tuples)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def forward(layer: nn.Module, inputs: Inputs) -> Inputs:
    """Run `layer` on every batch; its outputs become the next layer's first argument."""
    return [_next(args, kwargs, hidden(layer(*args, **kwargs))) for args, kwargs in inputs]


def _next(args: tuple, kwargs: dict, out: torch.Tensor) -> tuple[tuple, dict]:
    """The call of the next layer: the same arguments with `out` as its hidden states."""
    if args:
        return (out, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": out}


@dataclass
class InputStats:
    """Streaming statistics of one input tensor shared by `linears` (names inside the layer)."""

    linears: list[str]
    producer: str | None  # the norm whose output this is, when there is one
    gram: torch.Tensor | None  # (in, in) Σ xᵀx, float32 (None: not needed, e.g. by SmoothQuant)
    abs_sum: torch.Tensor  # (in,) Σ |x|
    abs_max: torch.Tensor  # (in,) max |x|
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (n, in)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(0)
        torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        self.count += x.shape[0]

    @property
    def gram_mean(self) -> torch.Tensor:
        if self.gram is None:
            raise RuntimeError("observe(..., gram=False) kept no Gram matrix")
        return self.gram / max(self.count, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` is `b` or a reshaped view of all of it."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype)


@dataclass
class _Observer:
    stats: list[InputStats] = field(default_factory=list)
    by_linear: dict[str, InputStats] = field(default_factory=dict)
    watched: dict[str, InputStats] = field(default_factory=dict)
    produced: dict[str, torch.Tensor] = field(default_factory=dict)  # norm outputs of the first batch
    inputs: list[tuple[torch.Tensor, InputStats]] = field(default_factory=list)  # first batch: input → stats
    added: list[tuple[torch.Tensor, InputStats]] = field(default_factory=list)  # this batch's, counted once
    first_batch: bool = True
    gram: bool = True

    def norm_hook(self, name):
        def hook(_module, _args, out):
            if self.first_batch:
                self.produced[name] = hidden(out)
        return hook

    def _new(self, name: str, x: torch.Tensor, gram: bool) -> InputStats:
        producer = next((n for n, out in self.produced.items() if _same(x, out)), None)
        width = x.shape[-1]
        return InputStats([name], producer, x.new_zeros(width, width, dtype=torch.float32) if gram else None,
                          x.new_zeros(width, dtype=torch.float32), x.new_zeros(width, dtype=torch.float32))

    def linear_hook(self, name):
        def hook(_module, args):
            x = args[0]
            if self.first_batch and name not in self.by_linear:
                st = next((st for t, st in self.inputs if _same(x, t)), None)
                if st is not None:  # reads what a linear before it read (q/k/v; MLA's q_a and kv_a): one group
                    st.linears.append(name)
                else:
                    st = self._new(name, x, self.gram)
                    self.stats.append(st)
                    self.inputs.append((x, st))
                self.by_linear[name] = st
            st = self.by_linear[name]
            if not any(t is x and s is st for t, s in self.added):
                st.add(x)
                self.added.append((x, st))
        return hook

    def watch_hook(self, name):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if name not in self.watched:
                self.watched[name] = self._new(name, x, False)
            self.watched[name].add(x)
        return hook


@dataclass
class Observed:
    stats: list[InputStats]  # one per distinct linear input, in call order
    outputs: Inputs  # the float layer's outputs, as the next layer's calls
    calls: dict[str, Inputs]  # parent module of linears → its calls in the first `keep_calls` batches
    watched: dict[str, InputStats] = field(default_factory=dict)  # watched module → its input (no Gram)


@torch.no_grad()
def observe(layer: nn.Module, inputs: Inputs, linears: dict[str, nn.Linear], keep_calls: int = 0,
            gram: bool = True, watch: tuple[str, ...] = (), experts: dict | None = None) -> Observed:
    """Input statistics of `linears` (name inside `layer` → module) over every batch, grouped by
    shared input; the layer's (float) outputs; and, for the first `keep_calls` batches, the
    arguments each module holding linears (attention, MLP) or watched was called with, so a search
    can replay it. `watch`: modules whose input is recorded too; `experts`: fused experts module
    name → its dsc.quantize.experts.ExpertStats, filled from the tokens routed to each expert."""
    obs = _Observer(gram=gram)
    handles = [m.register_forward_hook(obs.norm_hook(n)) for n, m in layer.named_modules()
               if _is_norm(m)]
    handles += [lin.register_forward_pre_hook(obs.linear_hook(n)) for n, lin in linears.items()]
    handles += [layer.get_submodule(n).register_forward_pre_hook(obs.watch_hook(n), with_kwargs=True) for n in watch]
    handles += [layer.get_submodule(n).register_forward_pre_hook(st.hook, with_kwargs=True)
                for n, st in (experts or {}).items()]
    calls: dict[str, Inputs] = {}

    def keep(name):
        def hook(_module, args, kwargs):
            if len(calls.setdefault(name, [])) < keep_calls:
                calls[name].append((args, kwargs))
        return hook

    if keep_calls:
        parents = ({n.rpartition(".")[0] for n in linears} | set(watch)) - {""}
        handles += [layer.get_submodule(p).register_forward_pre_hook(keep(p), with_kwargs=True) for p in parents]
    outputs = []
    try:
        for args, kwargs in inputs:
            outputs.append(_next(args, kwargs, hidden(layer(*args, **kwargs))))
            obs.first_batch, obs.produced, obs.inputs, obs.added = False, {}, [], []
    finally:
        for h in handles:
            h.remove()
    return Observed(obs.stats, outputs, calls, obs.watched)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and not isinstance(module, nn.Embedding)


@contextmanager
def placed(module: nn.Module, device: torch.device):
    """Run with `module` on `device` and move it back after: how a model larger than the
    accelerator is calibrated one layer at a time (a no-op when it already lives there)."""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
