"""Byte ranges of a generation's data stream: the one reader under load, verify, cp and DCP.

The data files of a generation, concatenated in the record's order, form one
stream (docs/format.md), and every read here is a range of it: a blob, a run
of small blobs gathered into one request, a whole file. A range may cross
file boundaries. Each data file is opened once, on first use, and shared by
the read threads; ``fetch`` keeps ``Store.concurrency`` reads in flight
ahead of the consumer, so the disk or the network always has requests
queued while the CPU checks what has arrived.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures as cf
import itertools
import threading
from typing import Any, Generator, Iterable, NamedTuple

import crc32c

from .errors import CorruptCheckpointError
from .format.manifest import FileEntry
from .stores.base import Reader, Store

COALESCE = 64 << 10  # ranges closer than this are read in one request, the gap with them
READ_BACK = 8 << 20  # bytes per read when checking a whole file: the page cache does the rest


class Range(NamedTuple):
    """``nbytes`` bytes at stream offset ``start``, read into ``into`` (or a fresh buffer)."""

    start: int
    nbytes: int
    into: memoryview | None = None
    tag: Any = None   # the caller's: what the bytes are for


class StreamReader:
    """Reads ranges of the data stream made of ``files``; a context manager."""

    def __init__(self, store: Store, files: list[FileEntry]):
        self.store, self.files = store, files
        self.starts = [0]
        for f in files:
            self.starts.append(self.starts[-1] + f.nbytes)
        self._readers: dict[int, Reader] = {}
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def where(self, k: int) -> str:
        return f"{self.store.uri}/{self.files[k].name}"

    def _reader(self, k: int) -> Reader:
        with self._lock:
            r = self._readers.get(k)
            if r is None:
                r = self._readers[k] = self.store.open_reader(self.files[k].name)
            return r

    def readinto(self, start: int, buf: memoryview) -> memoryview:
        """Fill ``buf`` from stream offset ``start``; a file that ends early is corrupt."""
        n, done = len(buf), 0
        k = bisect.bisect_right(self.starts, start) - 1
        while done < n:
            while k < len(self.files) and self.starts[k + 1] <= start + done:
                k += 1
            if k >= len(self.files):
                raise CorruptCheckpointError(f"{self.store.uri}: a read past the end of the data", self.store.uri)
            pos = start + done - self.starts[k]
            take = min(n - done, self.files[k].nbytes - pos)
            got = 0
            while got < take:
                r = self._reader(k).readinto(pos + got, buf[done + got:done + take])
                if r <= 0:
                    raise CorruptCheckpointError(f"{self.where(k)}: file ends early (truncated)", self.store.uri)
                got += r
            done += take
        return buf

    def advise(self, start: int, nbytes: int) -> None:
        """Tell the store that stream bytes [start, start + nbytes) will be read soon."""
        end = start + nbytes
        for k, f in enumerate(self.files):
            lo, hi = max(start, self.starts[k]), min(end, self.starts[k + 1])
            if lo < hi:
                self.store.prefetch(f.name, lo - self.starts[k], hi - lo)

    def _read(self, r: Range) -> memoryview:
        buf = r.into if r.into is not None else memoryview(bytearray(r.nbytes))
        return self.readinto(r.start, buf)

    def fetch(self, ranges: Iterable[Range], concurrency: int | None = None
              ) -> Generator[tuple[Range, memoryview], None, None]:
        """Each range with its bytes, in the order given, ``concurrency`` reads ahead.

        ``ranges`` is consumed lazily: at most ``concurrency`` ranges are taken
        from it beyond the one last yielded (whose buffer the caller may reuse
        once it asks for the next)."""
        depth = max(1, concurrency or self.store.concurrency)
        todo = iter(ranges)
        first, second = next(todo, None), next(todo, None)
        if second is None:
            if first is not None:   # nothing to read ahead of: no thread
                yield first, self._read(first)
            return
        todo = itertools.chain((first, second), todo)
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max(2, self.store.concurrency), thread_name_prefix="ckptstore-read")
        pending: collections.deque = collections.deque()
        try:
            while True:
                while len(pending) < depth:
                    r = next(todo, None)
                    if r is None:
                        break
                    pending.append((r, self._pool.submit(self._read, r)))
                if not pending:
                    return
                r, fut = pending.popleft()
                yield r, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
            for _, fut in pending:
                if not fut.cancelled():
                    fut.exception()  # wait, so no read lands in memory the caller no longer owns

    def check_ends(self) -> None:
        """Nothing follows the last byte the record vouches for, in any file (where files can grow)."""
        if self.store.immutable_files:
            return
        for k, f in enumerate(self.files):
            if self._reader(k).readinto(f.nbytes, memoryview(bytearray(1))) != 0:
                raise CorruptCheckpointError(f"{self.where(k)}: longer than the commit record says", self.store.uri)

    def file_crc(self, k: int) -> int:
        """CRC-32C of data file ``k`` as stored: the backend's own figure, or by reading it back."""
        reported = self.store.reported_crc32c(self.files[k].name)
        if reported is not None:
            return reported
        size, start = self.files[k].nbytes, self.starts[k]
        step = min(READ_BACK, max(size, 1))
        chunks = (Range(start + o, min(step, size - o)) for o in range(0, size, step))
        crc = 0
        for _, data in self.fetch(chunks, concurrency=2):
            crc = crc32c.crc32c(data, crc)
        if self._reader(k).readinto(size, memoryview(bytearray(1))) != 0:
            raise CorruptCheckpointError(
                f"{self.where(k)}: more bytes stored than the {size} written", self.store.uri)
        return crc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def stored_crc32c(store: Store, entry: FileEntry) -> int:
    """CRC-32C of one stored data file (the writer's check before the commit, and deep verify)."""
    with StreamReader(store, [entry]) as r:
        return r.file_crc(0)


# ---------------------------------------------------------------- CRC-32C of concatenations

_POLY = 0x82F63B78      # CRC-32C (Castagnoli), bit-reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32C polynomial, both bit-reflected."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    out, p = [], 1 << 30            # x^1
    for _ in range(32):
        out.append(p)
        p = _multmodp(p, p)
    return out


_X2N = _x2n_table()                 # x^(2^k) modulo the polynomial


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32C of A + B from crc1 = CRC-32C(A), crc2 = CRC-32C(B) and len2 = len(B), without
    reading either (crc1 is multiplied by x^(8 len2) modulo the polynomial)."""
    p, n, k = 1 << 31, len2, 3      # x^0; then x^(len2 * 2^3)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2
