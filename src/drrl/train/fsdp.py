"""FSDP (``train.distributed: fsdp``): shard parameters, gradients and optimizer state over the processes.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each transformer block and then the rest
of the model; a block's full weights exist only while it runs. Checkpoints stay in drrl's single-file
format: at a checkpoint every process hands its shards to rank 0, which writes the full model and
optimizer exactly as a DDP or single-process run would, so any run can resume one written by any other.
"""

from __future__ import annotations

import torch
from torch import nn

from drrl.errors import ConfigError


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2
        return False
    return isinstance(module, FSDPModule)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError("train.distributed=fsdp needs torch >= 2.6 (FSDP2); upgrade torch or use ddp") from None
    return fully_shard


def check_fsdp() -> None:
    """Raise the one-line error now if this torch has no FSDP2."""
    _fully_shard()


def shard_model(loss_module: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``loss_module`` (a :class:`drrl.train.distributed.LossModule`) block by block, then at the root."""
    model = loss_module.model
    fully_shard = _fully_shard()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(loss_module)
    return loss_module


def clip_sharded(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping over sharded (DTensor) gradients; returns the norm before clipping."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _names(loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified name (inside the model) of each optimizer parameter, in state-dict index order."""
    by_id = {id(p): n.removeprefix("model.") for n, p in loss_module.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(loss_module: nn.Module, optimizer: torch.optim.Optimizer, build) -> tuple:
    """Gather the full model and optimizer state on rank 0 (collective: every process calls it).

    Returns ``(model, optimizer_state_dict)`` on rank 0 (a CPU copy of the model built with ``build()``, and an
    optimizer state dict keyed by parameter index like ``optimizer.state_dict()``), ``(None, None)`` elsewhere.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(loss_module, options=options)
    optim_sd = get_optimizer_state_dict(loss_module, optimizer, options=options)
    if dist.get_rank() != 0:
        return None, None
    with torch.random.fork_rng(devices=[]):  # building draws an initialisation: keep this process's stream
        copy = build()
    copy.load_state_dict({k.removeprefix("model."): v for k, v in model_sd.items()})
    index = {name: i for i, name in enumerate(_names(loss_module, optimizer))}
    state = {index[k.removeprefix("model.")]: v for k, v in optim_sd["state"].items()}
    groups = [{**g, "params": [index[n.removeprefix("model.")] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return copy, {"state": state, "param_groups": groups}


def load_optimizer_state(loss_module: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a full, index-keyed optimizer state dict (a drrl checkpoint's) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [f"model.{n}" for n in _names(loss_module, optimizer)]
    full = {
        "state": {names[i]: v for i, v in state_dict["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]],
    }
    set_optimizer_state_dict(loss_module, optimizer, full, options=StateDictOptions(full_state_dict=True, strict=True))
