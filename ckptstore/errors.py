"""The exceptions ckptstore raises.

Every error carries the checkpoint's URI with secrets already redacted
(``err.uri``), and its message says what happened and, where there is one,
what to do about it. Catching the stdlib base (``FileNotFoundError``,
``FileExistsError``, ``TypeError``, ``OSError``) keeps working for code that
was written against ``torch.save``/``torch.load``.
"""

from __future__ import annotations

import errno as _errno


class CheckpointError(Exception):
    """Base of every error ckptstore raises."""

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(message)
        self.uri = uri

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class _OSCheckpointError(CheckpointError):
    # OSError subclasses normally take (errno, strerror); we keep a plain
    # message as str() but still expose .errno for callers that switch on it.
    default_errno: int | None = None

    def __init__(self, message: str, uri: str | None = None, errno: int | None = None):
        CheckpointError.__init__(self, message, uri)
        self.errno = errno if errno is not None else self.default_errno
        self.strerror = message
        self.filename = uri


class CheckpointNotFoundError(_OSCheckpointError, FileNotFoundError):
    """Nothing committed is at the URI."""

    default_errno = _errno.ENOENT


class CorruptCheckpointError(CheckpointError):
    """A checksum, size or structure check failed."""


class FormatTooNewError(CheckpointError):
    """The newest intact commit record has a format version newer than this ckptstore reads.

    Not a ``CorruptCheckpointError``: nothing is wrong with the checkpoint, and
    falling back to an older generation or step would silently resume the past.
    """


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds pickled content and ``allow_pickle=True`` was not given."""


class UnsupportedObjectError(CheckpointError, TypeError):
    """A value the safe format cannot hold; the message names where it sits."""


class CheckpointExistsError(_OSCheckpointError, FileExistsError):
    """``overwrite=False`` and a checkpoint is already committed there."""

    default_errno = _errno.EEXIST


class InsufficientSpaceError(_OSCheckpointError, OSError):
    """The target filled up, or the checkpoint would not fit."""

    default_errno = _errno.ENOSPC


class StorageError(_OSCheckpointError, OSError):
    """Any other failure of the storage backend."""


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FormatTooNewError",
    "UnsafeCheckpointError",
    "UnsupportedObjectError",
    "CheckpointExistsError",
    "InsufficientSpaceError",
    "StorageError",
]


class CallerMistake(Exception):
    """Mixed into the KeyError / ValueError / TypeError a wrong ``select=`` or ``into=``
    raises: the caller's mistake, passed through unchanged (never a StorageError)."""


class PathNotFoundError(CallerMistake, KeyError):
    def __str__(self) -> str:       # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


class PathMismatchError(CallerMistake, ValueError):
    pass


class SelectTypeError(CallerMistake, TypeError):
    pass
