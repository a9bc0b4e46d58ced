"""Fully sharded data parallel (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``) for
configurations that do not fit one GPU, e.g. full fine-tuning of CogVideoX-5B with AdamW (about
14 bytes per parameter before activations: weights, gradients and AdamW's two moments). ``cfg.fsdp`` replaces DDP in the same plain loop; nothing here shards by hand.

What is sharded: the policy transformer (each block, then the root, as FSDP2 recommends) and the
frozen reference copy of it, so weights, gradients and optimizer moments are split across ranks.
Parameters become DTensors (Shard(0)); a forward all-gathers a block's weights, a backward
reduce-scatters its gradients (averaged over ranks, as DDP does).

What is gathered (so that files and the replay pool look the same as a 1-process run's):
``full_tensor`` turns a sharded parameter into the whole tensor, a collective that every rank
must call in the same order; ``copy_full_`` writes a whole tensor into a sharded parameter (each
rank keeps its own chunk, no communication). Optimizer state goes through
``torch.distributed.checkpoint.state_dict`` as a full state dict keyed by parameter names.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# The repeated blocks of each family's transformer: the units FSDP2 gathers one at a time.
BLOCKS = {"cogvideox": "transformer_blocks", "wan": "blocks"}


def shard(module: nn.Module, family: str, device: torch.device) -> nn.Module:
    """Apply ``fully_shard`` to each transformer block and to the root, in place; returns it.
    The module may sit on the CPU: each rank moves only its shards to ``device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if family not in BLOCKS:
        raise ValueError(f"fsdp shards the video transformers {tuple(BLOCKS)}; model {family!r} is not one")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(module, BLOCKS[family]):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor, name: str = "", cast_from: tuple = ()) -> None:
    """param <- full, in place. For a sharded parameter each rank copies its own chunk of
    ``full`` (which every rank holds), as FSDP2 placed it; no communication. ``full`` must have
    exactly the parameter's (whole) shape and dtype, or a dtype in ``cast_from`` (the pool's bf16
    snapshots): a (1,) tensor is never broadcast into a (64,) weight. A ValueError names ``name``."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"tensor {name or '?'} has shape {tuple(full.shape)}, the model's is {tuple(param.shape)}")
    if full.dtype != param.dtype and full.dtype not in cast_from:
        raise ValueError(f"tensor {name or '?'} has dtype {full.dtype}, the model's is {param.dtype}")
    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def optimizer_state_dict(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (moments gathered, keyed by parameter name) on rank 0, {} on
    the other ranks. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of ``optimizer_state_dict``; every rank passes the full state (read from the same file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def plain_copy(module: nn.Module) -> nn.Module | None:
    """An unsharded module with the sharded one's weights, on rank 0 (None elsewhere), for what
    rank 0 writes alone (final/, the last sample grid). A collective. Built on the meta device
    and filled with the gathered weights (no second random init); buffers, which FSDP2 does not
    shard, are copied as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    cls = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))  # the model's own class
    with torch.device("meta"):
        plain = cls.from_config(module.config)
    plain.load_state_dict(state, assign=True)
    own = dict(module.named_buffers())
    for name, sub in plain.named_modules():
        for key, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                sub._buffers[key] = own[f"{name}.{key}" if name else key].detach().cpu().clone()
    return plain.train(module.training)
