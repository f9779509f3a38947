"""What every store offers the writer, the reader and the commit strategies.

A store is one checkpoint directory on one backend. It moves bytes and lists
names; it knows nothing of the format. Backend exceptions are turned into
ckptstore errors here, in one place, with the URI redacted.
"""

from __future__ import annotations

import contextlib
import errno
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    InsufficientSpaceError,
    StorageError,
    is_environment,
)
from ..url import Location, scrub

CHUNK = 64 << 20  # bytes per write/read call: large enough for full disk speed, small enough to bound memory

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass
class Entry:
    name: str
    size: int
    mtime: float | None  # seconds since the epoch, when the backend tells


class Writer(ABC):
    """A data file being written. ``close`` makes it durable; ``abort`` removes it."""

    @abstractmethod
    def write(self, data: memoryview) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    #: whether ``stored_crc`` can read back what was written while the file is still open
    reads_back = False

    def stored_crc(self, offset: int, nbytes: int, crc: int) -> int:
        """``crc`` extended by the CRC-32C of bytes [offset, offset + nbytes) of the file as the
        storage now holds them (only where ``reads_back``)."""
        raise NotImplementedError


class Reader(ABC):
    @abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns bytes read (short only at end of file)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Store(ABC):
    """One checkpoint directory (or prefix) on one backend."""

    #: whether rename within the directory atomically replaces the target
    atomic_rename = False
    #: size of one data file (the data stream is cut into parts of this size
    #: and uploaded in parallel); None keeps all data in one file
    part_bytes: int | None = None
    #: whether parts are uploaded ``concurrency`` at a time; if not, they are
    #: written one after another and each is read back while the next is written
    parallel_parts = True
    #: transfers in flight at once (parts uploaded, ranges read)
    concurrency: int = 4
    #: bytes per read request when loading
    read_bytes: int = 8 << 20
    #: reads into existing tensors go best as a few long sequential streams (a disk
    #: and its read-ahead) rather than many ranges in flight (object stores)
    stream_reads = False
    #: stored files never change after they are written (object stores): the
    #: listing's sizes are the truth and no read past the end is needed
    immutable_files = False
    #: keep the previous committed generation when a save commits: on mounts
    #: that upload in the background, in any order, the new one may not have
    #: reached the remote when the machine dies, and the old one must still be there
    keep_previous = False
    #: whether ``compression="auto"`` compresses here: bytes cost upload time and quota
    #: (object stores, mounts of remote drives), rather than reaching a local disk faster
    #: than the compressor makes them
    compression_pays = True

    def __init__(self, location: Location):
        self.location = location
        if location.part_size is not None:
            self.part_bytes = location.part_size
        if location.concurrency is not None:
            self.concurrency = location.concurrency

    @property
    def uri(self) -> str:
        return self.location.display

    # -- listing
    @abstractmethod
    def list(self) -> dict[str, Entry] | None:
        """Files directly in the directory; None when there is no directory."""

    @abstractmethod
    def is_file(self) -> bool:
        """Whether the location itself is a single file (a foreign checkpoint)."""

    @abstractmethod
    def subdirs(self) -> list[str]:
        """Names of the directories directly inside this one."""

    def tree(self) -> dict[str, dict[str, Entry]]:
        """The files of every directory directly inside this one: {subdir: {name: Entry}}."""
        out = {}
        for d in self.subdirs():
            out[d] = self.child(d).list() or {}
        return out

    def remove_dir(self) -> None:
        """Remove this directory if it is empty (where directories exist)."""

    def child(self, name: str) -> "Store":
        return type(self)(self.location.child(name), **self._child_kwargs())

    def parent(self) -> "Store":
        """The directory this one is in (an incremental step's run)."""
        return type(self)(self.location.parent(), **self._child_kwargs())

    def sibling(self, name: str) -> "Store":
        """The directory ``name`` next to this one (an incremental step's ``../.shared``)."""
        return self.parent().child(name)

    def _child_kwargs(self) -> dict:
        return {}

    # -- writing
    @abstractmethod
    def makedirs(self) -> None: ...

    @abstractmethod
    def open_writer(self, name: str, size: int | None = None) -> Writer:
        """A new data file ``name``; ``size``, when known, is how many bytes will be written."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write a small file whole and durably."""

    def put_part(self, name: str, pieces: list, crc: int) -> int | None:
        """Write one whole data file of a parallel upload: the concatenation of
        ``pieces`` (buffers), whose CRC-32C is ``crc``.

        Returns the CRC-32C the backend reports for what it stored, when it
        reports one, so the read-back check can be skipped.
        """
        w = self.open_writer(name)
        try:
            for piece in pieces:
                w.write(memoryview(piece))
            w.close()
        except BaseException:
            w.abort()
            raise
        return None

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create a small file only if no file of that name exists; False if one does.

        Atomic where the backend enforces it (O_EXCL, S3 If-None-Match, GCS
        ifGenerationMatch=0); elsewhere a check before the write.
        """
        if name in (self.list() or {}):
            return False
        self.put(name, data)
        return True

    def rename(self, src: str, dst: str) -> None:
        raise StorageError(f"{self.uri}: this backend has no atomic rename", self.uri)

    def sync_dir(self) -> None:
        pass

    @abstractmethod
    def remove(self, names: list[str]) -> None: ...

    def free_bytes(self) -> int | None:
        return None

    # -- reading
    @abstractmethod
    def open_reader(self, name: str) -> Reader: ...

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def open_file(self):
        """The location itself opened as a binary file (for single-file checkpoints)."""

    @abstractmethod
    def file_size(self) -> int:
        """Size of the location itself (for single-file checkpoints)."""

    @abstractmethod
    def file_reader(self) -> Reader:
        """A Reader over the location itself (for single-file checkpoints)."""

    def map_file(self, name: str, size: int, read_ahead: bool = True):
        """A private, copy-on-write mapping of a data file as a torch UntypedStorage,
        where the backend is a local disk; None means read it instead. ``read_ahead``:
        ask the kernel to read the whole file now (not when only part of it is wanted)."""
        return None

    def prefetch(self, name: str, offset: int, nbytes: int) -> None:
        """Hint that bytes [offset, offset + nbytes) of ``name`` will be read soon (a no-op by default)."""

    def reported_crc32c(self, name: str) -> int | None:
        """The backend's own CRC-32C of a stored file, where it keeps one."""
        return None

    # -- errors
    def attempt(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried where the backend's failures can be transient."""
        return fn(*args, **kwargs)

    @contextlib.contextmanager
    def errors(self, action: str, name: str | None = None) -> Iterator[None]:
        """Turn backend exceptions into ckptstore errors naming the URI."""
        try:
            yield
        except CheckpointError as e:
            if e.uri is None:
                # Raised below the store (format checks): name the checkpoint.
                e.uri = self.uri
                e.args = (f"{self.uri}: {e}",) + e.args[1:]
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised as a typed error below
            if is_environment(e):
                raise   # the caller's or the machine's error (errors.is_environment), as it is
            if isinstance(e, Exception):
                where = self.uri + ("/" + name if name else "")
                explained = self.explain(e, action, where)
                if explained is not None:
                    raise explained from None
            raise translate(e, self.location, action, name) from None

    def explain(self, e: BaseException, action: str, where: str) -> CheckpointError | None:
        """A clearer error for a backend-specific failure (credentials, buckets), if it is one."""
        return None

    def not_found_hint(self) -> str:
        """Why nothing is at the location, when the backend can say more (a missing bucket)."""
        return ""


def translate(e: BaseException, location: Location, action: str, name: str | None = None) -> BaseException:
    """The ckptstore error for a backend exception (or ``e`` itself if not a storage fault)."""
    if not isinstance(e, Exception) or isinstance(e, CheckpointError):
        return e
    uri = location.display
    where = uri + ("/" + name if name else "")
    detail = scrub(f"{type(e).__name__}: {e}", location.secrets)
    detail = detail.replace(location.uri, uri)
    code = getattr(e, "errno", None)
    if isinstance(e, FileNotFoundError) or code == errno.ENOENT:
        return CheckpointNotFoundError(f"{action} {where}: not found", uri)
    if code in NO_SPACE:
        return InsufficientSpaceError(
            f"{action} {where}: no space left on the target ({detail}); free space or choose "
            "another location", uri)
    if isinstance(e, PermissionError) or code in _DENIED:
        return StorageError(
            f"{action} {where}: permission denied ({detail}); check that the location is writable "
            "and the credentials allow it", uri, errno=code or errno.EACCES)
    if isinstance(e, OSError):
        return StorageError(f"{action} {where}: {detail}", uri, errno=code)
    if isinstance(e, (ValueError, TypeError)) and "protocol" in str(e).lower():
        return StorageError(f"{action} {where}: bad URL: {detail}", uri)
    return StorageError(f"{action} {where}: {detail}", uri)
