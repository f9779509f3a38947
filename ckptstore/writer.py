"""Save: encoded blobs -> data files -> read-back check -> commit -> retire the old.

Tensor bytes go from tensor memory to storage in chunks of a few tens of
MiB (CUDA storages through one pinned staging buffer), so a save never holds
a second copy of the state. CRC-32C of each blob and of each file is computed
on the way, in a helper thread that overlaps with the write of the same chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import crc32c
import numpy as np
import torch

from . import __version__
from .errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError, InsufficientSpaceError
from .format import tree
from .format.manifest import (
    ALIGN, CLAIM_NAME, COMMIT_SUFFIX, TMP_SUFFIX, FileName, Manifest, commit_generations, commit_name,
    crc_hex, data_name, new_generation,
)
from .checksum import stored_crc32c
from .stores.base import CHUNK, Store

_ZEROS = bytes(ALIGN)


@dataclass
class _Planned:
    index: int
    blob: tree.Blob
    start: int   # offset in the data stream


@dataclass
class Plan:
    """Where every blob goes: one stream of aligned blobs, cut into data files."""

    blobs: list[_Planned]
    sizes: list[int]      # data file sizes, in order; together they are the stream

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def locate(self, start: int) -> tuple[int, int]:
        """(file, offset in it) of a stream offset."""
        pos = 0
        for k, n in enumerate(self.sizes):
            if start < pos + n or k == len(self.sizes) - 1:
                return k, start - pos
            pos += n
        return 0, start


def plan(blobs: list[tree.Blob], part_bytes: int | None, pad_end: bool = False) -> Plan:
    """Lay blobs out at aligned offsets in one stream, then cut it into files.

    With ``part_bytes`` the stream is cut into files of exactly that size (the
    last one shorter), uploaded in parallel; a blob may continue from one file
    into the next. Without, the stream is one file. ``pad_end`` pads the
    stream with zeros to a multiple of the alignment, so that another stream
    can follow it (one per rank in a distributed save).
    """
    placed, pos = [], 0
    for i, b in enumerate(blobs):
        start = -(-pos // ALIGN) * ALIGN
        placed.append(_Planned(i, b, start))
        pos = start + b.nbytes
    total = -(-pos // ALIGN) * ALIGN if pad_end else pos
    if part_bytes and total > part_bytes:
        sizes = [part_bytes] * (total // part_bytes)
        if total % part_bytes:
            sizes.append(total % part_bytes)
    else:
        sizes = [total]
    return Plan(placed, sizes)


def blob_chunks(blob: tree.Blob, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The blob's bytes as memoryviews of at most ``chunk`` bytes, without copying CPU data.

    A storage blob's source is an ``UntypedStorage`` or a tensor whose
    elements, in row-major order, are the blob (a shard written by a
    distributed save). A non-contiguous tensor is compacted here, when its
    turn comes, so one such copy at a time exists while files are written.
    """
    if blob.nbytes == 0:
        return
    if blob.kind == tree.STORAGE:
        storage = blob.source
        if isinstance(storage, torch.Tensor):
            u8 = storage.detach().contiguous().reshape(-1).view(torch.uint8)
        else:
            u8 = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        if storage.device.type == "cpu":
            flat = u8.numpy()
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
    if blob.kind == tree.NDARRAY:
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


def _stream(p: Plan) -> Iterator[tuple[int, memoryview, bool]]:
    """The data stream as (blob index or -1 for padding, bytes, volatile) pieces.

    A volatile piece lives in a buffer that is reused for the next piece (the
    staging buffer of a device tensor): whoever keeps it must copy it.
    """
    pos = 0
    for q in p.blobs:
        if q.start > pos:
            yield -1, memoryview(_ZEROS)[: q.start - pos], False
            pos = q.start
        volatile = q.blob.kind == tree.STORAGE and q.blob.source.device.type != "cpu"
        for chunk in blob_chunks(q.blob):
            yield q.index, chunk, volatile
            pos += len(chunk)
    if p.total > pos:
        yield -1, memoryview(_ZEROS)[: p.total - pos], False


def _files(p: Plan) -> Iterator[tuple[int, int, memoryview, bool]]:
    """The stream's pieces cut at data file boundaries: (file, blob index, bytes, volatile)."""
    k, room = 0, p.sizes[0]
    for index, piece, volatile in _stream(p):
        while len(piece):
            while room == 0:
                k += 1
                room = p.sizes[k]
            take = piece[:room]
            yield k, index, take, volatile
            piece = piece[len(take):]
            room -= len(take)


def _crc2(chunk: memoryview, index: int, crcs: dict[int, int], file_crc: int) -> int:
    if index >= 0:
        crcs[index] = crc32c.crc32c(chunk, crcs.get(index, 0))
    return crc32c.crc32c(chunk, file_crc)


