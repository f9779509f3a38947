"""ckptstore: safe, atomic, verified PyTorch checkpoints on any storage.

    import ckptstore
    ckptstore.save(state, "s3://bucket/run1/step-100")
    state = ckptstore.load("s3://bucket/run1/step-100")

See docs/ for the format, the guarantees and the backends.
"""

from ._version import __version__
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatTooNewError,
    InsufficientSpaceError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedObjectError,
)
from .api import CheckpointInfo, VerifyReport, exists, export, load, open, save, verify
from .manager import CheckpointManager
from .rng import capture_rng_state, restore_rng_state
from .view import Checkpoint, TensorInfo

__all__ = [
    "__version__",
    "save", "load", "verify", "exists", "open", "export",
    "Checkpoint", "TensorInfo", "CheckpointInfo", "VerifyReport", "CheckpointManager", "capture_rng_state", "restore_rng_state",
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError", "FormatTooNewError", "UnsafeCheckpointError",
    "UnsupportedObjectError", "CheckpointExistsError", "InsufficientSpaceError", "StorageError",
]
