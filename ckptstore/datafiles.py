"""Writing a generation's data files: blobs laid out as one stream, cut into files, checksummed, checked.

Tensor bytes go from tensor memory to storage in chunks of a few tens of
MiB (CUDA storages through one pinned staging buffer), so a save never holds
a second copy of the state. Blobs smaller than ``SMALL`` are gathered into
batch buffers of ``BATCH`` bytes first, with their CRCs computed as they are
copied: 10**5 tiny tensors cost a few hundred writes, not 10**5 writes and
10**5 checksum round trips. Large blobs are written straight from their
memory, the CRC of each piece computed in a helper thread while the piece is
written.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import crc32c
import numpy as np
import torch

from .errors import CheckpointError, CorruptCheckpointError
from .format.manifest import (
    ALIGN, KIND_CODES, NDARRAY, STORAGE, BlobTable, FileEntry, aligned_starts, crc_hex, device_column,
)
from .format.tree import Blob
from .hostmem import host_bytes
from .ranges import stored_crc32c
from .stores.base import CHUNK, Store

SMALL = 1 << 20   # blobs below this size are batched
BATCH = 1 << 20   # bytes per batch buffer
_ZEROS = bytes(ALIGN)


@dataclass
class Plan:
    """Where every blob goes: one stream of aligned blobs, cut into data files."""

    blobs: list[Blob]
    starts: list[int]     # each blob's offset in the data stream
    sizes: list[int]      # data file sizes, in order; together they are the stream

    @property
    def total(self) -> int:
        return sum(self.sizes)


def plan(blobs: list[Blob], part_bytes: int | None, pad_end: bool = False, breaks: Iterable[int] = ()) -> Plan:
    """Lay blobs out at aligned offsets in one stream, then cut it into files.

    With ``part_bytes`` the stream is cut into files of exactly that size (the
    last one shorter), written in parallel where the store can; a blob may
    continue from one file into the next. Without, the stream is one file.
    ``pad_end`` pads the stream with zeros to a multiple of the alignment, so
    that another stream can follow it (one per rank in a distributed save).
    ``breaks``: blobs that begin a new file (so that the bytes before and after
    them never share one); each such file is cut by ``part_bytes`` on its own.
    """
    starts = aligned_starts([b.nbytes for b in blobs]).tolist()
    end = starts[-1] + blobs[-1].nbytes if blobs else 0
    total = -(-end // ALIGN) * ALIGN if pad_end else end
    edges = [0] + sorted({starts[k] for k in breaks if 0 < starts[k] < total}) + [total]
    sizes: list[int] = []
    for a, b in zip(edges, edges[1:]):
        n = b - a
        if part_bytes and n > part_bytes:
            sizes += [part_bytes] * (n // part_bytes) + ([n % part_bytes] if n % part_bytes else [])
        else:
            sizes.append(n)
    return Plan(blobs, starts, sizes)


def blob_table(blobs: list[Blob], crcs: list[int], hashes: list[bytes] | None = None) -> BlobTable:
    """The record's table of blobs written by one plan (in stream order).

    With ``hashes`` (each blob's xxh3-128 of its own bytes) the table carries them, and the
    frames of the blobs stored compressed.
    """
    devices, index = device_column([b.device for b in blobs])
    t = BlobTable.sequential([b.nbytes for b in blobs], crcs, "".join(KIND_CODES[b.kind] for b in blobs),
                             devices, index)
    if hashes is not None:
        t.hashes = b"".join(hashes)
        t.codec = {i: b.frames for i, b in enumerate(blobs) if b.frames is not None} or None
    return t


def blob_chunks(blob: Blob, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The blob's bytes as memoryviews of at most ``chunk`` bytes, without copying CPU data.

    A storage blob's source is an ``UntypedStorage`` or a tensor whose
    elements, in row-major order, are the blob (a shard written by a
    distributed save). A non-contiguous tensor is compacted here, when its
    turn comes, so one such copy at a time exists while files are written.
    """
    if blob.nbytes == 0:
        return
    remake = getattr(blob.source, "stored_chunks", None)
    if remake is not None:
        # Bytes made as they are written: compressed again (past what a save keeps), or copied
        # from another checkpoint (thinning).
        yield from remake()
        return
    if isinstance(blob.source, np.ndarray) and blob.kind != NDARRAY:
        # Bytes already in host memory as they are to be stored (a compressed blob, a copied one).
        flat = blob.source.reshape(-1).view(np.uint8)
        for o in range(0, blob.nbytes, chunk):
            yield memoryview(flat[o:o + chunk])
        return
    if blob.kind == STORAGE:
        storage = blob.source
        if isinstance(storage, torch.Tensor):
            u8 = storage.detach().contiguous().reshape(-1).view(torch.uint8)
        else:
            u8 = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        if storage.device.type == "cpu":
            flat = host_bytes(u8)
            for o in range(0, blob.nbytes, chunk):
                yield memoryview(flat[o:o + chunk])
            return
        # Device memory: stage through one pinned host buffer, reused.
        size = min(chunk, blob.nbytes)
        pin = torch.cuda.is_available() and storage.device.type == "cuda"
        stage = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        stage_np = stage.numpy()
        for o in range(0, blob.nbytes, chunk):
            m = min(chunk, blob.nbytes - o)
            stage[:m].copy_(u8[o:o + m])
            yield memoryview(stage_np[:m])
        return
    if blob.kind == NDARRAY:
        a = blob.source
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)  # one array at a time, never the whole state
        flat = a.reshape(-1).view(np.uint8)
        for o in range(0, blob.nbytes, chunk):
            yield memoryview(flat[o:o + chunk])
        return
    data = memoryview(blob.source)
    for o in range(0, blob.nbytes, chunk):
        yield data[o:o + chunk]


