"""Load and verify: the mirror of the writer.

Finding the commit costs one listing and one small read. Loading reads each
data file front to back in large chunks straight into freshly allocated
tensor storage (or numpy/bytes buffers), checking every blob's CRC-32C and
that the alignment gaps are zero, so every byte of the file is checked and no
second copy of the state is ever held.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .format import tree
from .format.manifest import FileName, Manifest, commit_generations, commit_name, crc_hex
from .stores.base import Store
from .checksum import stored_crc32c

log = logging.getLogger("ckptstore")


@dataclass
class Found:
    manifest: Manifest | None            # the commit a reader takes, if any
    problems: list[str] = field(default_factory=list)  # why newer records were passed over
    records: int = 0                      # commit records present, intact or not


def shallow_problems(m: Manifest, listing: dict) -> list[str]:
    """Sizes and presence of the data files a commit record vouches for."""
    out = []
    for f in m.files:
        e = listing.get(f["name"])
        if e is None:
            out.append(f"data file {f['name']} is missing")
        elif e.size != f["nbytes"]:
            out.append(f"data file {f['name']} has {e.size} bytes, the commit record says {f['nbytes']}")
    return out


def find_commit(store: Store, listing: dict) -> Found:
    """The newest generation whose commit record is intact and whose files are all there."""
    found = Found(None)
    for gen in commit_generations(listing):
        found.records += 1
        name = commit_name(gen)
        try:
            m = Manifest.from_bytes(store.get(name), f"{store.uri}/{name}")
            if m.generation != gen:
                raise CorruptCheckpointError(f"commit record {name} names generation {m.generation}")
        except CheckpointNotFoundError:
            found.problems.append(f"commit record {name} vanished while reading")
            continue
        except CorruptCheckpointError as e:
            found.problems.append(str(e))
            continue
        missing = shallow_problems(m, listing)
        if missing:
            found.problems.append(f"generation {gen}: " + "; ".join(missing))
            continue
        found.manifest = m
        return found
    return found


def open_commit(store: Store) -> tuple[Manifest, dict]:
    """The committed manifest, or CheckpointNotFoundError / CorruptCheckpointError."""
    listing = store.list()
    if not listing:
        raise CheckpointNotFoundError(f"no checkpoint at {store.uri}{store.not_found_hint()}", store.uri)
    found = find_commit(store, listing)
    if found.manifest is None:
        if found.records:
            raise CorruptCheckpointError(
                f"checkpoint at {store.uri} is damaged: " + "; ".join(found.problems), store.uri)
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {store.uri} (only leftovers of an interrupted save; "
            "`ckptstore gc` removes them)" if any(FileName.parse(n) for n in listing)
            else f"no checkpoint at {store.uri}", store.uri)
    for p in found.problems:
        log.warning("%s: skipped a newer, incomplete save: %s", store.uri, p)
    return found.manifest, listing


# ---------------------------------------------------------------- loading blobs

def _alloc(kind: str, nbytes: int):
    """(the value to keep, a writable uint8 memoryview over it)."""
    if kind == tree.STORAGE:
        storage = torch.UntypedStorage(nbytes)
        if nbytes == 0:
            return storage, memoryview(bytearray(0))
        return storage, memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    if kind == tree.NDARRAY:
        arr = np.empty(nbytes, dtype=np.uint8)
        return arr, memoryview(arr)
    buf = bytearray(nbytes)
    return buf, memoryview(buf)


# Reads (Store.read_bytes each) are issued Store.concurrency at a time ahead
# of the checksum, so the disk (or the network) always has requests queued
# while the CPU checks what has arrived and the kernel faults in fresh pages.


@dataclass
class _Window:
    """One read: ``nbytes`` at ``offset`` of data file ``file``.

    ``blob >= 0``: the bytes go straight into that blob's buffer at
    ``blob_offset``. Otherwise they are read into a scratch buffer and
    ``pieces`` ((blob or -1 for padding, offset in blob, length)) say where
    each part goes.
    """
    file: int
    offset: int
    nbytes: int
    blob: int = -1
    blob_offset: int = 0
    pieces: list = field(default_factory=list)


def _windows(m: Manifest, part: int) -> list[_Window]:
    """Cover the data stream with reads of at most ``part`` bytes, in order.

    Large blobs are read straight into their own memory; runs of small blobs
    and the padding between them are gathered into one read each, so a state
    of many small tensors costs few requests. No read crosses a file boundary.
    """
    starts = m.file_starts()
    offsets = [starts[int(b["file"])] + int(b["offset"]) for b in m.blobs]
    regions = []   # (stream start, stream end, blob or -1)
    pos = 0
    for i in sorted(range(len(m.blobs)), key=lambda i: (offsets[i], i)):
        s, n = offsets[i], int(m.blobs[i]["nbytes"])
        if s < pos:
            raise CorruptCheckpointError("malformed checkpoint: blobs overlap")
        if s > pos:
            regions.append((pos, s, -1))
        if n:
            regions.append((s, s + n, i))
        pos = s + n
    if pos < starts[-1]:
        regions.append((pos, starts[-1], -1))

    out: list[_Window] = []
    cur: _Window | None = None
    k = 0
    for a, b, i in regions:
        region_start = a
        while a < b:
            while starts[k + 1] <= a:
                k += 1
                cur = None
            end = min(b, starts[k + 1])
            if i >= 0 and end - a >= part // 2:
                cur = None
                for o in range(a, end, part):
                    out.append(_Window(k, o - starts[k], min(part, end - o), i, o - region_start))
                a = end
                continue
            while a < end:
                if cur is None or cur.nbytes >= part:
                    cur = _Window(k, a - starts[k], 0)
                    out.append(cur)
                n = min(end - a, part - cur.nbytes)
                cur.pieces.append((i, a - region_start, n))
                cur.nbytes += n
                a += n
    return out


class _Readers:
    """One Reader per data file, opened on first use, shared by the read threads."""

    def __init__(self, store: Store, m: Manifest):
        self.store, self.m = store, m
        self.open: dict[int, Any] = {}
        self.lock = threading.Lock()

    def get(self, k: int):
        with self.lock:
            r = self.open.get(k)
            if r is None:
                r = self.open[k] = self.store.open_reader(self.m.files[k]["name"])
            return r

    def close(self) -> None:
        for r in self.open.values():
            r.close()


def _read_stream(store: Store, m: Manifest, verify: bool, values: list, pool, readers: _Readers) -> None:
    """Read every blob of a checkpoint, ``store.concurrency`` reads in flight."""
    views: list = [None] * len(m.blobs)
    for i, b in enumerate(m.blobs):
        values[i], views[i] = _alloc(b.get("kind", tree.STORAGE), int(b["nbytes"]))
    crcs = [0] * len(m.blobs)
    done = [0] * len(m.blobs)

    def where(w: _Window) -> str:
        return f"{store.uri}/{m.files[w.file]['name']}"

    def took(i: int, data: memoryview, w: _Window) -> None:
        if verify:
            crcs[i] = crc32c.crc32c(data, crcs[i])
        done[i] += len(data)
        if verify and done[i] == int(m.blobs[i]["nbytes"]) and crc_hex(crcs[i]) != m.blobs[i]["crc32c"]:
            raise CorruptCheckpointError(
                f"{where(w)}: CRC-32C mismatch in blob {i} ({m.blobs[i]['nbytes']} bytes); "
                "the checkpoint is corrupt", store.uri)

    def read(w: _Window):
        if w.blob >= 0:
            buf = views[w.blob][w.blob_offset:w.blob_offset + w.nbytes]
        else:
            buf = memoryview(bytearray(w.nbytes))
        return buf, readers.get(w.file).readinto(w.offset, buf)

    windows = _windows(m, store.read_bytes)
    pending: collections.deque = collections.deque()
    nxt = 0
    try:
        while nxt < len(windows) or pending:
            while nxt < len(windows) and len(pending) < max(1, store.concurrency):
                pending.append((windows[nxt], pool.submit(read, windows[nxt])))
                nxt += 1
            w, fut = pending.popleft()
            buf, n = fut.result()
            if n < w.nbytes:
                raise CorruptCheckpointError(f"{where(w)}: file ends early (truncated)", store.uri)
            if w.blob >= 0:
                took(w.blob, buf, w)
                continue
            pos = 0
            for i, off, n in w.pieces:
                piece = buf[pos:pos + n]
                if i < 0:
                    if any(piece):
                        raise CorruptCheckpointError(
                            f"{where(w)}: padding at byte {w.offset + pos} is not zero", store.uri)
                else:
                    views[i][off:off + n] = piece
                    took(i, piece, w)
                pos += n
    finally:
        for _, fut in pending:
            fut.cancel()
        for _, fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait, so no read lands in memory we no longer own
    if verify:
        for i, b in enumerate(m.blobs):
            if int(b["nbytes"]) == 0 and b["crc32c"] != crc_hex(0):
                raise CorruptCheckpointError(f"{store.uri}: CRC-32C mismatch in blob {i} (empty)", store.uri)
    if not store.immutable_files:
        # Nothing may follow the last byte the commit record vouches for.
        for k, f in enumerate(m.files):
            if readers.get(k).readinto(int(f["nbytes"]), memoryview(bytearray(1))) != 0:
                raise CorruptCheckpointError(
                    f"{store.uri}/{f['name']}: longer than the commit record says", store.uri)


def read_blobs(store: Store, m: Manifest, verify: bool = True) -> list[Any]:
    """Every blob of the manifest, read and checked, as allocated buffers (index-aligned)."""
    values: list[Any] = [None] * len(m.blobs)
    pool = cf.ThreadPoolExecutor(max(2, store.concurrency), thread_name_prefix="ckptstore-read")
    readers = _Readers(store, m)
    try:
        mapped = None
        if len(m.files) == 1:
            mapped = store.map_file(m.files[0]["name"], int(m.files[0]["nbytes"]))
        if mapped is not None:
            order = sorted(range(len(m.blobs)), key=lambda i: int(m.blobs[i]["offset"]))
            _take_mapped(mapped, m, order, verify, values, f"{store.uri}/{m.files[0]['name']}",
                         store.uri, pool)
        else:
            _read_stream(store, m, verify, values, pool, readers)
    finally:
        readers.close()
        pool.shutdown(wait=True)
    return values


def _take_mapped(big: torch.UntypedStorage, m: Manifest, order: list[int], verify: bool,
                 values: list, where: str, uri: str, pool) -> None:
    """Blobs as slices of a private (copy-on-write) mapping of a local data file.

    No allocation, no copy: the kernel reads the file into the page cache and
    the tensors use those pages until they are written to. Checking the CRCs
    is what reads the file; without verify, pages load when first touched.
    """
    flat = torch.empty(0, dtype=torch.uint8).set_(big).numpy()
    crcs = {}
    if verify:
        # Blobs are checked independently, so page faults and CRCs of
        # different blobs proceed on every core at once.
        def crc_of(i: int) -> int:
            off, n = int(m.blobs[i]["offset"]), int(m.blobs[i]["nbytes"])
            return crc32c.crc32c(memoryview(flat[off:off + n])) if 0 <= off <= off + n <= len(flat) else -1
        crcs = dict(zip(order, pool.map(crc_of, order)))
    pos = 0
    for i in order:
        b = m.blobs[i]
        off, n = int(b["offset"]), int(b["nbytes"])
        if off < pos:
            raise CorruptCheckpointError(f"{where}: blobs overlap", uri)
        if flat[pos:off].any():
            raise CorruptCheckpointError(f"{where}: padding at byte {pos} is not zero", uri)
        if off + n > len(flat):
            raise CorruptCheckpointError(f"{where}: blob {i} lies past the end of the file", uri)
        if verify and crc_hex(crcs[i]) != b["crc32c"]:
            raise CorruptCheckpointError(
                f"{where}: CRC-32C mismatch in bytes {off}..{off + n} (blob {i}); "
                "the checkpoint is corrupt", uri)
        kind = b.get("kind", tree.STORAGE)
        if kind == tree.STORAGE:
            values[i] = big[off:off + n]
        elif kind == tree.NDARRAY:
            values[i] = torch.empty(0, dtype=torch.uint8).set_(big[off:off + n]).numpy()
        else:
            values[i] = bytes(flat[off:off + n])
        pos = off + n
    if flat[pos:].any():
        raise CorruptCheckpointError(f"{where}: padding at byte {pos} is not zero", uri)


def build_state(m: Manifest, values: list[Any], map_location=None, allow_pickle: bool = False) -> Any:
    placed: dict[int, Any] = {}

    def blob_value(i: Any) -> Any:
        if type(i) is not int or not (0 <= i < len(values)):
            raise CorruptCheckpointError(f"malformed checkpoint structure: blob {i!r} does not exist")
        if i not in placed:
            v = values[i]
            kind = m.blobs[i].get("kind")
            if kind == tree.STORAGE:
                v = tree.restore_location(v, m.blobs[i].get("device", "cpu"), map_location)
            elif kind in (tree.BYTES, tree.PICKLE):
                v = bytes(v)
            placed[i] = v
        return placed[i]

    return tree.decode(m.nodes, blob_value, allow_pickle=allow_pickle)


# ---------------------------------------------------------------- verification

@dataclass
class Verified:
    ok: bool
    problems: list[str]
    nbytes: int
    manifest: Manifest | None


def verify_store(store: Store, deep: bool) -> Verified:
    listing = store.list()
    if not listing or not commit_generations(listing):
        raise CheckpointNotFoundError(f"no committed checkpoint at {store.uri}", store.uri)
    found = find_commit(store, listing)
    if found.manifest is None:
        return Verified(False, found.problems, 0, None)
    m = found.manifest
    problems: list[str] = []
    if deep:
        # The file CRC covers every byte, padding included, in one pass.
        for f in m.files:
            try:
                crc = stored_crc32c(store, f["name"], int(f["nbytes"]))
            except CorruptCheckpointError as e:
                problems.append(str(e))
                continue
            except CheckpointNotFoundError:
                problems.append(f"data file {f['name']} is missing")
                continue
            if crc_hex(crc) != f["crc32c"]:
                problems.append(f"data file {f['name']}: CRC-32C {crc_hex(crc)}, the commit record says {f['crc32c']}")
    return Verified(not problems, problems, m.nbytes, m)

