"""Incremental steps: a save writes only the blobs whose bytes no kept step holds.

An incremental run keeps its data files in ``<run>/.shared/`` and each step
directory holds only its commit record (format version 3, docs/format.md).
A blob's bytes are reused when an earlier committed step of the run holds a
blob of the same size and xxh3-128; the new record lists the files
those bytes are in and gives each blob's offset in the stream they form.

``SharedIndex`` is what the manager knows of the run's bytes: built from the
records of its committed steps, extended by each save it commits, and told
when files are removed.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compress import blob_digest, compress_blobs, compresses
from .datafiles import plan, write_files
from .errors import CheckpointError, FormatTooNewError
from .format import tree
from .format.frames import Frames
from .format.paths import Tree
from .format.manifest import (
    ALIGN, COMPRESSED_MAJOR, FORMAT_MAJOR, INCREMENTAL_MAJOR, KIND_CODES, SHARED_DIR, BlobTable, FileEntry,
    FileName, Manifest, data_name, device_column, new_generation,
)
from .info import CheckpointInfo
from .plan import node_blob
from .reader import find_commit
from .stores.base import Store
from .writer import Generation, info_of, writer_fields


@dataclass(frozen=True)
class Known:
    """Where bytes already are: ``files`` (consecutive in the stream of the record that wrote
    them), starting ``offset`` bytes into the first, with this CRC-32C; ``nbytes`` stored
    there, as ``frames`` when compressed."""

    files: tuple[FileEntry, ...]
    offset: int
    crc32c: int
    nbytes: int = 0
    frames: Frames | None = None


class SharedIndex:
    """(size, xxh3-128) -> where the run already holds those bytes."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, bytes], Known] = {}

    def add(self, m: Manifest) -> None:
        """Learn the blobs of a committed record whose data is in the run's shared directory.

        Bytes are known by their own size and hash: a blob stored compressed is reused by
        a save of the same bytes, compressed or not, and the other way round.
        """
        if m.version[0] < INCREMENTAL_MAJOR or m.blobs.hashes is None or m.files[0].dir != SHARED_DIR:
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
            frames = t.frames_of(i)
            self.known.setdefault((t.logical_size(i), t.hash_of(i)),
                                  Known(files, start - int(starts[first]), int(t.crcs[i]), size, frames))

    def forget(self, names: set[str]) -> None:
        """Files removed from the shared directory: their bytes can no longer be reused."""
        self.known = {k: v for k, v in self.known.items() if not any(f.name in names for f in v.files)}

    def find(self, size: int, digest: bytes) -> Known | None:
        return self.known.get((size, digest))


def write_incremental(step_store: Store, shared: Store, gen, state: Any, index: SharedIndex, *,
                      verify: bool = True, meta: dict | None = None, devices: dict | None = None,
                      writer: dict | None = None, written: list[str] | None = None, allow_pickle: bool = False,
                      encoded: tuple | None = None, compression: str | None = None,
                      apart: list[tuple] | None = None) -> Manifest:
    """Write the blobs of ``state`` that ``index`` does not hold into ``shared``, and return the
    version 3 manifest of generation ``gen`` (not yet committed).

    ``apart``: paths (the manager's ``thin_select``) whose bytes never share a data file
    with the rest, so that thinning a step to them leaves the others' files unlisted, for
    the sweep to free.

    ``gen`` is the step's ``writer.Generation``. Every file written in
    ``shared`` (the intent first, then data files as they are started) is
    appended to ``written``, so a failure can remove them; once the record is
    committed the caller removes the intent (``written[0]``).
    """
    written = [] if written is None else written
    nodes, blobs = encoded if encoded is not None else tree.encode(state, allow_pickle=allow_pickle, devices=devices)
    hashes = [blob_digest(b) for b in blobs]
    reuse: dict[int, Known] = {}
    taken: set[Known] = set()
    for i, b in enumerate(blobs):
        if b.nbytes == 0:
            continue
        known = index.find(b.nbytes, hashes[i])
        # Equal size and xxh3-128 decide (the CRC-32C never does: it is only copied over and
        # checked when the bytes are read). Two blobs of one save never share bytes (a
        # record's blobs do not overlap).
        if known is not None and known not in taken:
            reuse[i] = known
            taken.add(known)
    reuse = worth_keeping(reuse)
    # Announce the files this save may list, then drop any that vanished or a sweep condemned
    # meanwhile (those bytes are written again instead).
    wanted = {f.name for k in reuse.values() for f in k.files}
    written.append(gen.id + INTENT_SUFFIX)
    write_intent(shared, gen.id, sorted(wanted))
    if wanted:
        bad = unusable(shared, wanted)
        if bad:
            reuse = {i: k for i, k in reuse.items() if not any(f.name in bad for f in k.files)}
    new = [i for i in range(len(blobs)) if i not in reuse]
    if compresses(compression, shared.compression_pays):
        blobs, _ = compress_blobs(blobs, nodes, compression, shared.compression_pays, hashes, skip=reuse)

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

    crcs = [0] * len(blobs)
    starts = [0] * len(blobs)
    if new or not files:
        # Every shared file's size a multiple of 64 (its stream padded at the end, parts cut at
        # multiples of 64): a later record that lists it before other files keeps their blobs aligned.
        part = shared.part_bytes // ALIGN * ALIGN if shared.part_bytes else None
        inside = _blobs_under(nodes, apart, len(blobs)) if apart else set()
        breaks = [k for k in range(1, len(new)) if (new[k] in inside) != (new[k - 1] in inside)]
        p = plan([blobs[i] for i in new], part, pad_end=True, breaks=breaks)
        names = [data_name(gen.id, k) for k in range(len(p.sizes))]
        shared.makedirs()
        entries, new_crcs = write_files(shared, names, p, verify=verify, written=written)
        files += [FileEntry(e.name, e.nbytes, e.crc32c, SHARED_DIR) for e in entries]
        for j, i in enumerate(new):
            crcs[i] = new_crcs[j]
            starts[i] = own_start + p.starts[j]
    sizes = [b.nbytes for b in blobs]
    codec = {i: b.frames for i, b in enumerate(blobs) if b.frames is not None}
    for i, k in reuse.items():
        crcs[i] = k.crc32c
        starts[i] = base[k.files[0].name] + k.offset
        sizes[i] = k.nbytes
        if k.frames is not None:
            codec[i] = k.frames
    table_devices, device_index = device_column([b.device for b in blobs])
    table = BlobTable(starts, sizes, crcs, "".join(KIND_CODES[b.kind] for b in blobs),
                      table_devices, device_index, b"".join(hashes), codec or None)
    m = Manifest(generation=gen.id, files=files, blobs=table, nodes=nodes, meta=meta or {},
                 writer=writer or {}, version=(COMPRESSED_MAJOR if codec else INCREMENTAL_MAJOR, 0),
                 created=time.time())
    return m