def _stream(p: Plan, blob_crcs: list[int]) -> Iterator[tuple[int, memoryview, bool]]:
    """The data stream as (blob index, bytes, volatile) pieces.

    Blob index -1 marks a batch (small blobs with their padding, whose CRCs
    are already in ``blob_crcs``) or padding; a large blob's pieces carry its
    index, and whoever consumes them computes its CRC. A volatile piece
    lives in a buffer that is reused for the next piece (the staging buffer
    of a device tensor): whoever keeps it must copy it.
    """
    pos = 0
    batch: bytearray | None = None
    view: memoryview | None = None
    address = fill = 0
    for index, (blob, start) in enumerate(zip(p.blobs, p.starts)):
        n = blob.nbytes
        pad = start - pos
        if n < SMALL:
            if batch is not None and fill + pad + n > len(batch) - ALIGN:
                yield -1, view[:fill], False
                batch = None
            if batch is None:
                # As large as the run of small blobs starting here needs, up to BATCH, plus
                # ALIGN spare bytes for the padding that may follow its last blob: a lone bias
                # between two weight matrices costs its own bytes, not a whole batch.
                batch, fill = bytearray(_run_bytes(p, index, pad) + ALIGN), 0
                view = memoryview(batch)
                address = ctypes.addressof((ctypes.c_char * len(batch)).from_buffer(batch))
            fill += pad   # the buffer is zeros
            source = blob.source
            if n and blob.kind == STORAGE and isinstance(source, torch.UntypedStorage) \
                    and source.device.type == "cpu":
                ctypes.memmove(address + fill, source.data_ptr(), n)   # no view objects per tiny storage
            else:
                at = fill
                for piece in blob_chunks(blob):
                    batch[at:at + len(piece)] = piece
                    at += len(piece)
            blob_crcs[index] = crc32c.crc32c(view[fill:fill + n])
            fill += n
            pos = start + n
            continue
        if batch is not None:
            yield -1, view[:fill + pad], False
            batch = None
        elif pad:
            yield -1, memoryview(_ZEROS)[:pad], False
        volatile = isinstance(blob.source, (torch.UntypedStorage, torch.Tensor)) and blob.source.device.type != "cpu"
        for piece in blob_chunks(blob):
            yield index, piece, volatile
        pos = start + n
    tail = p.total - pos
    if batch is not None:
        yield -1, view[:fill + tail], False
    elif tail:
        yield -1, memoryview(_ZEROS)[:tail], False


def _run_bytes(p: Plan, first: int, pad: int) -> int:
    """Bytes from ``pad`` before blob ``first`` to the end of the run of small blobs it starts, at most BATCH."""
    begin = p.starts[first] - pad
    end = p.starts[first] + p.blobs[first].nbytes
    for j in range(first + 1, len(p.blobs)):
        n = p.blobs[j].nbytes
        if n >= SMALL or p.starts[j] + n - begin > BATCH:
            break
        end = p.starts[j] + n
    return end - begin


