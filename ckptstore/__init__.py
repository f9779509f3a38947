"""ckptstore: safe, atomic, verified PyTorch checkpoints on any storage.

    import ckptstore
    ckptstore.save(state, "s3://bucket/run1/step-100")
    state = ckptstore.load("s3://bucket/run1/step-100")

See docs/ for the format, the guarantees and the backends.

The errors are imported here; the rest on first use (PEP 562), because
the rest imports torch, which takes a second: ``ckptstore --help`` and
``except ckptstore.CheckpointError`` need none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    FormatTooNewError,
    InsufficientSpaceError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedObjectError,
)

if TYPE_CHECKING:
    from .api import CheckpointInfo, VerifyReport, exists, export, load, open, save, verify
    from .manager import CheckpointManager
    from .rng import capture_rng_state, restore_rng_state
    from .view import Checkpoint, TensorInfo

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    **dict.fromkeys(("CheckpointInfo", "VerifyReport", "exists", "export", "load", "open", "save", "verify"),
                    ".api"),
    "CheckpointManager": ".manager",
    "capture_rng_state": ".rng", "restore_rng_state": ".rng",
    "Checkpoint": ".view", "TensorInfo": ".view",
}

__all__ = [
    "__version__",
    "save", "load", "verify", "exists", "open", "export",
    "Checkpoint", "TensorInfo", "CheckpointInfo", "VerifyReport", "CheckpointManager", "capture_rng_state", "restore_rng_state",
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError", "FormatTooNewError", "UnsafeCheckpointError",
    "UnsupportedObjectError", "CheckpointExistsError", "InsufficientSpaceError", "StorageError",
    "DeviceUnavailableError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value       # once: later lookups never come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
