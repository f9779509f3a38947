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
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import torch

from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .format import tree
from .format.manifest import FileName, Manifest, commit_generations, commit_name, crc_hex
from .stores.base import CHUNK, Store
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
        raise CheckpointNotFoundError(f"no checkpoint at {store.uri}", store.uri)
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


# Reads are issued a few at a time ahead of the checksum, so the disk (or the
# network) always has requests queued while the CPU checks what has arrived
# and the kernel faults in fresh tensor pages.
READ_PART = 8 << 20
READ_AHEAD = 4


def _fill(reader, offset: int, view: memoryview, verify: bool, where: str, uri: str, pool) -> int:
    """Read len(view) bytes at offset into view; returns their CRC-32C (0 when not verifying)."""
    parts = [(o, view[o:o + READ_PART]) for o in range(0, len(view), READ_PART)]
    pending: collections.deque = collections.deque()
    crc, nxt = 0, 0
    try:
        while nxt < len(parts) or pending:
            while nxt < len(parts) and len(pending) < READ_AHEAD:
                o, part = parts[nxt]
                pending.append((part, pool.submit(reader.readinto, offset + o, part)))
                nxt += 1
            part, fut = pending.popleft()
            if fut.result() < len(part):
                raise CorruptCheckpointError(f"{where}: file ends early (truncated)", uri)
            if verify:
                crc = crc32c.crc32c(part, crc)
    finally:
        for _, fut in pending:
            fut.cancel()
        for _, fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait, so no read lands in memory we no longer own
    return crc


def read_blobs(store: Store, m: Manifest, verify: bool = True) -> list[Any]:
    """Every blob of the manifest, read and checked, as allocated buffers (index-aligned)."""
    values: list[Any] = [None] * len(m.blobs)
    by_file: dict[int, list[int]] = {}
    for i, b in enumerate(m.blobs):
        by_file.setdefault(int(b["file"]), []).append(i)
    gap = bytearray(0)
    pool = cf.ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="ckptstore-read")
    try:
        _read_files(store, m, verify, values, by_file, gap, pool)
    finally:
        pool.shutdown(wait=True)
    return values


def _read_files(store, m, verify, values, by_file, gap, pool) -> None:
    for k, f in enumerate(m.files):
        where = f"{store.uri}/{f['name']}"
        order = sorted(by_file.get(k, []), key=lambda i: int(m.blobs[i]["offset"]))
        mapped = store.map_file(f["name"], int(f["nbytes"]))
        if mapped is not None:
            _take_mapped(mapped, m, order, verify, values, where, store.uri, pool)
            continue
        with store.open_reader(f["name"]) as r:
            pos = 0
            for i in order:
                b = m.blobs[i]
                off, n = int(b["offset"]), int(b["nbytes"])
                if off < pos:
                    raise CorruptCheckpointError(f"{where}: blobs overlap", store.uri)
                if off > pos:
                    pos = _check_gap(r, pos, off, gap, where, store.uri)
                value, view = _alloc(b.get("kind", tree.STORAGE), n)
                crc = _fill(r, off, view, verify, where, store.uri, pool)
                if verify and crc_hex(crc) != b["crc32c"]:
                    raise CorruptCheckpointError(
                        f"{where}: CRC-32C mismatch in bytes {off}..{off + n} (blob {i}); "
                        "the checkpoint is corrupt", store.uri)
                values[i] = value
                pos = off + n
            end = int(f["nbytes"])
            if pos < end:
                _check_gap(r, pos, end, gap, where, store.uri)
            # Nothing may follow the last byte the commit record vouches for.
            if r.readinto(end, memoryview(bytearray(1))) != 0:
                raise CorruptCheckpointError(f"{where}: longer than the commit record says", store.uri)


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


def _check_gap(r, start: int, end: int, gap: bytearray, where: str, uri: str) -> int:
    """Alignment padding is defined as zeros; anything else is corruption."""
    while start < end:
        n = min(end - start, CHUNK)
        if len(gap) < n:
            gap.extend(bytes(n - len(gap)))
        view = memoryview(gap)[:n]
        if r.readinto(start, view) < n:
            raise CorruptCheckpointError(f"{where}: file ends early (truncated)", uri)
        if any(view):
            raise CorruptCheckpointError(f"{where}: padding at byte {start} is not zero", uri)
        start += n
    return end


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

