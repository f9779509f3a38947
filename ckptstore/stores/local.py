"""Local POSIX directories, through os calls.

fsspec's local filesystem would work, but durability needs what it does not
expose: fsync of each file, fsync of the directory after a rename or a
create, and large unbuffered writes straight from tensor memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import crc32c

from .base import NO_SPACE, Entry, Reader, Store, Writer
from .mounts import is_remote_mount

# Start writeback to disk while later chunks are still being produced, so the
# final fsync has little left to do (the kernel would otherwise wait for
# dirty_background_ratio of RAM before writing anything). With Linux's
# sync_file_range each WRITEBACK_EVERY bytes are handed to the disk as soon as
# they are written, without waiting; elsewhere a helper thread runs fdatasync
# every _FLUSH_EVERY bytes.
WRITEBACK_EVERY = 8 << 20
_FLUSH_EVERY = 256 << 20
_READ_BACK = 256 << 10      # read-back buffer: small enough to stay in the CPU's cache


def _libc_call(name: str, *argtypes):
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = list(argtypes), ctypes.c_int
    return f


_sync_file_range = _libc_call("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_fallocate = _libc_call("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_SYNC_FILE_RANGE_WRITE = 2
_FALLOC_FL_KEEP_SIZE = 1


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalWriter(Writer):
    """A new file written front to back. On a local disk (not a FUSE or network mount) its
    blocks are reserved up front when the size is known, writeback starts as it is written,
    and ``stored_crc`` reads back what the kernel holds while later bytes are still written."""

    def __init__(self, store: "LocalStore", name: str, size: int | None = None):
        self.store, self.name = store, name
        self.path = os.path.join(store.location.path, name)
        with store.errors("create", name):
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.reads_back = not store.remote_mount
        self._pos = 0          # bytes written: the file is written front to back
        self._started = 0      # bytes whose writeback has been started
        self._rfd = -1
        self._buf: memoryview | None = None
        self._unflushed = 0
        self._flusher: threading.Thread | None = None
        self._flush_error: BaseException | None = None
        if size and _fallocate is not None and not store.remote_mount:
            self._reserve(size)

    def _reserve(self, size: int) -> None:
        """Allocate the file's blocks in one go (the size seen by readers grows as bytes are
        written); a full disk fails here, before any byte is written."""
        if _fallocate(self.fd, _FALLOC_FL_KEEP_SIZE, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err in NO_SPACE:
            self.abort()
            with self.store.errors("write", self.name):
                raise OSError(err, os.strerror(err), self.path)
        # not supported by this filesystem: blocks are allocated as the bytes arrive

    def write(self, data: memoryview) -> None:
        with self.store.errors("write", self.name):
            view = memoryview(data).cast("B")
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self._pos += n
            if self.store.remote_mount:
                return
            if _sync_file_range is not None:
                if self._pos - self._started >= WRITEBACK_EVERY:
                    # Asynchronous: queues the range for the disk and returns.
                    _sync_file_range(self.fd, self._started, self._pos - self._started, _SYNC_FILE_RANGE_WRITE)
                    self._started = self._pos
                return
            self._unflushed += len(data)
            if self._unflushed >= _FLUSH_EVERY:
                self._unflushed = 0
                self._start_flush()

    def stored_crc(self, offset: int, nbytes: int, crc: int) -> int:
        if offset + nbytes > self._pos:
            raise ValueError(f"read back of bytes not written yet ({offset + nbytes} > {self._pos})")
        with self.store.errors("read back", self.name):
            if self._rfd < 0:
                self._rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                self._buf = memoryview(bytearray(_READ_BACK))
            buf, end = self._buf, offset + nbytes
            while offset < end:
                got = os.preadv(self._rfd, [buf[:min(len(buf), end - offset)]], offset)
                if got <= 0:
                    break        # shorter than written: the CRC the caller compares differs
                crc = crc32c.crc32c(buf[:got], crc)
                offset += got
        return crc

    def _start_flush(self) -> None:
        if self._flusher is not None and self._flusher.is_alive():
            return

        def flush():
            try:
                os.fdatasync(self.fd)
            except BaseException as e:  # noqa: BLE001 - reported by close()
                self._flush_error = e

        self._flusher = threading.Thread(target=flush, name="ckptstore-fdatasync", daemon=True)
        self._flusher.start()

    def _join(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        if self._flush_error is not None:
            e, self._flush_error = self._flush_error, None
            raise e

    def _close_read_back(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
        self._buf = None

    def close(self) -> None:
        with self.store.errors("write", self.name):
            try:
                self._join()
                size = os.fstat(self.fd).st_size if self.reads_back else self._pos
                if size != self._pos:
                    # another process wrote to it: what is there is not what was written
                    raise OSError(errno.EIO, f"holds {size} bytes, {self._pos} written", self.path)
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
                self._close_read_back()

    def abort(self) -> None:
        try:
            self._join()
        except BaseException:  # noqa: BLE001 - the file is being thrown away
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_read_back()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _LocalReader(Reader):
    def __init__(self, store: "LocalStore", name: str | None):
        self.store, self.name = store, name
        path = os.path.join(store.location.path, name) if name else store.location.path
        with store.errors("open", name):
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def readinto(self, offset: int, buf: memoryview) -> int:
        total = 0
        view = memoryview(buf).cast("B")
        with self.store.errors("read", self.name):
            while view:
                n = os.preadv(self.fd, [view], offset + total)
                if n == 0:
                    break
                total += n
                view = view[n:]
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalStore(Store):
    #: a FUSE or network mount cuts the data into files of this size: a check reads back
    #: through a fresh open (the only read that reaches the mount's daemon rather than
    #: the kernel's cache), and file k is read back while file k + 1 is written
    MOUNT_PART = 64 << 20
    parallel_parts = False
    stream_reads = True

    def __init__(self, location):
        super().__init__(location)
        #: a FUSE or network mount: its rename is neither atomic nor ordered
        #: with the data reaching the remote, so such paths commit by marker
        self.remote_mount = is_remote_mount(location.path)
        self.atomic_rename = not self.remote_mount
        self.keep_previous = self.remote_mount
        self.compression_pays = self.remote_mount
        if self.remote_mount and location.part_size is None:
            self.part_bytes = self.MOUNT_PART

    @property
    def path(self) -> str:
        return self.location.path

    def list(self):
        with self.errors("list"):
            try:
                it = os.scandir(self.path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            out = {}
            with it:
                for e in it:
                    try:
                        if e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            out[e.name] = Entry(e.name, st.st_size, st.st_mtime)
                    except FileNotFoundError:
                        # Renamed or removed by another writer between readdir and
                        # stat (a commit's .tmp, a discarded save): not there now.
                        continue
            return out

    def is_file(self) -> bool:
        return os.path.isfile(self.path)

    def subdirs(self) -> list[str]:
        with self.errors("list"):
            try:
                with os.scandir(self.path) as it:
                    return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                return []

    def remove_dir(self) -> None:
        try:
            os.rmdir(self.path)
            fsync_dir(os.path.dirname(self.path))
        except OSError:
            pass  # not empty (another writer's files), or already gone

    def makedirs(self) -> None:
        with self.errors("create directory"):
            missing = []
            p = self.path
            while not os.path.isdir(p):
                missing.append(p)
                parent = os.path.dirname(p)
                if parent == p:
                    break
                p = parent
            os.makedirs(self.path, exist_ok=True)
            # A new directory entry is durable only once its parent is synced.
            for d in reversed(missing):
                fsync_dir(os.path.dirname(d))

    def open_writer(self, name: str, size: int | None = None) -> Writer:
        return _LocalWriter(self, name, size)

    def put(self, name: str, data: bytes) -> None:
        w = _LocalWriter(self, name)
        try:
            w.write(memoryview(data))
            w.close()
        except BaseException:
            w.abort()
            raise

    def create_exclusive(self, name: str, data: bytes) -> bool:
        with self.errors("create", name):
            try:
                fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                return False
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.path)
        return True

    def rename(self, src: str, dst: str) -> None:
        with self.errors("rename", src):
            os.rename(os.path.join(self.path, src), os.path.join(self.path, dst))

    def sync_dir(self) -> None:
        with self.errors("sync directory"):
            fsync_dir(self.path)

    def remove(self, names: list[str]) -> None:
        with self.errors("remove"):
            for n in names:
                try:
                    os.unlink(os.path.join(self.path, n))
                except FileNotFoundError:
                    pass

    def free_bytes(self) -> int | None:
        p = self.path
        while not os.path.exists(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
        try:
            st = os.statvfs(p)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def open_reader(self, name: str) -> Reader:
        return _LocalReader(self, name)

    def prefetch(self, name: str, offset: int, nbytes: int) -> None:
        # The kernel starts reading now, at the disk's pace, while the caller copies.
        try:
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return      # the read that follows reports it
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def map_file(self, name: str, size: int, read_ahead: bool = True):
        # Not on FUSE or network mounts: a mapping there faults over the
        # network, and a remote truncation would be a SIGBUS, not an error.
        if self.remote_mount or size == 0:
            return None
        import torch
        path = os.path.join(self.path, name)
        with self.errors("map", name):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size != size:
                    return None  # the size check will report it
                # Ask the kernel to start reading the whole file now, so the
                # disk works while the checksum walks the pages.
                if read_ahead:
                    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
                else:
                    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_RANDOM)
            finally:
                os.close(fd)
            return torch.UntypedStorage.from_file(path, shared=False, nbytes=size)

    def get(self, name: str) -> bytes:
        with self.errors("read", name):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()

    def open_file(self):
        with self.errors("open"):
            return open(self.path, "rb")

    def file_reader(self) -> Reader:
        return _LocalReader(self, None)

    def file_size(self) -> int:
        with self.errors("stat"):
            return os.path.getsize(self.path)
