"""CheckpointManager: one directory of step checkpoints for a training run.

The manager (``core``) drives saves, restores and retention; retention is a pure
function (``retention``), the save schedule's signals live in ``schedule``, and
the async save's copy, handle and exit hook in ``background``.
"""

from .core import CheckpointManager, step_dir, step_of
from .retention import StepRecord, best_steps, to_keep, to_thin

__all__ = ["CheckpointManager", "StepRecord", "best_steps", "step_dir", "step_of", "to_keep", "to_thin"]
