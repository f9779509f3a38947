"""Exact, bit-level comparison of checkpoint states.

`==` is the wrong tool for checking a round trip: it is False for NaN, True for
0.0 == -0.0, True for 1 == True == 1.0 and for a list against a tuple, and it is
not even defined for float8 or complex32 tensors. The comparison here is by
exact type and by bytes, and it walks the tree with an explicit stack so that a
deeply nested state does not exhaust the interpreter's recursion limit.
"""
from __future__ import annotations

import struct
from collections import OrderedDict

import numpy as np
import torch


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a flat uint8 tensor, independent of strides."""
    t = t.detach()
    return t.contiguous().reshape(-1).view(torch.uint8)


def tensors_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(tensor_bytes(a), tensor_bytes(b))


def _key_repr(key) -> str:
    return f"[{key!r}]" if not isinstance(key, str) else f'["{key}"]'


def assert_state_equal(actual, expected, path: str = "state") -> None:
    """Assert that `actual` is exactly `expected`: same types, keys, order, bits."""
    stack = [(actual, expected, path)]
    while stack:
        a, e, p = stack.pop()
        assert type(a) is type(e), f"{p}: got {type(a).__module__}.{type(a).__qualname__}, expected {type(e).__module__}.{type(e).__qualname__}"
        if isinstance(e, torch.Tensor):
            assert a.dtype == e.dtype, f"{p}: dtype {a.dtype} != {e.dtype}"
            assert a.shape == e.shape, f"{p}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert a.device == e.device, f"{p}: device {a.device} != {e.device}"
            assert a.requires_grad == e.requires_grad, f"{p}: requires_grad {a.requires_grad} != {e.requires_grad}"
            assert torch.equal(tensor_bytes(a), tensor_bytes(e)), f"{p}: tensor values differ"
        elif isinstance(e, np.ndarray):
            assert a.dtype == e.dtype, f"{p}: numpy dtype {a.dtype} != {e.dtype}"
            assert a.shape == e.shape, f"{p}: numpy shape {a.shape} != {e.shape}"
            assert a.tobytes() == e.tobytes(), f"{p}: numpy values differ"
        elif isinstance(e, np.generic):
            assert a.dtype == e.dtype, f"{p}: numpy scalar dtype {a.dtype} != {e.dtype}"
            assert a.tobytes() == e.tobytes(), f"{p}: numpy scalar {a!r} != {e!r}"
        elif isinstance(e, float):
            assert struct.pack("<d", a) == struct.pack("<d", e), f"{p}: float {a!r} != {e!r}"
        elif isinstance(e, dict):
            a_keys, e_keys = list(a.keys()), list(e.keys())
            assert a_keys == e_keys, f"{p}: keys {a_keys!r} != {e_keys!r}"
            for ak, ek in zip(a_keys, e_keys):
                assert type(ak) is type(ek), f"{p}: key {ak!r} has type {type(ak).__name__}, expected {type(ek).__name__}"
            if isinstance(e, OrderedDict) and hasattr(e, "_metadata"):
                assert hasattr(a, "_metadata"), f"{p}: OrderedDict lost its _metadata attribute"
                assert a._metadata == e._metadata, f"{p}: _metadata {a._metadata!r} != {e._metadata!r}"
            for k in reversed(e_keys):
                stack.append((a[k], e[k], p + _key_repr(k)))
        elif isinstance(e, (list, tuple)):  # torch.Size included
            assert len(a) == len(e), f"{p}: length {len(a)} != {len(e)}"
            for i in reversed(range(len(e))):
                stack.append((a[i], e[i], f"{p}[{i}]"))
        elif e is None:
            pass
        else:  # bool, int, str, bytes, torch.dtype, torch.device
            assert a == e, f"{p}: {a!r} != {e!r}"


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
