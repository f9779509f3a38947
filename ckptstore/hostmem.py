"""Host memory of CPU tensors and storages as numpy arrays, without ``Tensor.numpy()``.

``Tensor.numpy()`` goes through torch's numpy bridge, whose first call in a process
runs code that is rarely warm: with the page cache dropped (a VM that just booted, a
benchmark's cold load) faulting it in costs 30-40 ms, more than reading a 64 MiB
checkpoint. A ctypes view of the same memory, wrapped by ``numpy.frombuffer``, costs
well under a millisecond.
"""

from __future__ import annotations

import ctypes

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
    buf = (ctypes.c_char * n).from_address(source.data_ptr())
    buf._owner = source                   # the memory lives as long as the array does
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