MIN_SHARE = 4   # bytes are reused from a shared file only when they are at least 1/MIN_SHARE of it


def worth_keeping(reuse: dict[int, Known]) -> dict[int, Known]:
    """``reuse`` without the blobs whose files this save would use only a sliver of.

    A shared file is freed only when no kept step lists it: a save that reused a few
    unchanged bytes (an optimizer's zero moments) from a large file of an old step would
    keep that whole file alive for as long as the bytes stay unchanged. Such bytes are
    written again instead (they are few, by definition), and the old file goes with the
    steps that needed it.
    """
    used: dict[str, int] = {}
    size: dict[str, int] = {}
    for k in reuse.values():
        pos, left = k.offset, k.nbytes
        for f in k.files:
            take = min(left, f.nbytes - pos)
            used[f.name] = used.get(f.name, 0) + take
            size[f.name] = f.nbytes
            left, pos = left - take, 0
    sliver = {name for name, n in used.items() if n * MIN_SHARE < size[name]}
    return {i: k for i, k in reuse.items() if not any(f.name in sliver for f in k.files)}


def _blobs_under(nodes: list, paths: list[tuple], count: int) -> set[int]:
    """The blobs the values at ``paths`` use (paths a state lacks count for nothing)."""
    nav = Tree(nodes, FORMAT_MAJOR)
    out: set[int] = set()
    for path in paths:
        try:
            top = nav.lookup(path)[-1]
        except (KeyError, CheckpointError):
            continue
        for n in nav.subtree(top):
            b = node_blob(nodes[n], FORMAT_MAJOR)
            if b is not None and 0 <= b < count:
                out.add(b)
    return out


def commit_step(store: Store, state: Any, index: SharedIndex, *, overwrite: bool, verify: bool = True,
                meta: dict | None = None, devices: dict | None = None, allow_pickle: bool = False,
                encoded: tuple | None = None, compression: str | None = None,
                apart: list[tuple] | None = None) -> tuple[Manifest, CheckpointInfo]:
    """Save ``state`` as the incremental step at ``store`` (its data in ``../.shared``) and commit
    it; ``index`` learns its blobs. A failure removes what this save wrote in the shared directory."""
    t0 = time.perf_counter()
    shared = store.sibling(SHARED_DIR)
    with Generation.begin(store, overwrite=overwrite) as gen:
        written: list[str] = []
        try:
            m = write_incremental(store, shared, gen, state, index, verify=verify, meta=meta, devices=devices,
                                  writer=writer_fields(), written=written, allow_pickle=allow_pickle,
                                  encoded=encoded, compression=compression, apart=apart)
            gen.commit(m)
        except BaseException:
            with contextlib.suppress(Exception):
                shared.remove(written)
            raise
    with contextlib.suppress(CheckpointError):
        shared.remove(written[:1])     # the intent: the record lists the files now
    index.add(m)
    return m, info_of(store, m, gen.strategy.name, time.perf_counter() - t0)


