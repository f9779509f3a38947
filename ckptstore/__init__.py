"""ckptstore: safe, atomic, verified PyTorch checkpoints on any storage.

    import ckptstore
    ckptstore.save(state, "s3://bucket/run1/step-100")
    state = ckptstore.load("s3://bucket/run1/step-100")

See docs/ for the format, the guarantees and the backends.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedObjectError,
)
from .api import CheckpointInfo, VerifyReport, exists, load, save, verify  # noqa: E402
from .manager import CheckpointManager  # noqa: E402
from .rng import capture_rng_state, restore_rng_state  # noqa: E402

__all__ = [
    "__version__",
    "save", "load", "verify", "exists",
    "CheckpointInfo", "VerifyReport", "CheckpointManager", "capture_rng_state", "restore_rng_state",
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError", "UnsafeCheckpointError",
    "UnsupportedObjectError", "CheckpointExistsError", "InsufficientSpaceError", "StorageError",
]