def _write_sequential(store: Store, names: list[str], p: Plan, blob_crcs: dict[int, int], bar,
                      written: list[str]) -> list[int]:
    """Write the data files one after the other, streaming; returns their CRC-32Cs.

    The CRCs of each piece are computed in a helper thread while the piece is
    written, so checksumming costs no time on a disk that is the bottleneck.
    """
    crcs = [0] * len(names)
    w, k_open, pos = None, -1, 0
    with cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-crc") as pool:
        try:
            for k, index, piece, _ in _files(p):
                if k != k_open:
                    if w is not None:
                        _finish(store, w, names[k_open], pos, p.sizes[k_open])
                    written.append(names[k])
                    w, k_open, pos = store.open_writer(names[k]), k, 0
                fut = pool.submit(_crc2, piece, index, blob_crcs, crcs[k])
                w.write(piece)
                crcs[k] = fut.result()
                pos += len(piece)
                if bar is not None:
                    bar.update(len(piece))
            # Files the stream never reached are empty (a state with no data).
            for k in range(k_open + 1, len(names)):
                if w is not None:
                    _finish(store, w, names[k_open], pos, p.sizes[k_open])
                written.append(names[k])
                w, k_open, pos = store.open_writer(names[k]), k, 0
            if w is not None:
                _finish(store, w, names[k_open], pos, p.sizes[k_open])
                w = None
        except BaseException:
            if w is not None:
                w.abort()
            raise
    return crcs


def _finish(store: Store, w, name: str, pos: int, size: int) -> None:
    if pos != size:
        w.abort()
        raise CheckpointError(f"{store.uri}: internal error: wrote {pos} bytes of {name}, planned {size}")
    try:
        w.close()
    except BaseException:
        w.abort()
        raise