def _files(p: Plan, blob_crcs: list[int]) -> Iterator[tuple[int, int, memoryview, bool]]:
    """The stream's pieces cut at data file boundaries: (file, blob index, bytes, volatile)."""
    k, room = 0, p.sizes[0]
    for index, piece, volatile in _stream(p, blob_crcs):
        while len(piece):
            while room == 0:
                k += 1
                room = p.sizes[k]
            take = piece[:room]
            yield k, index, take, volatile
            piece = piece[len(take):]
            room -= len(take)


def _crc_piece(piece: memoryview, index: int, blob_crcs: list[int], file_crc: int) -> int:
    """Add ``piece`` to its blob's CRC (a large blob's piece) and to its file's; returns the file's."""
    if index >= 0:
        blob_crcs[index] = crc32c.crc32c(piece, blob_crcs[index])
    return crc32c.crc32c(piece, file_crc)


WRITE_UNIT = 8 << 20   # bytes per write call of a streaming write: the unit of overlap
HANDOFF = 1 << 20      # pieces smaller than this are checksummed in the writing thread


def _write_sequential(store: Store, names: list[str], p: Plan, blob_crcs: list[int], bar,
                      written: list[str], verify: bool) -> tuple[list[int], list[int | None]]:
    """Write the data files one after the other, streaming; returns their CRC-32Cs and, where
    the writer reads back while writing, the CRC-32Cs of what is stored (else None).

    Pieces are written in units of at most ``WRITE_UNIT`` bytes. While the main thread writes
    one unit, one helper thread computes the CRC of the next unit's memory and reads back the
    unit written before (``Writer.stored_crc``): checksums and the read-back check cost no time
    on a disk that is the bottleneck, and the check needs no second pass after the last byte.
    """
    n = len(names)
    crcs: list[int] = [0] * n
    stored: list[int | None] = [None] * n
    w, k_open, pos, checked = None, -1, 0, 0
    back = None          # the read-back in flight: bytes [checked_before, checked) of file k_open

    def read_back(final: bool) -> None:
        """Start the read-back of what was written since the last one (every WRITE_UNIT
        bytes, and at the end of a file, when ``final`` waits for it too)."""
        nonlocal back, checked
        if stored[k_open] is None:
            return
        if back is not None:
            stored[k_open], back = back.result(), None
        if pos > checked and (final or pos - checked >= WRITE_UNIT):
            if pool is None or final:
                stored[k_open] = w.stored_crc(checked, pos - checked, stored[k_open])
            else:
                back = pool.submit(w.stored_crc, checked, pos - checked, stored[k_open])
            checked = pos

    later: dict[int, cf.Future] = {}     # files read back after their close, while the next is written

    def close_open() -> None:
        nonlocal w
        read_back(final=True)
        _finish(store, w, names[k_open], pos, p.sizes[k_open])
        w = None
        if verify and stored[k_open] is None and n > 1:
            entry = FileEntry(names[k_open], p.sizes[k_open], crcs[k_open])
            later[k_open] = closed.submit(stored_crc32c, store, entry)

    def open_next(k: int):
        nonlocal w, k_open, pos, checked
        if w is not None:
            close_open()
        written.append(names[k])
        w, k_open, pos, checked = store.open_writer(names[k], p.sizes[k]), k, 0, 0
        stored[k] = 0 if verify and w.reads_back else None

    # A helper thread is worth starting only when there are large pieces to overlap.
    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-crc") if p.total > WRITE_UNIT else None
    closed = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-verify") if verify and n > 1 else None
    try:
        for k, index, piece, _ in _files(p, blob_crcs):
            while k != k_open:
                open_next(k_open + 1)
            for o in range(0, len(piece), WRITE_UNIT):
                unit = piece[o:o + WRITE_UNIT]
                if pool is None or len(unit) < HANDOFF:
                    # cheaper to checksum here than to hand over to the helper
                    w.write(unit)
                    crcs[k] = _crc_piece(unit, index, blob_crcs, crcs[k])
                else:
                    fut = pool.submit(_crc_piece, unit, index, blob_crcs, crcs[k])
                    w.write(unit)
                    crcs[k] = fut.result()
                pos += len(unit)
                read_back(final=False)
                if bar is not None:
                    bar.update(len(unit))
        # Files the stream never reached are empty (a state with no data).
        while k_open < n - 1:
            open_next(k_open + 1)
        if w is not None:
            close_open()
        for k, fut in later.items():
            stored[k] = fut.result()
    except BaseException:
        if back is not None:
            back.exception()     # no read of a file that is about to be removed
        for fut in later.values():
            fut.cancel()
        if w is not None:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if closed is not None:
            closed.shutdown(wait=True)
    return crcs, stored


