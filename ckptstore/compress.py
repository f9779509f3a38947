"""Compression of a save's blobs, and decompression of what a read fetched.

``compress_blobs`` turns the blobs a save would store raw into blobs stored
as byte-grouped zstd frames (``format.frames``), where that is asked for and
pays; ``read_compressed`` reads such blobs and decompresses them into the
memory their values go to; ``FrameStream`` and ``FrameHasher`` do it for a
stream of stored bytes (export, deep verify). Frames are compressed and
decompressed on all cores: zstd and numpy's copies release the GIL.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import threading
from typing import Any, Iterable, Iterator

import crc32c
import numpy as np
import xxhash

from .datafiles import blob_chunks
from .errors import CheckpointError, CorruptCheckpointError
from .format.dtypes import dtype_from_name
from .format.frames import FRAME, Frames, compress_frame, decompress_frame
from .format.manifest import NDARRAY, STORAGE, BlobTable
from .format.tree import Blob
from .ranges import COALESCE, Range

COMPRESSIONS = (None, "zstd", "auto")
MIN_BLOB = 64 << 10     # smaller blobs are stored raw: a frame's overhead and a record entry would eat the gain
AUTO_RATIO = 0.9        # "auto" keeps a blob raw unless its first frame shrinks to this share or less


def check_compression(compression: Any) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be None, 'zstd' or 'auto', not {compression!r}")


def compresses(compression: str | None, pays: bool) -> bool:
    """Whether a save with ``compression`` to a store where compression ``pays`` compresses anything
    (if not, it is an ordinary save: nothing is hashed or read twice)."""
    return compression == "zstd" or (compression == "auto" and pays)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def element_sizes(nodes: list, blobs: list[Blob]) -> list[int]:
    """The element size each blob's bytes are grouped by: its tensor's dtype or array's itemsize."""
    out = [1] * len(blobs)
    seen: set[int] = set()
    for node in nodes:
        if type(node) is list and len(node) >= 3 and node[0] == "tensor" and type(node[1]) is int \
                and node[1] not in seen and 0 <= node[1] < len(blobs):
            seen.add(node[1])
            try:
                out[node[1]] = dtype_from_name(node[2]).itemsize
            except (ValueError, TypeError, KeyError):
                pass
    for i, b in enumerate(blobs):
        if b.kind == NDARRAY and isinstance(b.source, np.ndarray):
            out[i] = b.source.dtype.itemsize
    return out


def blob_digest(blob: Blob) -> bytes:
    """xxh3-128 of a blob's bytes, big-endian (XXH3_128bits, seed 0)."""
    h = xxhash.xxh3_128()
    for piece in blob_chunks(blob):
        h.update(piece)
    return h.digest()


def compress_blobs(blobs: list[Blob], nodes: list, compression: str | None, pays: bool,
                   digests: list[bytes] | None = None, skip: Iterable[int] = (),
                   groups: list[int] | None = None) -> tuple[list[Blob], list[bytes]]:
    """(the blobs to store, each blob's xxh3-128 of its own bytes).

    ``compression``: None (every blob raw), "zstd" (every storage or array
    blob of ``MIN_BLOB`` bytes or more compressed) or "auto" (those, where
    ``pays`` (the store is slower than the compressor) and the blob's first
    frame shrinks to ``AUTO_RATIO`` or less). ``digests``: the blobs' hashes
    when already known. Blobs in ``skip`` are left as they are. ``groups``: each blob's
    element size, when ``nodes`` does not describe ``blobs`` (a rank's share of its part).

    Memory stays bounded: compressed bytes are kept for the writer up to ``HOLD`` bytes
    in all; a blob past that is compressed once here to learn its frames' sizes (the
    record's layout needs them before the data is written) and again as it is written.
    """
    check_compression(compression)
    want = compresses(compression, pays)
    if groups is None:
        groups = element_sizes(nodes, blobs) if want else []
    out, hashes = list(blobs), []
    skipped = set(skip)
    held = 0
    with cf.ThreadPoolExecutor(_workers()) if want else contextlib.nullcontext() as pool:
        for i, b in enumerate(blobs):
            if i in skipped:
                hashes.append(b"" if digests is None else digests[i])
            elif want and b.kind in (STORAGE, NDARRAY) and b.nbytes >= MIN_BLOB:
                keep = held + _bound(b.nbytes) <= HOLD
                stored, digest = _compress(b, groups[i], compression == "auto", pool, keep, digests is None)
                if stored is not None:
                    out[i] = stored
                    held += stored.nbytes if keep else 0
                hashes.append(digest if digests is None else digests[i])
            else:
                hashes.append(blob_digest(b) if digests is None else digests[i])
    return out, hashes


