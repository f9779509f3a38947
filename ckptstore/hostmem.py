"""Host memory of CPU tensors and storages as numpy arrays, without ``Tensor.numpy()``.

``Tensor.numpy()`` goes through torch's numpy bridge, whose first call in a process
runs code that is rarely warm: with the page cache dropped (a VM that just booted, a
benchmark's cold load) faulting it in costs 30-40 ms, more than reading a 64 MiB
checkpoint. An array made from the memory's address through numpy's array
interface costs well under a millisecond the first time, and a few microseconds
after (a ctypes array type per size would cost ten times that).
"""

from __future__ import annotations

import numpy as np
import torch


def host_bytes(source: torch.UntypedStorage | torch.Tensor) -> np.ndarray:
    """A writable uint8 array over the bytes of a CPU ``UntypedStorage``, or of a contiguous
    CPU tensor's elements; the array keeps ``source`` alive."""
    if isinstance(source, torch.Tensor):
        if source.device.type != "cpu" or not source.is_contiguous():
            raise ValueError("host_bytes needs a contiguous CPU tensor")
        n = source.numel() * source.element_size()
    else:
        if source.device.type != "cpu":
            raise ValueError("host_bytes needs a CPU storage")
        n = source.nbytes()
    if n == 0:
        return np.zeros(0, np.uint8)
    return np.asarray(_Memory(source.data_ptr(), n, source))


class _Memory:
    """``n`` bytes at ``address``, kept alive by holding ``owner``, as numpy's array interface."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, address: int, n: int, owner):
        self.__array_interface__ = {"data": (address, False), "shape": (n,), "typestr": "|u1", "version": 3}
        self.owner = owner