def _finish(store: Store, w, name: str, pos: int, size: int) -> None:
    if pos != size:
        w.abort()
        raise CheckpointError(f"{store.uri}: internal error: wrote {pos} bytes of {name}, planned {size}")
    try:
        w.close()
    except BaseException:
        w.abort()
        raise


def _write_parallel(store: Store, names: list[str], p: Plan, blob_crcs: list[int], bar,
                    written: list[str]) -> tuple[list[int], list[int | None]]:
    """Upload the data files as whole objects, ``store.concurrency`` at a time.

    Each file is one part of the stream, handed to the store as the list of
    pieces of tensor memory (and batches) it is made of: nothing is copied but
    small blobs and device tensors. At most ``concurrency`` parts are in
    flight, so what transfers hold is bounded by part size x concurrency,
    whatever the size of the state.
    """
    n = len(names)
    crcs: list[int] = [0] * n
    reported: list[int | None] = [None] * n
    slots = threading.Semaphore(store.concurrency)
    failed: list[BaseException] = []
    lock = threading.Lock()

    def upload(k: int, pieces: list) -> None:
        try:
            if failed:
                return
            crc = 0
            for piece in pieces:
                crc = crc32c.crc32c(piece, crc)
            crcs[k] = crc
            reported[k] = store.put_part(names[k], pieces, crc)
            if bar is not None:
                with lock:
                    bar.update(sum(len(x) for x in pieces))
        except BaseException as e:  # noqa: BLE001 - re-raised by the producer
            failed.append(e)
        finally:
            slots.release()

    def submit(k: int, pieces: list) -> None:
        slots.acquire()
        if failed:
            slots.release()
            raise failed[0]
        written.append(names[k])
        pool.submit(upload, k, pieces)

    with cf.ThreadPoolExecutor(store.concurrency, thread_name_prefix="ckptstore-put") as pool:
        try:
            k_open, pieces = 0, []
            for k, index, piece, volatile in _files(p, blob_crcs):
                while k != k_open:
                    submit(k_open, pieces)
                    k_open, pieces = k_open + 1, []
                if index >= 0:
                    blob_crcs[index] = crc32c.crc32c(piece, blob_crcs[index])
                pieces.append(bytes(piece) if volatile else piece)
            while k_open < n:
                submit(k_open, pieces)
                k_open, pieces = k_open + 1, []
        except BaseException as e:
            if not failed:
                failed.append(e)
    if failed:
        raise failed[0]
    return crcs, reported


def write_files(store: Store, names: list[str], p: Plan, *, verify: bool, written: list[str],
                bar=None) -> tuple[list[FileEntry], list[int]]:
    """Write the planned data files under ``names`` and check what was stored.

    Parallel uploads where the store cuts the stream into parts, one
    streaming write otherwise. Returns the record's file entries and each
    blob's CRC-32C (by blob index). Every name is added to ``written``
    before its file is started, so a caller that fails can discard exactly
    what exists.
    """
    blob_crcs = [0] * len(p.blobs)
    if store.part_bytes and store.concurrency > 1 and store.parallel_parts:
        crcs, reported = _write_parallel(store, names, p, blob_crcs, bar, written)
    else:
        crcs, reported = _write_sequential(store, names, p, blob_crcs, bar, written, verify)
    entries = [FileEntry(names[k], p.sizes[k], crcs[k]) for k in range(len(names))]
    if verify:
        check_stored(store, entries, reported)
    return entries, blob_crcs


def check_stored(store: Store, entries: list[FileEntry], reported: list[int | None]) -> None:
    """The verifier: what the backend stored has the CRC-32C computed while writing.

    ``reported[k]`` stands in for reading file ``k`` back where it is known:
    the backend's own checksum of the stored object, or the CRC the writer
    read back while writing (a local disk). Other files are read back now,
    several at once.
    """
    def stored(k: int) -> int:
        if reported[k] is not None:
            return reported[k]
        return stored_crc32c(store, entries[k])

    workers = max(1, min(store.concurrency, len(entries)))
    if workers == 1:
        results = [stored(k) for k in range(len(entries))]
    else:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="ckptstore-verify") as pool:
            results = list(pool.map(stored, range(len(entries))))
    for entry, crc in zip(entries, results):
        if crc != entry.crc32c:
            raise CorruptCheckpointError(
                f"{store.uri}/{entry.name}: stored with CRC-32C {crc_hex(crc)}, "
                f"written as {crc_hex(entry.crc32c)}; nothing was committed", store.uri)