HOLD = 64 << 20         # compressed bytes a save keeps for its writer; blobs past it are compressed again


def _bound(n: int) -> int:
    """An upper bound of the stored size of ``n`` bytes in frames (incompressible bytes grow a little)."""
    return n + (n // FRAME + 1) * 64


def _pieces(b: Blob) -> Iterator[np.ndarray]:
    """The blob's bytes a frame at a time, each piece its own memory where the source's is reused."""
    copy = b.device != "cpu"    # device memory comes through one staging buffer, reused
    for p in blob_chunks(b, FRAME):
        yield np.array(p) if copy else np.frombuffer(p, dtype=np.uint8)


def _frames(pieces: Iterator[np.ndarray], group: int, pool, first: tuple | None = None
            ) -> Iterator[tuple[np.ndarray, bytes]]:
    """(piece, its frame) in order, compressed on ``pool`` a few frames ahead (bounded memory)."""
    if first is not None:
        yield first
    window = 2 * _workers()
    pending: collections.deque = collections.deque()
    for piece in pieces:
        pending.append((piece, pool.submit(compress_frame, piece, group)))
        if len(pending) >= window:
            p, f = pending.popleft()
            yield p, f.result()
    while pending:
        p, f = pending.popleft()
        yield p, f.result()


def _compress(b: Blob, group: int, auto: bool, pool, keep: bool, digest: bool) -> tuple[Blob | None, bytes]:
    """(the blob stored compressed, or None when ``auto`` finds it does not pay; its xxh3-128,
    taken on the way when ``digest``, else b"").

    ``keep``: the compressed bytes are kept for the writer; else only their sizes, and the
    writer compresses the blob again (``Recompress``).
    """
    h = xxhash.xxh3_128() if digest else None
    pieces = _pieces(b)
    head = next(pieces)
    frame = compress_frame(head, group)
    if auto and len(frame) > AUTO_RATIO * len(head):
        if h is None:
            return None, b""
        h.update(head.data)
        for p in pieces:
            h.update(p.data)
        return None, h.digest()
    sizes: list[int] = []
    kept: list[bytes] = []
    for piece, frame in _frames(pieces, group, pool, (head, frame)):
        if h is not None:
            h.update(piece.data)
        sizes.append(len(frame))
        if keep:
            kept.append(frame)
    frames = Frames(b.nbytes, group, tuple(sizes))
    done = b"" if h is None else h.digest()
    if not keep:
        return Blob(b.kind, sum(sizes), Recompress(b, frames), b.device, frames), done
    stored = np.empty(sum(sizes), dtype=np.uint8)
    o = 0
    for f in kept:
        stored[o:o + len(f)] = np.frombuffer(f, dtype=np.uint8)
        o += len(f)
    return Blob(b.kind, len(stored), stored, b.device, frames), done


class Recompress:
    """The stored bytes of a blob compressed as ``frames`` says, made again as they are written
    (``datafiles.blob_chunks`` asks ``stored_chunks``). The sizes must come out the same: a
    tensor that changed while it was being saved is refused, never stored inconsistently."""

    def __init__(self, blob: Blob, frames: Frames):
        self.blob, self.frames = blob, frames

    def stored_chunks(self) -> Iterator[memoryview]:
        with cf.ThreadPoolExecutor(_workers()) as pool:
            for k, (_, frame) in enumerate(_frames(_pieces(self.blob), self.frames.group, pool)):
                if k >= len(self.frames.sizes) or len(frame) != self.frames.sizes[k]:
                    raise CheckpointError("a tensor changed while it was being saved (its compressed size "
                                          "differs between two passes); save it again when nothing writes to it")
                yield memoryview(frame)


# ---------------------------------------------------------------- reading

class FrameStream:
    """A compressed blob's stored bytes fed in pieces of any size, its own bytes out a frame
    at a time: ``feed`` returns the frames completed by a piece, decompressed (fresh arrays)."""

    def __init__(self, frames: Frames, frame: int, where: str, uri: str | None = None):
        self.spans = frames.spans(frame)
        self.group, self.where, self.uri = frames.group, where, uri
        self.k = 0
        self.buf = bytearray()

    def feed(self, piece) -> list[np.ndarray]:
        self.buf += piece
        out = []
        while self.k < len(self.spans) and len(self.buf) >= self.spans[self.k][1]:
            _, sn, _, ln = self.spans[self.k]
            stored = bytes(self.buf[:sn])
            del self.buf[:sn]
            data = np.empty(ln, dtype=np.uint8)
            decompress_frame(stored, self.group, data, self.where, self.uri)
            out.append(data)
            self.k += 1
        return out


class FrameHasher:
    """xxh3-128 of a compressed blob's own bytes, fed its stored bytes in pieces of any size
    (``error`` says why a frame failed to decompress)."""

    def __init__(self, frames: Frames, frame: int, where: str):
        self.stream = FrameStream(frames, frame, where)
        self.h = xxhash.xxh3_128()
        self.error: str | None = None

    def update(self, piece) -> None:
        if self.error is not None:
            return
        try:
            for data in self.stream.feed(piece):
                self.h.update(data.data)
        except CorruptCheckpointError as e:
            self.error = str(e)

    def digest(self) -> bytes:
        return self.h.digest()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def read_compressed(reader, t: BlobTable, blobs: list[int], outs: dict[int, np.ndarray], verify: bool,
                    where: str, uri: str | None, read_bytes: int) -> None:
    """Read ``blobs`` through ``reader`` (a ``ranges.StreamReader``) into ``outs[blob]`` (each
    blob's own size): compressed ones decompressed, frames on all cores while later ones are
    read; raw ones (non-empty, when given) copied, in pieces of at most a frame.

    Each read is a run of whole frames and pieces, of one blob or of neighbouring ones (less
    than ``COALESCE`` apart), up to ``read_bytes`` (one frame at least): an object store gets a few
    large requests, not one per blob. Memory stays bounded whatever the sizes: a few reads in
    flight, each dropped once its frames are decompressed; a blob's stored bytes are never whole
    in memory. Each blob's stored CRC-32C is checked once its last piece is in (with
    ``verify``), and every frame for its declared size and content checksum.
    """
    codec = t.codec or {}
    order = sorted(blobs, key=lambda b: int(t.starts[b]))

    def spans(b: int) -> list[tuple[int, int, int, int]]:
        f = codec.get(b)
        if f is not None:
            return f.spans(t.frame)
        n = int(t.sizes[b])       # raw: pieces of a frame's size, stored as they are
        return [(o, min(FRAME, n - o), o, min(FRAME, n - o)) for o in range(0, n, FRAME)]

    # every piece to read, in stream order: (stream offset, stored size, blob, span, last of its blob)
    frames = [(int(t.starts[b]) + sp[0], sp[1], b, sp, k == len(each) - 1)
              for b in order for each in [spans(b)] for k, sp in enumerate(each)]

    def ranges():
        k = 0
        while k < len(frames):
            start = frames[k][0]
            j = k + 1
            while j < len(frames) and frames[j][0] - (frames[j - 1][0] + frames[j - 1][1]) < COALESCE \
                    and frames[j][0] + frames[j][1] - start <= read_bytes:
                j += 1
            end = frames[j - 1][0] + frames[j - 1][1]
            yield Range(start, end - start, None, frames[k:j])
            k = j

    workers = _workers()
    gate = threading.BoundedSemaphore(workers + 1)      # reads whose frames are still being decompressed
    failures: list[BaseException] = []

    def inflate(data: memoryview, base: int, run: list) -> None:
        try:
            for at, sn, b, (_, _, lo, ln), _ in run:
                out = outs[b]
                f = codec.get(b)
                if f is None:
                    out[lo:lo + ln] = np.frombuffer(data, np.uint8, sn, at - base)
                else:
                    decompress_frame(data[at - base:at - base + sn], f.group, out[lo:lo + ln],
                                     f"{where}: blob {b}", uri)
        except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread
            failures.append(e)
        finally:
            gate.release()

    crcs: dict[int, int] = {}
    with cf.ThreadPoolExecutor(workers) as pool:        # leaving it waits for every inflate
        for r, data in reader.fetch(ranges()):
            if failures:
                break
            if verify:
                for at, sn, b, _, last in r.tag:
                    crc = crc32c.crc32c(data[at - r.start:at - r.start + sn], crcs.get(b, 0))
                    crcs[b] = crc
                    if last and crc != int(t.crcs[b]):
                        raise CorruptCheckpointError(
                            f"{where}: CRC-32C mismatch in {'compressed ' if b in codec else ''}blob {b} "
                            f"({int(t.sizes[b])} bytes at stream byte {int(t.starts[b])}); "
                            "the checkpoint is corrupt", uri)
            gate.acquire()
            pool.submit(inflate, data, r.start, r.tag)
    if failures:
        raise failures[0]
