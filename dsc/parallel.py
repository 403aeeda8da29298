"""The torch.distributed adapter: every call dsc makes to process groups, DDP, FSDP (fully_shard)
and distributed checkpoint state dicts is here. Launch with `torchrun` or `accelerate launch`;
a single process uses the same calls on a plain module."""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT = timedelta(hours=int(os.environ.get("DSC_DIST_TIMEOUT_HOURS", "6")))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group a launcher (torchrun, accelerate launch) described in the environment;
    returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo for the CPU tensors (logged scalars, objects), nccl for the model's; processes wait
        # while rank 0 runs the other stages alone, so the timeout is hours, not NCCL's 10 minutes
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def _layer_classes(model: nn.Module) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def wrap(objective: nn.Module, mode: str, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP replicas or FSDP shards (each decoder layer, then the rest) when distributed.
    `find_unused`: some trainable weights may get no gradient (DDP must not wait for them)."""
    if not active():
        return objective
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        classes = _layer_classes(objective.student)
        if not classes:
            raise ValueError(f"{type(objective.student).__name__} names no decoder layer class (_no_split_modules) "
                             "to shard by: use parallel: ddp")
        for module in objective.student.modules():
            if type(module).__name__ in classes:
                fully_shard(module)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def sync_gradients(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over the processes."""
    if not active() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def any_true(flag: bool) -> bool:
    """True on every process when it is True on one of them."""
    if not active():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj=None):
    """Rank 0's `obj` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def exit_process(code: int) -> None:
    """End a launched process (torchrun / accelerate launch) once its work is written: leave the
    process group, flush, and exit without running C++ destructors — gloo can otherwise abort
    the exit ("terminate called without an active exception") after everything succeeded."""
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _options(offload: bool = True, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload, **kw)


def trainable_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) state dicts of the trainable parameters and the optimizer, keyed by
    parameter name; collective under FSDP. Frozen weights are not saved (they are the input)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(ignore_frozen_params=True))


def load_trainable_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(strict=False))


def full_state(module: nn.Module, offload: bool = True) -> dict:
    """Every weight of `module`, unsharded (collective under FSDP); offload: on CPU, rank 0 only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(offload))