def run_records(run: Store) -> dict[str, Manifest]:
    """{directory: record} of the committed checkpoints directly under ``run`` (its shared
    directory aside). A record of a newer format raises ``FormatTooNewError``: what it lists
    cannot be known, so nothing may be swept."""
    out: dict[str, Manifest] = {}
    for d in run.subdirs():
        if d == SHARED_DIR:
            continue
        step = run.child(d)
        try:
            found = find_commit(step, step.list() or {})
        except FormatTooNewError:
            raise
        except CheckpointError:
            continue
        if found.manifest is not None:
            out[d] = found.manifest
    return out


def listed_by(records) -> set[str]:
    """The shared files that the version 3 records among ``records`` list."""
    return {f.name for m in records if m.version[0] >= INCREMENTAL_MAJOR for f in m.files}


# ---------------------------------------------------------------- who may still need a shared file

INTENT_SUFFIX = ".intent"        # <gen>.intent: a save in flight and the shared files it may list
CONDEMNED_SUFFIX = ".condemned"  # <gen>.condemned: files a sweep is about to remove
STALE = 3600.0                   # an intent or condemned list this old belongs to a process that died
                                 # (gc's default grace: no save is expected to take longer)


def _json_files(shared: Store, listing: dict, suffix: str, now: float, stale: float = STALE) -> dict[str, dict]:
    """{name: parsed body} of the fresh ``suffix`` files in ``listing``; stale or unreadable ones are skipped."""
    out = {}
    for name, entry in listing.items():
        if not name.endswith(suffix):
            continue
        if entry.mtime is not None and now - entry.mtime > stale:
            continue
        try:
            body = json.loads(shared.get(name))
        except (CheckpointError, ValueError):
            continue
        if isinstance(body, dict):
            out[name] = body
    return out


def write_intent(shared: Store, gen: str, names: list[str]) -> str:
    """Announce a save of generation ``gen`` that may list ``names`` (and writes files of ``gen``)."""
    name = gen + INTENT_SUFFIX
    shared.makedirs()
    shared.put(name, json.dumps({"generation": gen, "files": sorted(names), "time": time.time()}).encode())
    return name


def unusable(shared: Store, names: set[str]) -> set[str]:
    """Of ``names``, those a save must not list: gone from the shared directory, or condemned
    by a sweep. Called after the save's intent is written (see docs/format.md)."""
    listing = shared.list() or {}
    now = time.time()
    condemned: set[str] = set()
    for body in _json_files(shared, listing, CONDEMNED_SUFFIX, now).values():
        files = body.get("files")
        if isinstance(files, list):
            condemned.update(f for f in files if isinstance(f, str))
    return {n for n in names if n not in listing or n in condemned}


def sweep(run: Store, live_of, *, grace: float = STALE, dry_run: bool = False) -> list[str]:
    """Remove the shared data files of run ``run`` that no committed step lists and no save in
    flight may list. ``live_of()`` reads the committed records now and returns the file names they
    list. Sound against saves in other processes without any wait (see docs/format.md); an intent
    older than ``grace`` seconds is taken to be a save that died."""
    shared = run.child(SHARED_DIR)
    listing = shared.list() or {}
    if not listing:
        return []
    now = time.time()

    def protected() -> set[str]:
        # intents first, then the records: a save deletes its intent only after its record is in place
        names: set[str] = set()
        gens: set[str] = set()
        for body in _json_files(shared, shared.list() or {}, INTENT_SUFFIX, now, grace).values():
            if isinstance(body.get("generation"), str):
                gens.add(body["generation"])
            files = body.get("files")
            if isinstance(files, list):
                names.update(f for f in files if isinstance(f, str))
        names |= live_of()
        return names | {n for n in listing if (f := FileName.parse(n)) is not None and f.gen in gens}

    data = {n for n in listing if (f := FileName.parse(n)) is not None and f.role == "data"}
    candidates = sorted(data - protected())
    if dry_run:
        return candidates
    dead: list[str] = []
    if candidates:
        marker = new_generation() + CONDEMNED_SUFFIX
        shared.put(marker, json.dumps({"files": candidates, "time": time.time()}).encode())
        try:
            dead = sorted(set(candidates) - protected())
            if dead:
                shared.remove(dead)
        finally:
            shared.remove([marker])
    # markers of saves and sweeps that died, whether or not this sweep found data to remove
    stale = [n for n, e in listing.items() if n.endswith((INTENT_SUFFIX, CONDEMNED_SUFFIX))
             and e.mtime is not None and now - e.mtime > grace]
    if stale:
        shared.remove(stale)
    return dead
