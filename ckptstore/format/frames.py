"""Compressed blobs: byte-grouped zstd frames (format version 5, docs/format.md).

A compressed blob's logical bytes are cut into frames of ``frame`` bytes
(the last one shorter). Each frame is byte-grouped (byte 0 of every element,
then byte 1 of every element, ...; elements of ``group`` bytes, any tail
that is not a whole element last, as it was) and compressed as one zstd
frame (RFC 8878) that records its content size and an XXH64 checksum of its
content. The frames lie one after the other in the stream, so any frame can
be read and decompressed on its own.

This module is the codec alone: bytes in, bytes out, and the checks that a
frame is what the record says before anything is allocated for it.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np
import zstandard

from ..errors import CorruptCheckpointError

CODEC = "zstd"
FRAME = 1 << 20          # logical bytes per frame written
MIN_FRAME = 4 << 10      # what a reader accepts as a record's frame size
MAX_FRAME = 64 << 20
MAX_GROUP = 64
LEVEL = 1                # higher levels buy almost nothing on float bytes (docs/benchmarks.md)
_MIN_STORED = 9          # the smallest zstd frame: magic, header, one empty block

_local = threading.local()


class Frames(NamedTuple):
    """How a compressed blob is stored: ``logical`` bytes, grouped by ``group``, as frames of these stored sizes."""

    logical: int
    group: int
    sizes: tuple[int, ...]

    def spans(self, frame: int) -> list[tuple[int, int, int, int]]:
        """(stored offset, stored size, logical offset, logical size) of each frame."""
        out, so = [], 0
        for k, s in enumerate(self.sizes):
            lo = k * frame
            out.append((so, s, lo, min(frame, self.logical - lo)))
            so += s
        return out


def frame_count(logical: int, frame: int) -> int:
    return -(-logical // frame)


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def group_bytes(data: np.ndarray, group: int) -> np.ndarray:
    """``data`` (uint8) with byte ``j`` of every ``group``-byte element gathered, j = 0, 1, ..."""
    if group <= 1 or len(data) < group:
        return data
    e = len(data) // group
    out = np.empty(len(data), dtype=np.uint8)
    lanes = data[:e * group].reshape(e, group)
    for j in range(group):
        out[j * e:(j + 1) * e] = lanes[:, j]
    out[e * group:] = data[e * group:]
    return out


def ungroup_into(src: np.ndarray, group: int, out: np.ndarray) -> None:
    """Undo ``group_bytes``: write the elements ``src`` holds grouped into ``out`` (same length)."""
    if group <= 1 or len(out) < group:
        out[:] = src
        return
    e = len(out) // group
    lanes = out[:e * group].reshape(e, group)
    for j in range(group):
        lanes[:, j] = src[j * e:(j + 1) * e]
    out[e * group:] = src[e * group:]


def compress_frame(data: np.ndarray, group: int) -> bytes:
    """One frame: ``data`` (uint8, at most a frame of logical bytes) grouped and compressed."""
    return _compressor().compress(group_bytes(data, group))


def decompress_frame(stored, group: int, out: np.ndarray, where: str, uri: str | None = None) -> None:
    """Decompress one stored frame into ``out``, whose length is the frame's logical size.

    The frame must say it holds exactly that many bytes before anything is
    decompressed (a frame that claims 2**40 bytes is refused, never
    allocated), and its content checksum must match.
    """
    want = len(out)
    try:
        claimed = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: not a zstd frame ({e})", uri) from None
    if claimed != want:
        raise CorruptCheckpointError(
            f"{where}: a compressed frame claims {claimed} bytes where the record says {want}", uri)
    try:
        data = _decompressor().decompress(stored, max_output_size=want)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: a compressed frame does not decompress ({e})", uri) from None
    if len(data) != want:
        raise CorruptCheckpointError(f"{where}: a compressed frame gave {len(data)} bytes, not {want}", uri)
    ungroup_into(np.frombuffer(data, dtype=np.uint8), group, out)


def check_frames(frames: Frames, nbytes: int, frame: int, what: str) -> None:
    """The record's description of one compressed blob is consistent (CorruptCheckpointError if not)."""
    if frames.logical < 1 or not 1 <= frames.group <= MAX_GROUP or frame % frames.group:
        raise CorruptCheckpointError(f"{what}: bad logical size or element size")
    if len(frames.sizes) != frame_count(frames.logical, frame):
        raise CorruptCheckpointError(f"{what}: {len(frames.sizes)} frames for {frames.logical} bytes "
                                     f"in frames of {frame}")
    if any(s < _MIN_STORED for s in frames.sizes) or sum(frames.sizes) != nbytes:
        raise CorruptCheckpointError(f"{what}: frame sizes do not add up to the blob's {nbytes} stored bytes")
