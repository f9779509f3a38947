"""The exceptions ckptstore raises.

Every error carries the checkpoint's URI with secrets already redacted
(``err.uri``), and its message says what happened and, where there is one,
what to do about it. Catching the stdlib base (``FileNotFoundError``,
``FileExistsError``, ``TypeError``, ``OSError``) keeps working for code that
was written against ``torch.save``/``torch.load``.
"""

from __future__ import annotations

import contextlib as _contextlib
import errno as _errno
import sys as _sys
from typing import Callable as _Callable


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
        self.strerror: str | None = message
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


class DeviceUnavailableError(CheckpointError, RuntimeError):
    """A tensor is to be placed on a device this machine lacks (CUDA without a GPU, a
    ``cuda:3`` on a 2-GPU host). The message names the device and suggests ``map_location``.

    Also a ``RuntimeError``, which is what ``torch.load`` raises for the same mistake; never
    a ``CorruptCheckpointError``: the checkpoint is fine, the machine or the call is not.
    """


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds pickled content and ``allow_pickle=True`` was not given."""


class UnsupportedObjectError(CheckpointError, TypeError):
    """A value the safe format cannot hold; the message names where it sits."""


class CheckpointExistsError(_OSCheckpointError, FileExistsError):
    """``overwrite=False`` and a checkpoint is already committed there."""

    default_errno = _errno.EEXIST


class ClaimHeldError(CheckpointExistsError):
    """Another writer, alive or not yet provably gone, is committing a checkpoint at the
    same place (``overwrite=False``): nothing is committed there yet."""


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
    "DeviceUnavailableError",
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


class MissingMetricError(CallerMistake, KeyError):
    """``metrics`` given to a manager's ``save`` lack its ``best_metric``."""

    def __str__(self) -> str:       # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


class ArgumentError(CallerMistake, ValueError):
    """A bad argument value of the caller's (a ``map_location`` that names no device)."""


# ---------------------------------------------------------------- what is corruption
#
# The one place that decides whether a failure is corruption of what is stored. The record
# walkers (format/, plan.py) wrap their work in ``record_checks``: a Python error raised by
# a malformed record (a TypeError on a field of the wrong type, an IndexError on a child
# that does not exist) becomes CorruptCheckpointError there, and every error of the caller
# or of the machine passes through as it is. The manager falls back to an older step only
# for what ``is_corruption`` says is corruption; ``Store.errors`` passes the machine's own
# errors through instead of calling them storage failures.

# What a malformed record makes the code walking it raise.
_STRUCTURAL = (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError, RecursionError,
               RuntimeError)

_NOT_STORED = "_ckptstore_not_stored"


def not_stored(e: BaseException) -> BaseException:
    """Mark ``e`` (raised by the caller's code or the machine while loading: a ``map_location``
    function, a device copy) as never a sign of corruption; returns it, to be re-raised."""
    try:
        setattr(e, _NOT_STORED, True)
    except AttributeError:   # pragma: no cover - built-in exceptions take attributes
        pass
    return e


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = _sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    # torch's CPU allocator raises a plain RuntimeError
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def is_environment(e: BaseException) -> bool:
    """An error of the caller or of this machine, never of the stored bytes: it propagates
    from every reader as it is (interrupts, out of memory, devices, wrong arguments)."""
    return (not isinstance(e, Exception) or isinstance(e, (CallerMistake, DeviceUnavailableError))
            or getattr(e, _NOT_STORED, False) or _out_of_memory(e))


def is_corruption(e: BaseException) -> bool:
    """Whether ``e`` says that what is stored failed a check (checksum, size, structure) or is
    incomplete (a data file gone): the only failures a manager falls back past."""
    return isinstance(e, (CorruptCheckpointError, CheckpointNotFoundError))


@_contextlib.contextmanager
def record_checks(what: str | _Callable[[], str] = "node table"):
    """Walk a commit record: a Python error its structure provokes is corruption; the
    caller's and the machine's errors pass through unchanged. ``what`` names the part
    walked (a callable is asked only when there is an error to name)."""
    try:
        yield
    except CheckpointError:
        raise
    except BaseException as e:
        if is_environment(e) or not isinstance(e, _STRUCTURAL):
            raise
        where = what() if callable(what) else what
        raise CorruptCheckpointError(f"malformed checkpoint structure: {where}: {type(e).__name__}: {e}"[:300]) \
            from None
