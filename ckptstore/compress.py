"""Compression of a save's blobs, and decompression of what a read fetched.

``compress_blobs`` turns the blobs a save would store raw into blobs stored
as byte-grouped zstd frames (``format.frames``), where that is asked for and
pays; ``expand_values`` turns the stored bytes a read fetched back into the
blobs' own bytes. Frames are compressed and decompressed on all cores: zstd
and numpy's copies release the GIL.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any, Iterable

import crc32c
import numpy as np
import torch
import xxhash

from .datafiles import blob_chunks
from .errors import CorruptCheckpointError
from .format.dtypes import dtype_from_name
from .format.frames import FRAME, Frames, compress_frame, decompress_frame
from .format.manifest import NDARRAY, STORAGE, BlobTable
from .format.tree import Blob
from .hostmem import host_bytes

COMPRESSIONS = (None, "zstd", "auto")
MIN_BLOB = 64 << 10     # smaller blobs are stored raw: a frame's overhead and a record entry would eat the gain
AUTO_RATIO = 0.9        # "auto" keeps a blob raw unless its first frame shrinks to this share or less


def check_compression(compression: Any) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be None, 'zstd' or 'auto', not {compression!r}")


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
    """
    check_compression(compression)
    want = compression == "zstd" or (compression == "auto" and pays)
    if groups is None:
        groups = element_sizes(nodes, blobs) if want else []
    out, hashes = list(blobs), []
    skipped = set(skip)
    with cf.ThreadPoolExecutor(_workers()) if want else _NoPool() as pool:
        for i, b in enumerate(blobs):
            if i in skipped:
                hashes.append(b"" if digests is None else digests[i])
            elif want and b.kind in (STORAGE, NDARRAY) and b.nbytes >= MIN_BLOB:
                stored, digest = _compress(b, groups[i], compression == "auto", pool)
                if stored is not None:
                    out[i] = stored
                hashes.append(digest if digests is None else digests[i])
            else:
                hashes.append(blob_digest(b) if digests is None else digests[i])
    return out, hashes


class _NoPool:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _compress(b: Blob, group: int, auto: bool, pool) -> tuple[Blob | None, bytes]:
    """(the blob stored compressed, or None when ``auto`` finds it does not pay; its xxh3-128)."""
    copy = b.device != "cpu"    # device memory comes through one staging buffer, reused
    pieces = [np.array(p) if copy else np.frombuffer(p, dtype=np.uint8) for p in blob_chunks(b, FRAME)]
    h = xxhash.xxh3_128()
    futures = [pool.submit(compress_frame, pieces[0], group)]
    if auto:
        first = futures[0].result()
        if len(first) > AUTO_RATIO * len(pieces[0]):
            for p in pieces:
                h.update(p)
            return None, h.digest()
    futures += [pool.submit(compress_frame, p, group) for p in pieces[1:]]
    for p in pieces:
        h.update(p)
    frames = [f.result() for f in futures]
    sizes = [len(f) for f in frames]
    stored = np.empty(sum(sizes), dtype=np.uint8)
    o = 0
    for f in frames:
        stored[o:o + len(f)] = np.frombuffer(f, dtype=np.uint8)
        o += len(f)
    return Blob(b.kind, len(stored), stored, b.device, Frames(b.nbytes, group, tuple(sizes))), h.digest()


# ---------------------------------------------------------------- reading

def _flat(value: Any) -> np.ndarray:
    if isinstance(value, torch.UntypedStorage):
        return host_bytes(torch.empty(0, dtype=torch.uint8).set_(value))
    if isinstance(value, np.ndarray):
        return value.reshape(-1).view(np.uint8)
    return np.frombuffer(value, dtype=np.uint8)


def decompress_into(jobs: Iterable[tuple[Any, Frames, np.ndarray, str]], frame: int, uri: str | None,
                    pool=None) -> None:
    """Decompress each (stored bytes, frames, out, where) into ``out`` (its logical size), all
    frames of all jobs on all cores."""
    tasks = []
    for stored, frames, out, where in jobs:
        src = _flat(stored)
        if len(out) != frames.logical:
            raise CorruptCheckpointError(f"{where}: {len(out)} bytes to fill where the record says "
                                         f"{frames.logical}", uri)
        for so, sn, lo, ln in frames.spans(frame):
            tasks.append((src[so:so + sn], frames.group, out[lo:lo + ln], where))
    if not tasks:
        return

    def run(t) -> None:
        decompress_frame(t[0], t[1], t[2], t[3], uri)

    if len(tasks) == 1:
        run(tasks[0])
        return
    if pool is not None:
        list(pool.map(run, tasks))
        return
    with cf.ThreadPoolExecutor(_workers()) as own:
        list(own.map(run, tasks))


def expand_values(t: BlobTable, values: list, where: str, uri: str | None, verify: bool = True,
                  into: dict[int, np.ndarray] | None = None) -> None:
    """Replace the stored bytes ``values`` holds for each compressed blob (read, not None) by its
    own bytes: an ``UntypedStorage`` for a storage blob, a uint8 array for an array blob.
    A blob in ``into`` is decompressed into that memory (an ``into=`` tensor's bytes) instead,
    and its value becomes None: the tensor is the value.

    With ``verify`` each compressed blob's stored CRC-32C is checked first, so a damaged frame is
    reported as the blob's checksum mismatch before it reaches the decompressor.
    """
    if not t.codec:
        return
    jobs = []
    for i, frames in t.codec.items():
        v = values[i]
        if v is None:
            continue
        if verify and crc32c.crc32c(_flat(v)) != int(t.crcs[i]):
            raise CorruptCheckpointError(f"{where}: CRC-32C mismatch in compressed blob {i} "
                                         f"({int(t.sizes[i])} bytes at stream byte {int(t.starts[i])}); "
                                         "the checkpoint is corrupt", uri)
        if into and i in into:
            new, out = None, into[i]
        elif t.kind(i) == STORAGE:
            new: Any = torch.UntypedStorage(frames.logical)
            out = host_bytes(torch.empty(0, dtype=torch.uint8).set_(new))
        else:
            new = out = np.empty(frames.logical, dtype=np.uint8)
        jobs.append((v, frames, out, f"{where}: blob {i}"))
        values[i] = new
    decompress_into(jobs, t.frame, uri)


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
                self.h.update(data)
        except CorruptCheckpointError as e:
            self.error = str(e)

    def digest(self) -> bytes:
        return self.h.digest()

    def hexdigest(self) -> str:
        return self.h.hexdigest()