def _write_parallel(store: Store, names: list[str], p: Plan, blob_crcs: dict[int, int], bar,
                    written: list[str]) -> tuple[list[int], list[int | None]]:
    """Upload the data files as whole objects, ``store.concurrency`` at a time.

    Each file is one part of the stream, handed to the store as the list of
    pieces of tensor memory (and padding) it is made of: nothing is copied
    but device tensors, which come through a staging buffer. At most
    ``concurrency`` parts are in flight, so what transfers hold is bounded
    by part size x concurrency, whatever the size of the state.
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
            for k, index, piece, volatile in _files(p):
                while k != k_open:
                    submit(k_open, pieces)
                    k_open, pieces = k_open + 1, []
                if index >= 0:
                    blob_crcs[index] = crc32c.crc32c(piece, blob_crcs.get(index, 0))
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


def retire_older(store: Store, gen: str, listing: dict) -> None:
    """Remove every generation older than ``gen`` in ``listing``: commit records first, then data.

    The listing taken before the save names every older generation; one a
    concurrent writer added meanwhile is left for ``gc``. Where the store
    keeps the previous generation (FUSE mounts, which upload in the
    background and in any order), the newest older commit stays as well.
    """
    keep = None
    if store.keep_previous:
        older = [g for g in commit_generations(listing) if g < gen]
        keep = older[0] if older else None
    records, rest = [], []
    for name in listing:
        f = FileName.parse(name)
        if f is None or f.gen >= gen or f.gen == keep:
            continue
        (records if f.role == "commit" else rest).append(name)
    store.remove(sorted(records))
    store.remove(sorted(rest))


def write_files(store: Store, names: list[str], p: Plan, *, verify: bool, written: list[str],
                bar=None) -> tuple[list[dict], dict[int, int]]:
    """Write the planned data files under ``names`` and check what was stored.

    Parallel uploads where the store cuts the stream into parts, one
    streaming write otherwise. Returns the ``files`` entries of the commit
    record and each blob's CRC-32C (by blob index). Every name is added to
    ``written`` before its file is started, so a caller that fails can
    discard exactly what exists.
    """
    blob_crcs: dict[int, int] = {}
    if store.part_bytes and store.concurrency > 1:
        crcs, reported = _write_parallel(store, names, p, blob_crcs, bar, written)
    else:
        crcs = _write_sequential(store, names, p, blob_crcs, bar, written)
        reported = [None] * len(names)
    entries = [{"name": names[k], "nbytes": p.sizes[k], "crc32c": crc_hex(crcs[k])} for k in range(len(names))]
    if verify:
        check_stored(store, entries, reported)
    return entries, blob_crcs


@dataclass
class Written:
    manifest: Manifest
    strategy: str
    seconds: float


def write_checkpoint(store: Store, strategy, state: Any, *, overwrite: bool, verify: bool,
                     allow_pickle: bool, progress: bool, meta: dict | None = None,
                     has_commit=None, devices: dict | None = None) -> Written:
    """The whole save. ``has_commit(store, listing)`` says if a checkpoint is already committed there."""
    t0 = time.perf_counter()
    nodes, blobs = tree.encode(state, allow_pickle=allow_pickle, devices=devices)   # refuses before any I/O

    if store.is_file():
        raise CheckpointExistsError(
            f"{store.uri} is a file, not a ckptstore checkpoint directory; remove it or save elsewhere",
            store.uri)
    listing = store.list()
    if not overwrite and listing and has_commit is not None and has_commit(store, listing):
        raise CheckpointExistsError(f"{store.uri}: a checkpoint is already committed here (overwrite=False)",
                                    store.uri)
    p = plan(blobs, store.part_bytes)
    total = p.total
    free = store.free_bytes()
    if free is not None and total > free:
        raise InsufficientSpaceError(
            f"{store.uri}: the checkpoint needs {total} bytes but only {free} are free; "
            "free space or choose another location", store.uri)
    store.makedirs()

    gen = new_generation([f.gen for f in map(FileName.parse, listing or {}) if f is not None])
    names = [data_name(gen, k) for k in range(len(p.sizes))]
    written: list[str] = []
    claimed = False
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"saving {store.uri}", leave=False)
    try:
        file_entries, blob_crcs = write_files(store, names, p, verify=verify, bar=bar, written=written)
        blob_entries = []
        for q in p.blobs:
            k, off = p.locate(q.start)
            blob_entries.append({"file": k, "offset": off, "nbytes": q.blob.nbytes,
                                 "crc32c": crc_hex(blob_crcs.get(q.index, 0)), "kind": q.blob.kind,
                                 "device": q.blob.device})
        manifest = Manifest(
            generation=gen, files=file_entries, blobs=blob_entries, nodes=nodes, meta=meta or {},
            writer={"ckptstore": __version__, "torch": torch.__version__.split("+")[0]},
        )
        if not overwrite and has_commit is not None:
            now = store.list()
            if now and has_commit(store, now):
                raise CheckpointExistsError(
                    f"{store.uri}: another writer committed a checkpoint here first (overwrite=False)", store.uri)
            _claim(store, gen, has_commit)
            claimed = True
        record = commit_name(gen)
        written.append(record)
        strategy.publish(store, record, manifest.to_bytes())
    except BaseException:
        discard(store, written + ([CLAIM_NAME] if claimed else []))
        raise
    finally:
        if bar is not None:
            bar.close()
    # Committed. What is older is now garbage; failing to remove it is harmless.
    try:
        retire_older(store, gen, listing or {})
        if claimed:
            store.remove([CLAIM_NAME])
    except CheckpointError:
        pass
    return Written(manifest, strategy.name, time.perf_counter() - t0)


def check_stored(store: Store, entries: list[dict], reported: list[int | None]) -> None:
    """The verifier: what the backend stored has the CRC-32C computed while writing.

    The backend's own checksum of the stored object stands in for reading
    it back where it reports one; otherwise each file is read back, several
    at once.
    """
    def stored(k: int) -> int:
        if reported[k] is not None:
            return reported[k]
        return stored_crc32c(store, entries[k]["name"], entries[k]["nbytes"])

    workers = max(1, min(store.concurrency, len(entries)))
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="ckptstore-verify") as pool:
        results = list(pool.map(stored, range(len(entries))))
    for entry, crc in zip(entries, results):
        if crc_hex(crc) != entry["crc32c"]:
            raise CorruptCheckpointError(
                f"{store.uri}/{entry['name']}: stored with CRC-32C {crc_hex(crc)}, "
                f"written as {entry['crc32c']}; nothing was committed", store.uri)


# A save with overwrite=False publishes only after creating this file with
# an exclusive create, so of two writers of the same new checkpoint one
# commits and the other gets CheckpointExistsError. It is removed once the
# commit is in place; one left by a writer that died in between is taken
# over once it is older than CLAIM_STALE seconds.
CLAIM_STALE = 60.0


def _claim(store: Store, gen: str, has_commit) -> None:
    body = json.dumps({"generation": gen, "time": time.time()}).encode()
    for attempt in range(2):
        if store.create_exclusive(CLAIM_NAME, body):
            # A writer that claimed and committed before us has removed its
            # claim by now, but its commit is there to see.
            if has_commit(store, store.list() or {}):
                store.remove([CLAIM_NAME])
                break
            return
        listing = store.list() or {}
        if has_commit(store, listing):
            break
        entry = listing.get(CLAIM_NAME)
        if attempt == 0 and entry is not None and entry.mtime is not None and \
                time.time() - entry.mtime > CLAIM_STALE:
            store.remove([CLAIM_NAME])     # left by a writer that died before its commit
            continue
        if entry is None and attempt == 0:
            continue                       # the other writer finished or gave up meanwhile
        break
    raise CheckpointExistsError(
        f"{store.uri}: another writer is committing a checkpoint here (overwrite=False)", store.uri)


def discard(store: Store, names: list[str]) -> None:
    try:
        store.remove(list(reversed(names)) + [n + TMP_SUFFIX for n in names if n.endswith(COMMIT_SUFFIX)])
    except BaseException:  # noqa: BLE001 - the original error matters more
        pass
