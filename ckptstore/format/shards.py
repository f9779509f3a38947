"""Tensors sharded across the ranks of a torch.distributed job: DTensor and ShardedTensor.

A rank holds some shards of a global tensor. ``local_shards`` says which,
as (global offsets, local tensor) pairs, from the tensor's own metadata;
``target_regions`` says the same of a tensor restored into. Nothing here
communicates: each rank knows its own shards. torch.distributed is imported
only when a value might be one of these (a process without it never pays).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..errors import UnsupportedObjectError


def _dtensor_type() -> type | None:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _sharded_tensor_type() -> type | None:
    mod = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return getattr(mod, "ShardedTensor", None) if mod is not None else None


def is_sharded(obj: Any) -> bool:
    """Whether ``obj`` is a DTensor or a ShardedTensor (only when torch.distributed has defined them)."""
    if not isinstance(obj, torch.Tensor) or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return False
    d, s = _dtensor_type(), _sharded_tensor_type()
    return (d is not None and isinstance(obj, d)) or (s is not None and isinstance(obj, s))


def local_shards(obj: Any, where: str) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(global offsets, local tensor) of each shard this rank holds of ``obj`` (empty ones left out)."""
    d = _dtensor_type()
    if d is not None and isinstance(obj, d):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(p.is_partial() for p in obj.placements):
            raise UnsupportedObjectError(
                f"{where}: a DTensor with a Partial placement holds unreduced values; redistribute it "
                "(e.g. to Replicate or Shard) before saving")
        local = obj.to_local().detach()
        shape, offsets = compute_local_shape_and_global_offset(obj.shape, obj.device_mesh, obj.placements)
        if tuple(local.shape) != tuple(shape):
            raise UnsupportedObjectError(f"{where}: the DTensor's local tensor has shape {tuple(local.shape)}, "
                                         f"its placements say {tuple(shape)}")
        return [(tuple(int(o) for o in offsets), local)] if local.numel() else []
    out = []
    for shard in obj.local_shards():
        t = shard.tensor.detach()
        if t.numel():
            out.append((tuple(int(o) for o in shard.metadata.shard_offsets), t))
    return out


def target_regions(dst: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(global offsets, local tensor to fill in place) of each part of ``dst`` this rank holds:
    the whole tensor at offset 0 for a plain tensor, the local shards of a DTensor or
    ShardedTensor."""
    if not is_sharded(dst):
        return [((0,) * dst.dim(), dst)]
    d = _dtensor_type()
    if d is not None and isinstance(dst, d):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = dst._local_tensor          # the storage the DTensor owns: filled in place
        shape, offsets = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
        return [(tuple(int(o) for o in offsets), local)] if local.numel() and tuple(local.shape) == tuple(shape) \
            else []
    return [(tuple(int(o) for o in s.metadata.shard_offsets), s.tensor) for s in dst.local_shards()
            if s.tensor.numel()]


def overlap(a_off, a_shape, b_off, b_shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box two boxes (offsets, shape) share, as (offsets, shape), or None."""
    lo, size = [], []
    for ao, an, bo, bn in zip(a_off, a_shape, b_off, b_shape):
        start, end = max(ao, bo), min(ao + an, bo + bn)
        if end <= start:
            return None
        lo.append(start)
        size.append(end - start)
    return tuple(lo), tuple(size)


def box(t: torch.Tensor, offsets, at, shape) -> torch.Tensor:
    """The part of ``t`` (which sits at ``offsets`` in the global tensor) at global ``at`` of ``shape``."""
    for dim, (o, a, n) in enumerate(zip(offsets, at, shape)):
        t = t.narrow(dim, a - o, n)
    return t
