"""Helpers that let QAT code treat plain tensors and FSDP2's sharded DTensors alike.

Outside forward, FSDP2 registers each parameter as a DTensor holding this rank's shard; the QAT
switch needs statistics of the full weight and must write each rank's part of the new scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a DTensor (a collective: call on every rank), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def write_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full ``value`` into ``param`` in place; for a DTensor, each rank writes its shard
    (``value`` must be identical on every rank)."""
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
