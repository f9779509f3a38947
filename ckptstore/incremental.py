"""Incremental steps: a save writes only the blobs whose bytes no kept step holds.

An incremental run keeps its data files in ``<run>/.shared/`` and each step
directory holds only its commit record (format version 3, docs/format.md).
A blob's bytes are reused when an earlier committed step of the run holds a
blob of the same size, xxh3-128 and CRC-32C; the new record lists the files
those bytes are in and gives each blob's offset in the stream they form.

``SharedIndex`` is what the manager knows of the run's bytes: built from the
records of its committed steps, extended by each save it commits, and told
when files are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np
import xxhash

from .datafiles import blob_chunks, plan, write_files
from .format import tree
from .format.manifest import (
    INCREMENTAL_MAJOR, KIND_CODES, SHARED_DIR, BlobTable, FileEntry, FileName, Manifest, data_name,
    device_column,
)
from .stores.base import Store


def blob_hash(blob) -> bytes:
    """xxh3-128 of a blob's bytes, big-endian (XXH3_128bits, seed 0)."""
    h = xxhash.xxh3_128()
    for piece in blob_chunks(blob):
        h.update(piece)
    return h.digest()


def blob_crc(blob) -> int:
    crc = 0
    for piece in blob_chunks(blob):
        crc = crc32c.crc32c(piece, crc)
    return crc


@dataclass(frozen=True)
class Known:
    """Where bytes already are: ``files`` (consecutive in the stream of the record that wrote
    them), starting ``offset`` bytes into the first, with this CRC-32C."""

    files: tuple[FileEntry, ...]
    offset: int
    crc32c: int


class SharedIndex:
    """(size, xxh3-128) -> where the run already holds those bytes."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, bytes], Known] = {}

    def add(self, m: Manifest) -> None:
        """Learn the blobs of a committed version 3 record."""
        if m.version[0] < INCREMENTAL_MAJOR or m.blobs.hashes is None:
            return
        starts = np.asarray(m.file_starts(), dtype=np.int64)
        t = m.blobs
        for i in range(len(t)):
            size = int(t.sizes[i])
            if size == 0:
                continue
            start = int(t.starts[i])
            first = int(np.searchsorted(starts, start, side="right")) - 1
            last = int(np.searchsorted(starts, start + size, side="left")) - 1
            files = tuple(m.files[first:last + 1])
            self.known.setdefault((size, t.hash_of(i)), Known(files, start - int(starts[first]), int(t.crcs[i])))

    def forget(self, names: set[str]) -> None:
        """Files removed from the shared directory: their bytes can no longer be reused."""
        self.known = {k: v for k, v in self.known.items() if not any(f.name in names for f in v.files)}

    def find(self, size: int, digest: bytes) -> Known | None:
        return self.known.get((size, digest))


def write_incremental(step_store: Store, shared: Store, gen, state: Any, index: SharedIndex, *,
                      verify: bool = True, meta: dict | None = None, devices: dict | None = None,
                      writer: dict | None = None) -> tuple[Manifest, list[str]]:
    """Write the blobs of ``state`` that ``index`` does not hold into ``shared``, and return the
    version 3 manifest of generation ``gen`` (not yet committed) and the shared files written.

    ``gen`` is the step's ``writer.Generation``; files written are named in
    the returned list as they are started, so a failure can remove them.
    """
    nodes, blobs = tree.encode(state, devices=devices)
    hashes = [blob_hash(b) for b in blobs]
    reuse: dict[int, Known] = {}
    taken: set[Known] = set()
    for i, b in enumerate(blobs):
        if b.nbytes == 0:
            continue
        known = index.find(b.nbytes, hashes[i])
        # The hash and size must match, and the CRC too: the CRC alone never decides. Two
        # blobs of one save never share bytes (a record's blobs do not overlap).
        if known is not None and known not in taken and blob_crc(b) == known.crc32c:
            reuse[i] = known
            taken.add(known)
    new = [i for i in range(len(blobs)) if i not in reuse]

    # The stream: the reused files, grouped by the generation that wrote them and in
    # their own order (so a blob spanning several of them still finds them consecutive),
    # then this save's own files.
    by_name: dict[str, FileEntry] = {}
    for k in reuse.values():
        for f in k.files:
            by_name[f.name] = f
    old = sorted(by_name.values(), key=lambda f: (FileName.parse(f.name).gen, FileName.parse(f.name).number))
    files = [FileEntry(f.name, f.nbytes, f.crc32c, SHARED_DIR) for f in old]
    base: dict[str, int] = {}
    pos = 0
    for f in files:
        base[f.name] = pos
        pos += f.nbytes
    own_start = pos

    written: list[str] = []
    crcs = [0] * len(blobs)
    starts = [0] * len(blobs)
    if new or not files:
        p = plan([blobs[i] for i in new], shared.part_bytes)
        names = [data_name(gen.id, k) for k in range(len(p.sizes))]
        shared.makedirs()
        entries, new_crcs = write_files(shared, names, p, verify=verify, written=written)
        files += [FileEntry(e.name, e.nbytes, e.crc32c, SHARED_DIR) for e in entries]
        for j, i in enumerate(new):
            crcs[i] = new_crcs[j]
            starts[i] = own_start + p.starts[j]
    for i, k in reuse.items():
        crcs[i] = k.crc32c
        starts[i] = base[k.files[0].name] + k.offset
    table_devices, device_index = device_column([b.device for b in blobs])
    table = BlobTable(starts, [b.nbytes for b in blobs], crcs, "".join(KIND_CODES[b.kind] for b in blobs),
                      table_devices, device_index, b"".join(hashes))
    m = Manifest(generation=gen.id, files=files, blobs=table, nodes=nodes, meta=meta or {},
                 writer=writer or {}, version=(INCREMENTAL_MAJOR, 0), created=time.time())
    return m, written
