"""The async save's side of the manager: the copy taken off the training tensors, the
handle a caller waits on, the background thread's priority, and the exit hook that
finishes a save still in flight when the interpreter exits.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import os
import threading
import weakref
from typing import Any

import numpy as np
import torch

from ..format.walk import transform
from ..info import CheckpointInfo

log = logging.getLogger("ckptstore")

# The background save's threads (the writer and every thread it starts, which inherit it) run at
# this nice value, so that on a machine whose cores the training loop keeps busy the save takes
# the time training leaves it instead of preempting the loop's threads.
BACKGROUND_NICE = 10


def yield_to_training() -> None:
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: the save runs at the loop's priority


def host_copy(s: torch.UntypedStorage) -> tuple[torch.UntypedStorage, bool]:
    """A host-memory copy of storage ``s``, and whether it is a pinned copy still in flight
    (a CUDA storage: synchronise before using it)."""
    if s.device.type == "cpu":
        return s.clone(), False
    pin = torch.cuda.is_available() and s.device.type == "cuda"
    new = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
    new.copy_(s, non_blocking=pin)
    return new, pin


def snapshot(state: Any) -> tuple[Any, dict]:
    """A copy of ``state`` that later in-place updates of the training tensors cannot reach.

    Tensors are copied per storage, so tensors that shared memory (tied
    weights, views) still share it in the copy. CUDA storages go to pinned
    host memory; the returned ``devices`` maps each copy's data pointer to
    the device it came from, so the checkpoint records the original device.
    """
    copies: dict = {}
    devices: dict = {}

    def copy_storage(s: torch.UntypedStorage) -> torch.UntypedStorage:
        key = (str(s.device), s.data_ptr(), s.nbytes())
        if key not in copies or s.data_ptr() == 0:
            new, _ = host_copy(s)
            if s.device.type != "cpu" and new.data_ptr():
                devices[new.data_ptr()] = str(s.device)
            copies[key] = new
        return copies[key]

    def copy_leaf(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            data = obj.detach()
            if data.device.type == "meta":
                out = data
            else:
                if data.is_conj() or data.is_neg():
                    data = data.resolve_conj().resolve_neg()
                storage = copy_storage(data.untyped_storage())
                out = torch.empty(0, dtype=data.dtype, device=storage.device)
                out.set_(storage, data.storage_offset(), data.shape, data.stride())
            if type(obj) is torch.nn.Parameter:
                return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
            if obj.requires_grad:
                out.requires_grad_(True)
            return out
        if isinstance(obj, np.ndarray):
            return obj.copy()
        if type(obj) is bytearray:
            return bytes(obj)
        return obj   # immutable values; anything unsupported is refused by the encoder

    out = transform(state, copy_leaf, copy=True)
    if devices and torch.cuda.is_available():
        torch.cuda.synchronize()   # the pinned copies are complete before save() returns
    return out, devices


def copy_blobs(blobs: list) -> list:
    """Copies of an encoded state's blobs (``tree.Blob``) that later in-place updates of the
    training tensors cannot reach: what an async save of one rank's part takes before
    ``save`` returns. Device storages go to (pinned) host memory; each blob keeps the device
    it records."""
    from ..format.manifest import NDARRAY, STORAGE
    from ..format.tree import Blob

    out, pinned = [], False
    for b in blobs:
        src = b.source
        if b.kind == STORAGE and isinstance(src, torch.UntypedStorage):
            src, pin = host_copy(src)
            pinned = pinned or pin
        elif b.kind == NDARRAY and isinstance(src, np.ndarray):
            src = src.copy()
        out.append(Blob(b.kind, b.nbytes, src, b.device))
    if pinned:
        torch.cuda.synchronize()   # the pinned copies are complete before save() returns
    return out


class SaveHandle:
    """An async save in flight: ``result()`` waits and returns its CheckpointInfo (or raises)."""

    def __init__(self, step: int, future: cf.Future):
        self.step = step
        self._future = future

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def __repr__(self) -> str:
        return f"SaveHandle(step={self.step}, done={self.done()})"


# Managers with a save that may be in flight: each has ``wait()``, ``directory`` and
# ``pending_step``.
live: "weakref.WeakSet[Any]" = weakref.WeakSet()


def finish_pending_at_exit() -> None:
    """Pending async saves finish at interpreter exit; a failure is logged, never dropped silently."""
    for mgr in list(live):
        step = mgr.pending_step
        try:
            mgr.wait()
        except BaseException as e:  # noqa: BLE001 - reported, the interpreter is exiting
            log.error("ckptstore: the pending save of step %s to %s failed at exit: %s", step, mgr.directory, e)


# The save in flight needs worker threads of its own (checksums, uploads), and
# concurrent.futures refuses new ones once its exit hook has run. Hooks
# registered with threading run in reverse order, before atexit's: registered
# after concurrent.futures.thread's, this one runs first.
import concurrent.futures.thread as _cf_thread  # noqa: E402,F401 - its exit hook must be registered first
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(finish_pending_at_exit)
else:  # pragma: no cover - every supported Python has it
    atexit.register(finish_pending_at_exit)
