"""Find the commit, read the blobs, rebuild the state, verify: the mirror of the writer.

Finding the commit costs one listing and one small read. Loading covers the
data stream with *segments*: one large blob, or a run of small blobs with the
padding between them. Each segment is one fresh buffer (on local disk, a
private mapping of the file instead), filled by range reads of
``Store.read_bytes`` through the shared ``StreamReader``; blobs are slices of
it, so 10**5 small tensors cost a few hundred reads and no copies. Every
blob's CRC-32C is checked and every padding byte must be zero, so every byte
of the data files is checked, and no second copy of the state is ever held.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import ctypes
import functools
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import crc32c
import numpy as np
import torch

from .compress import FrameHasher, FrameStream, read_compressed
from .errors import CheckpointNotFoundError, CorruptCheckpointError, FormatTooNewError, record_checks
from .format import shards, tree
from .format.manifest import (
    NDARRAY, SHARED_DIR, STORAGE, FileEntry, FileName, Manifest, commit_generations, commit_name,
)
from .info import VerifyReport
from .plan import ReadPlan
from .hostmem import host_bytes
from .ranges import COALESCE, Range, StreamReader, crc32c_combine
from .stores.base import Store

log = logging.getLogger("ckptstore")


@dataclass
class Found:
    manifest: Manifest | None            # the commit a reader takes, if any
    problems: list[str] = field(default_factory=list)  # why newer records were passed over
    record_count: int = 0                 # commit records present, intact or not


def shallow_problems(files: list[FileEntry], listing: dict) -> list[str]:
    """Sizes and presence of the data files a commit record vouches for."""
    out = []
    for f in files:
        e = listing.get(f.name)
        if e is None:
            out.append(f"data file {f.name} is missing")
        elif e.size != f.nbytes:
            out.append(f"data file {f.name} has {e.size} bytes, the commit record says {f.nbytes}")
    return out


def data_store(store: Store, m: Manifest) -> Store:
    """Where ``m``'s data files are: the checkpoint's own directory, or for an
    incremental step (version 3) its run's shared directory."""
    if m.files and m.files[0].dir == SHARED_DIR:
        try:
            return store.sibling(SHARED_DIR)
        except ValueError as e:
            raise CorruptCheckpointError(f"{store.uri}: an incremental step outside a run: {e}", store.uri) from None
    return store


def find_commit(store: Store, listing: dict) -> Found:
    """The newest generation whose commit record is intact and whose files are all there.

    An intact newest record of a format this ckptstore does not know raises
    FormatTooNewError: falling back past it would silently read an older state.
    """
    found = Found(None)
    shared = None   # the run's shared directory's listing, once an incremental step needs it
    for gen in commit_generations(listing):
        found.record_count += 1
        name = commit_name(gen)
        try:
            m = Manifest.from_bytes(store.get(name), f"{store.uri}/{name}")
            if m.generation != gen:
                raise CorruptCheckpointError(f"commit record {name} names generation {m.generation:.40}")
        except CheckpointNotFoundError:
            found.problems.append(f"commit record {name} vanished while reading")
            continue
        except CorruptCheckpointError as e:
            found.problems.append(str(e))
            continue
        except FormatTooNewError as e:
            e.uri = e.uri or store.uri
            raise
        if m.files[0].dir == SHARED_DIR:
            if shared is None:
                shared = data_store(store, m).list() or {}
            missing = shallow_problems(m.files, shared)
        else:
            missing = shallow_problems(m.files, listing)
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
        if found.record_count:
            raise CorruptCheckpointError(
                f"checkpoint at {store.uri} is damaged: " + "; ".join(found.problems), store.uri)
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {store.uri} (only leftovers of an interrupted save; "
            "`ckptstore gc` removes them)" if any(FileName.parse(n) for n in listing)
            else f"no checkpoint at {store.uri}", store.uri)
    for p in found.problems:
        log.warning("%s: skipped a newer, incomplete save: %s", store.uri, p)
    return found.manifest, listing


# ---------------------------------------------------------------- segments

SEGMENT = 8 << 20   # small blobs are gathered into segments of about this size


@dataclass
class _Segment:
    """Stream bytes [start, end) and the blobs wholly inside them, in stream order."""

    start: int
    end: int
    blobs: list[int]


def segments(m: Manifest, size: int = SEGMENT) -> list[_Segment]:
    """Cover the data stream, in order, with segments of whole blobs and the gaps after them.

    A large blob is a segment of its own; small ones are gathered until the
    segment would pass ``size``. Each segment ends where the next begins, the
    last where the stream ends, so every byte belongs to exactly one.
    """
    t = m.blobs
    out: list[_Segment] = []
    prev_large = False
    for i in np.argsort(t.starts, kind="stable").tolist():
        s, n = int(t.starts[i]), int(t.sizes[i])
        large = n >= size // 2
        if not out or large or prev_large or s + n - out[-1].start > size:
            out.append(_Segment(s if out else 0, s + n, [i]))
        else:
            out[-1].blobs.append(i)
        prev_large = large
    for a, b in zip(out, out[1:]):
        a.end = b.start
    stream_end = m.file_starts()[-1]
    if out:
        out[-1].end = max(out[-1].end, stream_end)
    elif stream_end:
        out.append(_Segment(0, stream_end, []))
    return out


def selected_segments(m: Manifest, blobs, size: int = SEGMENT) -> list[_Segment]:
    """Segments over only ``blobs``: runs of nearby small blobs, large ones alone; gaps not read."""
    t = m.blobs
    out: list[_Segment] = []
    prev_large = False
    for i in sorted(blobs, key=lambda b: (int(t.starts[b]), b)):
        s, n = int(t.starts[i]), int(t.sizes[i])
        large = n >= size // 2
        if not out or large or prev_large or s - out[-1].end > COALESCE or s + n - out[-1].start > size:
            out.append(_Segment(s, s + n, [i]))
        else:
            out[-1].blobs.append(i)
            out[-1].end = max(out[-1].end, s + n)
        prev_large = large
    return out


def _check_padding(flat: np.ndarray, base: int, seg: _Segment, m: Manifest, where: str, uri: str) -> None:
    """Every byte of ``seg`` that is not a blob's is zero (``flat`` holds the segment's bytes)."""
    t = m.blobs
    idx = np.asarray(seg.blobs, dtype=np.int64)
    starts = t.starts[idx] - base if len(idx) else np.zeros(0, np.int64)
    ends = starts + t.sizes[idx] if len(idx) else np.zeros(0, np.int64)
    gap_starts = np.concatenate(([seg.start - base], ends))
    gap_ends = np.concatenate((starts, [seg.end - base]))
    lengths = gap_ends - gap_starts
    if bool((lengths < 0).any()):
        raise CorruptCheckpointError(f"{where}: blobs overlap", uri)
    total = int(lengths.sum())
    if not total:
        return
    # Every gap byte's position, without a Python loop over 10**5 gaps.
    offsets = np.repeat(gap_starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    bad = np.flatnonzero(flat[offsets])
    if len(bad):
        raise CorruptCheckpointError(f"{where}: padding at stream byte {base + int(offsets[bad[0]])} is not zero",
                                     uri)


def _check(seg: _Segment, flat: np.ndarray, base: int, m: Manifest, where: str, uri: str,
           padding: bool = True) -> None:
    """Check one filled segment (``flat`` holds stream bytes from ``base``): its padding is zeros
    (unless ``padding=False``) and every blob has its CRC-32C."""
    view = memoryview(flat)
    t = m.blobs
    if padding:
        _check_padding(flat, base, seg, m, where, uri)
    for i in seg.blobs:
        off, n = int(t.starts[i]) - base, int(t.sizes[i])
        if crc32c.crc32c(view[off:off + n]) != int(t.crcs[i]):
            raise CorruptCheckpointError(
                f"{where}: CRC-32C mismatch in blob {i} ({n} bytes at stream byte {off + base}); "
                "the checkpoint is corrupt", uri)


def _cut(seg: _Segment, storage: torch.UntypedStorage, flat: np.ndarray, base: int, m: Manifest,
         values: list) -> None:
    """Cut the segment's blobs out of ``storage`` (slices: no copy)."""
    t = m.blobs
    for i in seg.blobs:
        off, n = int(t.starts[i]) - base, int(t.sizes[i])
        kind = t.kind(i)
        if kind == STORAGE:
            values[i] = storage[off:off + n] if n else torch.UntypedStorage(0)
        elif kind == NDARRAY:
            values[i] = flat[off:off + n]
        else:
            values[i] = bytes(memoryview(flat)[off:off + n])


def _take(seg: _Segment, storage: torch.UntypedStorage, base: int, m: Manifest, verify: bool, values: list,
          where: str, uri: str, padding: bool = True) -> None:
    """Check one filled segment and cut its blobs out of it (slices: no copy).

    ``padding=False`` for a segment of selected blobs, whose gaps hold blobs
    that were not selected: only the blobs themselves are checked.
    """
    flat = host_bytes(storage)
    if verify:
        _check(seg, flat, base, m, where, uri, padding)
    _cut(seg, storage, flat, base, m, values)


def read_blobs(store: Store, m: Manifest, verify: bool = True, plan: ReadPlan | None = None,
               defer: list | None = None) -> list[Any]:
    """The blobs of the manifest, read, checked and decompressed (index-aligned with the blob table).

    ``defer``: a list; where the checks can go on after this returns (a mapped local
    file), a callable is appended to it that waits for them and raises what they found.

    All of them, or with a ``plan`` only ``plan.blobs`` (nearby ones in one
    request, nothing else read) and the direct targets straight into their
    tensors' memory. Blobs not read stay None.
    """
    t = m.blobs
    if not t.codec:
        return _read_stored(store, m, verify, plan, defer)
    # Compressed blobs are read apart, a few frames at a time, and decompressed straight into
    # their value's memory (or an into= tensor's); the others as ever. Except on an object
    # store: there the raw storages and arrays between them go in the same runs of reads, so
    # the blobs of a stretch of the stream come in one request, not one request per blob.
    wanted = set(range(len(t))) if plan is None or plan.blobs is None else set(plan.blobs)
    packed = set(wanted) & set(t.codec)
    ds = data_store(store, m)
    if not ds.stream_reads:
        packed |= {b for b in wanted if int(t.sizes[b]) and t.kind(b) in (STORAGE, NDARRAY)}
    rest = dataclasses.replace(plan or ReadPlan(), blobs=wanted - packed)
    values = _read_stored(store, m, verify, rest, defer)
    if not packed:
        return values
    inflate = plan.inflate if plan is not None else {}
    outs: dict[int, np.ndarray] = {}
    for b in sorted(packed):
        if b in inflate:
            outs[b] = host_bytes(_bytes_of(inflate[b].tensor))   # the tensor is the value
        elif t.kind(b) == STORAGE:
            values[b] = torch.UntypedStorage(t.logical_size(b))
            outs[b] = host_bytes(torch.empty(0, dtype=torch.uint8).set_(values[b]))
        else:
            values[b] = outs[b] = np.empty(t.logical_size(b), dtype=np.uint8)
    with StreamReader(ds, m.files) as reader:
        read_compressed(reader, t, sorted(packed), outs, verify, ds.uri, ds.uri,
                        COMPRESSED_READ if ds.stream_reads else ds.read_bytes)
    return values


def _read_stored(store: Store, m: Manifest, verify: bool, plan: ReadPlan | None, defer: list | None) -> list[Any]:
    """``read_blobs`` before decompression: each blob's stored bytes."""
    values: list[Any] = [None] * len(m.blobs)
    store = data_store(store, m)
    where = f"{store.uri}/{m.files[0].name}" if len(m.files) == 1 else store.uri
    partial = plan is not None and (plan.blobs is not None or plan.targets)
    direct = plan.direct if plan is not None else {}
    if direct:
        read_direct(store, m, direct, verify, where)
    wanted = None if not partial else (plan.blobs if plan.blobs is not None else set(range(len(m.blobs))))
    if wanted is None and m.version[0] >= 3:
        # An incremental step's files also hold bytes of other steps: read its blobs' ranges only.
        wanted = set(range(len(m.blobs)))
    if wanted is not None and not wanted:
        return values
    segs = segments(m) if wanted is None else selected_segments(m, wanted)
    if len(m.files) > 1 and m.version[0] >= 3 and _take_mapped_files(store, m, verify, values, where, segs):
        return values
    mapped = store.map_file(m.files[0].name, m.files[0].nbytes, read_ahead=wanted is None) \
        if len(m.files) == 1 else None
    if mapped is not None:
        if wanted is not None:
            # Only the selected runs: read ahead just those.
            for sg in segs:
                store.prefetch(m.files[0].name, sg.start, sg.end - sg.start)
        _take_mapped(mapped, m, verify, values, where, store.uri, store.concurrency, segs, wanted is None, defer)
        return values
    with StreamReader(store, m.files) as reader:
        storages = [torch.UntypedStorage(s.end - s.start) for s in segs]
        ranges, left = [], [0] * len(segs)   # left: reads of each segment still to arrive
        for k, s in enumerate(segs):
            flat = host_bytes(storages[k]) if s.end > s.start else None
            for o in range(s.start, s.end, store.read_bytes):
                n = min(store.read_bytes, s.end - o)
                ranges.append(Range(o, n, memoryview(flat[o - s.start:o - s.start + n]), k))
                left[k] += 1
        whole = wanted is None
        for r, _ in reader.fetch(ranges):
            k = r.tag
            left[k] -= 1
            if not left[k]:
                _take(segs[k], storages[k], segs[k].start, m, verify, values, where, store.uri, whole)
                storages[k] = None   # the blobs hold what they need of it
        for k, s in enumerate(segs):
            if storages[k] is not None:     # a segment of empty blobs only, read by no range
                _take(s, storages[k], s.start, m, verify, values, where, store.uri, whole)
        if whole:
            reader.check_ends()
    return values


STAGE = 64 << 20  # pinned host bytes through which a direct read reaches a GPU tensor
#: stored bytes per read of compressed frames from a disk (about a frame: a few in flight, memory
#: stays small); object stores read ``read_bytes`` at a time, as for any range
COMPRESSED_READ = 1 << 20


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over exactly ``t``'s elements (``t`` contiguous), sharing its memory."""
    n = t.numel() * t.element_size()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() * t.element_size(), (n,))


def read_direct(store: Store, m: Manifest, direct: dict, verify: bool, where: str) -> None:
    """Read each target's blob straight into its tensor's memory, checking its CRC-32C.

    CPU tensors are the read buffers themselves. Others (CUDA) are filled
    through one pinned staging buffer of at most STAGE bytes, a chunk at a
    time, the CRC computed on the staged bytes as they pass.
    """
    t = m.blobs
    store = data_store(store, m)
    step = store.read_bytes
    host = {b: tg for b, tg in direct.items() if tg.tensor.device.type == "cpu"}
    dev = {b: tg for b, tg in direct.items() if tg.tensor.device.type != "cpu"}
    with StreamReader(store, m.files) as reader:
        if host:
            fill = _fill_host_streams if store.stream_reads else _fill_host
            fill(reader, store, m, host, verify, where)
        if dev:
            pinned = torch.cuda.is_available()
            stage = torch.empty(min(STAGE, max(int(t.sizes[b]) for b in dev)), dtype=torch.uint8,
                                pin_memory=pinned)
            flat = stage.numpy()
            for b in sorted(dev, key=lambda b: int(t.starts[b])):
                dst = _bytes_of(dev[b].tensor.detach())
                start, n = int(t.starts[b]), int(t.sizes[b])
                crc = 0
                for o in range(0, n, len(flat)):
                    k = min(len(flat), n - o)
                    ranges = [Range(start + o + p, min(step, k - p), memoryview(flat[p:p + min(step, k - p)]))
                              for p in range(0, k, step)]
                    for _ in reader.fetch(ranges):
                        pass
                    if verify:
                        crc = crc32c.crc32c(memoryview(flat[:k]), crc)
                    dst[o:o + k].copy_(stage[:k])
                if verify and crc != int(t.crcs[b]):
                    raise _crc_mismatch(b, n, start, where, store.uri)


STREAM_READ = 1 << 20    # bytes per read of a streamed run: checksummed while still in the CPU's cache
SMALL_READ = 64 << 10    # blobs below this are read in groups through a scratch buffer


def _fill_host_streams(reader: StreamReader, store: Store, m: Manifest, host: dict, verify: bool,
                       where: str) -> None:
    """Read every host target's blob into its memory as a few long runs of the stream, one per
    thread, each read front to back: the disk sees a few sequential streams its read-ahead
    follows, and each read's CRC-32C is computed at once, while its bytes are still in the
    CPU's cache. A blob cut between two runs is checked by combining the CRCs of its parts."""
    t = m.blobs
    order = sorted(host, key=lambda b: int(t.starts[b]))
    total = sum(int(t.sizes[b]) for b in order)
    workers = max(1, min(max(2, store.concurrency), -(-total // STREAM_READ)))
    share = -(-total // workers)
    runs: list[list[tuple[int, int, int]]] = [[]]      # (blob, offset in it, bytes), in stream order
    filled = 0
    for b in order:
        n, o = int(t.sizes[b]), 0
        while True:
            if filled >= share and len(runs) < workers:
                runs.append([])
                filled = 0
            take = n - o if len(runs) == workers else min(n - o, share - filled)
            runs[-1].append((b, o, take))
            filled, o = filled + take, o + take
            if o >= n:
                break

    def read_run(run: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
        done: list[tuple[int, int, int, int]] = []        # (blob, offset, bytes, CRC-32C)
        scratch: memoryview | None = None
        scratch_at = 0                                    # its address
        i = 0
        while i < len(run):
            b, o, n = run[i]
            start = int(t.starts[b]) + o
            if 0 < n < SMALL_READ and o == 0 and n == int(t.sizes[b]):
                # a group of small whole blobs: one read into scratch, then copied out
                j, end = i + 1, start + n
                while j < len(run):
                    b2, o2, n2 = run[j]
                    s2 = int(t.starts[b2])
                    if not (0 < n2 < SMALL_READ and o2 == 0 and s2 >= end and s2 + n2 - start <= STREAM_READ):
                        break
                    end, j = s2 + n2, j + 1
                if scratch is None:
                    buf = bytearray(STREAM_READ)
                    scratch = memoryview(buf)
                    scratch_at = ctypes.addressof(ctypes.c_char.from_buffer(buf))
                reader.readinto(start, scratch[:end - start])
                for b2, _, n2 in run[i:j]:
                    at = int(t.starts[b2]) - start
                    # straight to the target's address: no array object per small tensor
                    ctypes.memmove(host[b2].tensor.data_ptr(), scratch_at + at, n2)
                    done.append((b2, 0, n2, crc32c.crc32c(scratch[at:at + n2]) if verify else 0))
                i = j
                continue
            crc, dst = 0, host_bytes(host[b].tensor)
            for q in range(o, o + n, STREAM_READ):
                k = min(STREAM_READ, o + n - q)
                view = memoryview(dst[q:q + k])
                reader.readinto(int(t.starts[b]) + q, view)
                if verify:
                    crc = crc32c.crc32c(view, crc)
            done.append((b, o, n, crc))
            i += 1
        return done

    if workers == 1:
        results = [read_run(runs[0])]
    else:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="ckptstore-into") as pool:
            results = list(pool.map(read_run, runs))
    if not verify:
        return
    parts: dict[int, list[tuple[int, int, int]]] = {}
    for done in results:
        for b, o, n, crc in done:
            parts.setdefault(b, []).append((o, n, crc))
    for b, ps in parts.items():
        ps.sort()
        crc = ps[0][2]
        for _, n, c in ps[1:]:
            crc = crc32c_combine(crc, c, n)
        if crc != int(t.crcs[b]):
            raise _crc_mismatch(b, int(t.sizes[b]), int(t.starts[b]), where, store.uri)


def _fill_host(reader: StreamReader, store: Store, m: Manifest, host: dict, verify: bool, where: str) -> None:
    """Read every host target's blob into its memory, chunks in parallel, each blob's CRC-32C
    checked on a worker as soon as its last chunk is in (the disk and the CRC overlap)."""
    t = m.blobs
    step = store.read_bytes
    flats = {b: host_bytes(tg.tensor) for b, tg in host.items()}
    order = sorted(host, key=lambda b: int(t.starts[b]))
    lock = threading.Lock()
    runs: list[list[int]] = []       # the targets' stream ranges, adjacent ones merged
    for b in order:
        s, n = int(t.starts[b]), int(t.sizes[b])
        if runs and s - runs[-1][1] <= COALESCE:
            runs[-1][1] = max(runs[-1][1], s + n)
        else:
            runs.append([s, s + n])
    for s, e in runs:
        reader.advise(s, e - s)
    # Work items of about one read each: a chunk of a big blob, or several small blobs whole
    # (one task per blob would cost more than reading it with 100,000 tensors).
    items: list[list[tuple[int, int, int]]] = []     # (blob, offset in it, bytes)
    filling = 0                                      # bytes in items[-1] while it gathers small blobs
    left: dict[int, int] = {}                        # per blob: pieces still to arrive
    for b in order:
        n = int(t.sizes[b])
        if n > step:
            items.extend([(b, o, min(step, n - o))] for o in range(0, n, step))
            left[b], filling = len(range(0, n, step)), step
        else:
            if not items or filling + n > step:
                items.append([])
                filling = 0
            items[-1].append((b, 0, n))
            left[b], filling = 1, filling + n
    with cf.ThreadPoolExecutor(max(2, store.concurrency), thread_name_prefix="ckptstore-into") as pool:
        checks: list[cf.Future] = []

        def read(item: list[tuple[int, int, int]]) -> None:
            for b, o, n in item:
                reader.readinto(int(t.starts[b]) + o, memoryview(flats[b][o:o + n]))
            with lock:
                done = []
                for b, _, _ in item:
                    left[b] -= 1
                    if not left[b]:
                        done.append(b)
            if verify:
                for b in done:
                    if int(t.sizes[b]) > step:   # checked on another worker while reads go on
                        checks.append(pool.submit(_check_blob, memoryview(flats[b]), b, m, where, store.uri))
                    else:
                        _check_blob(memoryview(flats[b]), b, m, where, store.uri)

        reads = [pool.submit(read, item) for item in items]
        for f in reads:
            f.result()
        for f in checks:
            f.result()


def _crc_mismatch(b: int, n: int, start: int, where: str, uri: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: CRC-32C mismatch in blob {b} ({n} bytes at stream byte {start}); the checkpoint is corrupt", uri)


def _check_blob(view: memoryview, b: int, m: Manifest, where: str, uri: str) -> None:
    if crc32c.crc32c(view) != int(m.blobs.crcs[b]):
        raise _crc_mismatch(b, len(view), int(m.blobs.starts[b]), where, uri)


def _take_mapped(big: torch.UntypedStorage, m: Manifest, verify: bool, values: list, where: str, uri: str,
                 workers: int, segs: list | None = None, whole: bool = True, defer: list | None = None) -> None:
    """Blobs as slices of a private (copy-on-write) mapping of a local data file.

    No allocation, no copy: the kernel reads the file into the page cache and
    the tensors use those pages until they are written to. Checking the CRCs
    is what reads the file; segments are checked in parallel, so page faults
    and CRCs proceed on every core at once. Without verify, pages load when
    first touched.

    ``defer``: a list to which a callable is appended that waits for the checks and
    raises what they found; the slices are cut at once, so the caller can build the
    state while the disk is still read, and must call it before handing anything out.
    """
    segs = segments(m) if segs is None else segs
    flat = host_bytes(big)
    if not verify:
        for s in segs:
            _cut(s, big, flat, 0, m, values)
        return
    stop = threading.Event()
    filler = None
    if whole:
        filler = threading.Thread(target=_populate, args=(big.data_ptr(), big.nbytes(), stop),
                                  name="ckptstore-populate", daemon=True)
        filler.start()
    # no more checking threads than cores: more only contend for the GIL between their CRCs
    pool = cf.ThreadPoolExecutor(max(2, min(workers, os.cpu_count() or 2)), thread_name_prefix="ckptstore-crc")
    futures = [pool.submit(_check, s, flat, 0, m, where, uri, whole) for s in segs]

    def finish() -> None:
        try:
            for fut in futures:
                fut.result()
        finally:
            stop.set()
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True)
            if filler is not None:
                filler.join()

    try:
        for s in segs:
            _cut(s, big, flat, 0, m, values)
    except BaseException:
        finish()
        raise
    if defer is None:
        finish()
    else:
        defer.append(finish)


_MADV_POPULATE_READ = 22  # Linux 5.14+
POPULATE = 8 << 20


def _populate(addr: int, nbytes: int, stop: threading.Event) -> None:
    """Fault a mapping in, front to back, while the CRC threads walk it: the disk then reads one
    stream in order, however far apart the threads' segments lie. Stops quietly where the
    kernel has no MADV_POPULATE_READ (the threads' own faults then do the reading)."""
    import ctypes
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for off in range(0, nbytes, POPULATE):
        if stop.is_set() or madvise(addr + off, min(POPULATE, nbytes - off), _MADV_POPULATE_READ) != 0:
            return


def _take_mapped_files(store: Store, m: Manifest, verify: bool, values: list, where: str, segs: list) -> bool:
    """An incremental step on a local disk: each segment as slices of a private mapping of the
    one shared file it lies in (as ``_take_mapped`` does for one file). False, having read
    nothing, where some segment spans two files or the store cannot map them."""
    starts = m.file_starts()
    home = []
    for sg in segs:
        k = int(np.searchsorted(starts, sg.start, side="right")) - 1
        if not 0 <= k < len(m.files) or sg.end > starts[k + 1]:
            return False
        home.append(k)
    needed: dict[int, int] = {}
    for sg, k in zip(segs, home):
        needed[k] = needed.get(k, 0) + sg.end - sg.start
    maps: dict[int, Any] = {}
    whole: set[int] = set()
    for k in sorted(needed):
        # Most of a file needed: read all of it ahead, as for a plain checkpoint; else only the segments.
        ahead = 2 * needed[k] >= m.files[k].nbytes
        mapped = store.map_file(m.files[k].name, m.files[k].nbytes, read_ahead=ahead)
        if mapped is None:
            return False
        maps[k] = mapped
        if ahead:
            whole.add(k)
    for sg, k in zip(segs, home):
        if k not in whole:
            store.prefetch(m.files[k].name, sg.start - starts[k], sg.end - sg.start)
    with cf.ThreadPoolExecutor(max(2, store.concurrency), thread_name_prefix="ckptstore-crc") as pool:
        for fut in [pool.submit(_take, sg, maps[k], starts[k], m, verify, values, where, store.uri, False)
                    for sg, k in zip(segs, home)]:
            fut.result()
    return True


def check_devices(m: Manifest, plan: ReadPlan | None, map_location) -> None:
    """Before a byte is read: every storage the load places must go to a device this machine
    has, else DeviceUnavailableError naming it (a caller's or machine's problem, not corruption).

    Storages read into ``into=`` tensors go where those tensors are, and are not checked.
    """
    t = m.blobs
    if tree.is_placement_function(map_location) or (map_location is None and t.all_on_cpu):
        return      # only calling a function tells where it places a storage
    skip = {tg.blob for tg in plan.targets} | plan.shard_blobs if plan is not None else set()
    wanted = range(len(t)) if plan is None or plan.blobs is None else plan.blobs
    seen: set[str] = set()
    with record_checks("blob devices"):
        for i in wanted:
            if i in skip or t.kind(i) != STORAGE or (loc := t.device_of(i)) in seen:
                continue
            seen.add(loc)
            device = tree.target_device(loc, map_location)
            if device is not None:
                tree.check_device(device, loc)
            if len(seen) == len(t.devices):
                break


def build_state(m: Manifest, values: list[Any], map_location=None, allow_pickle: bool = False,
                plan: ReadPlan | None = None) -> Any:
    t = m.blobs

    def blob_values(map_location) -> Any:
        placed: dict[int, Any] = {}

        def blob_value(i: Any, kind: str) -> Any:
            if type(i) is not int or not (0 <= i < len(values)):
                raise CorruptCheckpointError(f"malformed checkpoint structure: blob {i!r:.40} does not exist")
            if t.kind(i) != kind:
                raise CorruptCheckpointError(
                    f"malformed checkpoint structure: blob {i} holds {t.kind(i)}, not {kind}")
            if i not in placed:
                v = values[i]
                if kind == STORAGE:
                    if map_location is not None or not t.all_on_cpu:
                        v = tree.restore_location(v, t.device_of(i), map_location)
                elif kind != NDARRAY:
                    v = bytes(v)
                placed[i] = v
            return placed[i]
        return blob_value

    blob_value = blob_values(map_location)
    version = m.version[0]
    ranks = plan.ranks if plan is not None else None
    if plan is None or (plan.needed is None and not plan.targets and not plan.shard_targets):
        return tree.decode(m.nodes, blob_value, allow_pickle=allow_pickle, version=version, ranks=ranks)
    given: dict[int, Any] = {}
    for st in plan.shard_targets:
        # each overlapping stored shard built where the part it fills is, and its box copied in
        built: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for p in st.pieces:
                key = (p.node, p.local.device)
                if key not in built:
                    built[key] = tree.decode(m.nodes, blob_values(p.local.device), version=version,
                                             needed={p.node}, root=p.node)
                src = shards.box(built[key], p.node_at, p.at, p.shape)
                shards.box(p.local, p.local_at, p.at, p.shape).copy_(src)
        given[st.node] = st.tensor
    for tg in plan.targets:
        if not tg.direct and not tg.inflate:
            # A view or a shared storage: build the saved tensor where the target is, copy it in.
            saved = tree.decode(m.nodes, blob_values(tg.tensor.device), version=version, needed={tg.node},
                                root=tg.node)
            with torch.no_grad():
                tg.tensor.copy_(saved)
        given[tg.node] = tg.tensor
    return tree.decode(m.nodes, blob_value, allow_pickle=allow_pickle, version=version, needed=plan.needed,
                       partial=plan.partial, placed=given, ranks=ranks)


#: The stream's read windows together hold at most 1/BUFFER_SHARE of the bytes streamed
#: (but windows are at least MIN_WINDOW, and at most the store's ``read_bytes``).
BUFFER_SHARE = 32
MIN_WINDOW = 1 << 20
#: How far ahead of the window being read the store is asked to read (``Store.prefetch``:
#: posix_fadvise WILLNEED on a local disk, so the disk streams while windows are copied),
#: in steps of ADVISE_STEP.
READ_AHEAD = 512 << 20
ADVISE_STEP = 64 << 20
#: Blobs closer than this in the data stream are read ahead as one range (the gap is padding).
ADVISE_GAP = 64 << 10


def stream_blob(store: Store, m: Manifest, b: int, sink, verify: bool = True) -> int:
    """Hand blob ``b``'s bytes to ``sink(memoryview)`` in order (each done with when it returns);
    see ``stream_blobs``."""
    def put(data: memoryview, release) -> None:
        sink(data)
        release()
    return stream_blobs(store, m, [b], put, verify=verify)


def stream_blobs(store: Store, m: Manifest, blobs: list[int], put, verify: bool = True, held: int = 0,
                 stop=lambda: False) -> int:
    """Hand the bytes of each blob in ``blobs`` to ``put(memoryview, release)``, in order, a
    read window at a time; returns the bytes handed over.

    One reader keeps ``Store.concurrency`` reads in flight across blob boundaries, into a
    ring of windows: memory stays at the ring whatever the sizes (at most 1/BUFFER_SHARE of
    the bytes streamed, windows of MIN_WINDOW to ``Store.read_bytes``). ``put``'s consumer
    calls ``release()`` once done with a window, which is then read into again; it may hold
    up to ``held`` windows at once (a write-behind thread). The store is asked to read ahead
    up to READ_AHEAD. Each blob's CRC-32C is checked once its last window has been read,
    before that window is handed over, so a consumer must treat what it got as provisional
    until this returns (write to a staging file). ``stop()`` true ends the stream early.
    """
    t = m.blobs
    store = data_store(store, m)
    for b in blobs:
        if type(b) is not int or not 0 <= b < len(t) or int(t.starts[b]) < 0 or int(t.sizes[b]) < 0:
            raise CorruptCheckpointError(
                f"{store.uri}: malformed checkpoint structure: blob {b!r:.40} does not exist", store.uri)
    if verify:
        for b in blobs:     # an empty blob passes no bytes: its CRC is that of nothing
            if not int(t.sizes[b]) and int(t.crcs[b]) != 0:
                raise _crc_mismatch(b, 0, int(t.starts[b]), store.uri, store.uri)
    total = sum(int(t.sizes[b]) for b in blobs)
    if not total:
        return 0
    logical = sum(t.logical_size(b) for b in blobs)
    depth = max(1, store.concurrency)
    slots = depth + 1 + held
    window = max(1, min(store.read_bytes, max(MIN_WINDOW, total // BUFFER_SHARE // slots), total))
    ring = [memoryview(bytearray(window)) for _ in range(slots)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(slots):
        free.put(i)

    def ranges(reader: StreamReader) -> Iterator[Range]:
        hints = _read_ahead(t, blobs)
        hint = next(hints, None)
        at = 0
        for b in blobs:
            start, n = int(t.starts[b]), int(t.sizes[b])
            for o in range(0, n, window):
                while hint is not None and hint[0] < at + READ_AHEAD:
                    reader.advise(hint[1], hint[2])
                    hint = next(hints, None)
                k = min(window, n - o)
                slot = free.get()          # waits until the consumer has released one
                yield Range(start + o, k, ring[slot][:k], (b, o + k == n, slot))
                at += k

    crc = 0
    inflate: FrameStream | None = None     # the compressed blob being streamed
    with StreamReader(store, m.files) as reader, contextlib.closing(reader.fetch(ranges(reader), depth)) as got:
        for r, data in got:
            b, last, slot = r.tag
            if verify:
                crc = crc32c.crc32c(data, crc)
                if last and crc != int(t.crcs[b]):
                    raise _crc_mismatch(b, int(t.sizes[b]), int(t.starts[b]), store.uri, store.uri)
            if last:
                crc = 0
            frames = t.frames_of(b)
            if frames is None:
                put(data, functools.partial(free.put, slot))
            else:
                # Its own bytes, a frame at a time: the window is free again once fed.
                if inflate is None:
                    inflate = FrameStream(frames, t.frame, f"{store.uri}: blob {b}", store.uri)
                done = inflate.feed(data)
                free.put(slot)
                for frame in done:
                    put(memoryview(frame), _nothing)
                if last:
                    inflate = None
            if stop():
                break
    return logical


def _nothing() -> None:
    pass


def _read_ahead(t, blobs: list[int]) -> Iterator[tuple[int, int, int]]:
    """(bytes streamed before it, stream offset, length) of each piece to read ahead: the
    blobs' ranges, neighbours merged, cut in ADVISE_STEP pieces."""
    extents: list[list[int]] = []
    at = 0
    for b in blobs:
        start, n = int(t.starts[b]), int(t.sizes[b])
        last = extents[-1] if extents else None
        if last is not None and last[1] + last[2] <= start <= last[1] + last[2] + ADVISE_GAP:
            last[2] = start + n - last[1]
        elif n:
            extents.append([at, start, n])
        at += n
    for at, start, n in extents:
        for o in range(0, n, ADVISE_STEP):
            yield at + o, start + o, min(ADVISE_STEP, n - o)


def load_committed(store: Store, *, map_location=None, verify: bool = True, allow_pickle: bool = False,
                   select: Any = None, into: Any = None) -> Any:
    """The state committed at ``store``: commit found, pickles refused before any data is read, every byte checked.

    ``select`` / ``into``: see plan.ReadPlan; every path, shape and dtype is
    checked from the record before any data is read.
    """
    m, _ = open_commit(store)
    return load_manifest(store, m, map_location=map_location, verify=verify, allow_pickle=allow_pickle,
                         select=select, into=into)


def load_manifest(store: Store, m: Manifest, *, map_location=None, verify: bool = True, allow_pickle: bool = False,
                  select: Any = None, into: Any = None, into_prefix: tuple = (), ranks: Any = None) -> Any:
    """What ``m`` (a commit record of ``store`` already read) holds, or the selected part of it.
    ``ranks``: the reader's (rank, world size) in a multi-rank restore (values saved per rank)."""
    plan = ReadPlan.make(m, select, into, into_prefix, ranks)
    if not allow_pickle and m.pickled:
        tree.refuse_pickle(m.nodes if plan.needed is None else [m.nodes[i] for i in plan.needed])
    check_devices(m, plan, map_location)
    pending: list = []      # the checks still running while the state is built
    try:
        values = read_blobs(store, m, verify=verify, plan=plan, defer=pending)
        state = build_state(m, values, map_location=map_location, allow_pickle=allow_pickle, plan=plan)
    finally:
        for finish in pending:
            finish()
    return state


# ---------------------------------------------------------------- verification

def verify_store(store: Store, deep: bool) -> VerifyReport:
    """Check the committed checkpoint at ``store``; problems are reported, never raised.

    Shallow: the newest intact record, its data files present with their sizes, and the
    record's structure checked as ``load`` checks it (``structure_problems``: no data read).
    Deep, on top: every byte of every listed data file read once, checking each file's
    CRC-32C, each blob's CRC-32C (and xxh3-128 in version 3) and, in versions 1 and 2, that
    the padding between blobs is zero (``data_problems``). So whatever ``load`` refuses as
    corrupt, ``verify(deep=True)`` reports; it also reports what ``load`` does not check
    (a whole file's CRC-32C, a blob's xxh3-128).
    """
    listing = store.list()
    if not listing or not commit_generations(listing):
        raise CheckpointNotFoundError(f"no committed checkpoint at {store.uri}", store.uri)
    try:
        found = find_commit(store, listing)
    except FormatTooNewError as e:
        return VerifyReport(False, [str(e)], 0, uri=store.uri, deep=deep)
    if found.manifest is None:
        return VerifyReport(False, found.problems, 0, uri=store.uri, deep=deep)
    m = found.manifest
    problems = structure_problems(m)
    if deep:
        problems += data_problems(store, m)
    return VerifyReport(not problems, problems, m.nbytes, uri=store.uri, deep=deep, generation=m.generation)


def structure_problems(m: Manifest) -> list[str]:
    """What ``load`` refuses in the record's structure, found without reading data.

    The load path itself runs, over stand-ins for the blobs: the recorded devices are
    parsed as ``check_devices`` parses them (a device string that names no device is
    corrupt; one this machine lacks is not), and ``build_state`` decodes the whole node
    table with every check of the decoder (kinds, children, parents, dtypes, shapes,
    strides, views inside their storages, ndarray sizes, blob kinds) against stand-ins of
    each blob's recorded size: storages on the meta device, an ndarray over untouched
    anonymous memory, a pickle of ``None`` for a pickle blob (nothing stored is unpickled).
    Time and memory linear in the record.
    """
    try:
        t = m.blobs
        with record_checks("blob devices"):
            if not t.all_on_cpu:
                for loc in {t.device_of(i) for i in range(len(t)) if t.kind(i) == STORAGE}:
                    tree.target_device(loc, None)
        # all on the CPU: the stand-ins are used as they are, as load uses what it read
        plan = ReadPlan(ranks=tree.ALL_RANKS) if m.version[0] >= 4 else None
        build_state(m, _stand_ins(m), map_location=None if t.all_on_cpu else "meta", allow_pickle=True, plan=plan)
    except CorruptCheckpointError as e:
        return [str(e)]
    return []


def _stand_ins(m: Manifest) -> list[Any]:
    """A value per blob with the blob's recorded size and kind, holding none of its bytes."""
    import mmap
    import pickle

    from .format.manifest import PICKLE

    t = m.blobs
    sizes = t.logical_sizes.tolist()
    arrays = [n for i, n in enumerate(sizes) if n and t.kind(i) == NDARRAY]
    zeros = np.zeros(0, np.uint8)
    if arrays:
        # One anonymous mapping as long as the largest ndarray blob (which lies inside the
        # data files, so no longer than they are), never touched: no memory is used.
        try:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            zeros = np.frombuffer(mmap.mmap(-1, max(arrays), flags=flags, prot=mmap.PROT_READ), np.uint8)
        except (AttributeError, OSError, ValueError):     # no anonymous mappings here: calloc'd pages
            zeros = np.zeros(max(arrays), np.uint8)
    none = pickle.dumps(None)
    storages: dict[int, torch.UntypedStorage] = {}   # one meta storage per size serves every blob of it
    out: list[Any] = []
    for i, n in enumerate(sizes):
        kind = t.kind(i)
        if kind == STORAGE:
            if n not in storages:
                storages[n] = torch.UntypedStorage(n, device="meta")
            out.append(storages[n])
        elif kind == NDARRAY:
            out.append(zeros[:n])
        elif kind == PICKLE:
            out.append(none)
        else:
            out.append(b"")
    return out


_MAX_LISTED = 20   # blob problems listed one by one; the rest counted


def data_problems(store: Store, m: Manifest) -> list[str]:
    """Every byte of ``m``'s data files read once, in stream order, a few reads in flight.

    Checks each file's CRC-32C and length, each blob's CRC-32C (what ``load`` checks),
    each blob's xxh3-128 in version 3 (what ``load`` does not), and in versions 1 and 2
    that every byte outside the blobs is zero (what ``load`` checks; in version 3 the
    files hold other steps' blobs). Memory: a ring of read buffers, whatever the sizes.
    """
    import xxhash

    ds = data_store(store, m)
    t = m.blobs
    problems: list[str] = []
    blob_problems = 0
    starts, sizes, crcs = t.starts.tolist(), t.sizes.tolist(), t.crcs.tolist()
    hashed = m.version[0] >= 3 and t.hashes is not None
    padded = m.version[0] < 3
    order = [i for i in np.argsort(t.starts, kind="stable").tolist() if sizes[i]]   # blobs do not overlap
    step, depth = ds.read_bytes, max(1, ds.concurrency)
    longest = max((f.nbytes for f in m.files), default=0)
    ring = [memoryview(bytearray(min(step, longest))) for _ in range(depth + 1)] if longest else []
    file_starts = m.file_starts()

    def blob_problem(msg: str) -> None:
        nonlocal blob_problems
        blob_problems += 1
        if blob_problems <= _MAX_LISTED:
            problems.append(msg)

    def ranges():
        n = 0
        for k, f in enumerate(m.files):
            for o in range(0, f.nbytes, step):
                size = min(step, f.nbytes - o)
                yield Range(file_starts[k] + o, size, ring[n % len(ring)][:size], (k, o + size == f.nbytes))
                n += 1

    def finish(i: int, crc: int, h) -> None:
        if crc != crcs[i]:
            blob_problem(f"blob {i} ({sizes[i]} bytes at stream byte {starts[i]}): CRC-32C {crc:08x}, "
                         f"the commit record says {crcs[i]:08x}")
        elif getattr(h, "error", None):
            blob_problem(f"blob {i} ({sizes[i]} bytes at stream byte {starts[i]}): {h.error}")
        elif h is not None and h.digest() != t.hash_of(i):
            blob_problem(f"blob {i} ({sizes[i]} bytes at stream byte {starts[i]}): xxh3-128 {h.hexdigest()}, "
                         f"the commit record says {t.hash_of(i).hex()}")

    file_crc = [0] * len(m.files)
    bad_padding = None
    j, cur = 0, None          # next blob of ``order``; the blob being read: [index, crc, hasher]
    try:
        with StreamReader(ds, m.files) as reader:
            for r, data in reader.fetch(ranges(), concurrency=depth):
                k, last = r.tag
                file_crc[k] = crc32c.crc32c(data, file_crc[k])
                if last and file_crc[k] != m.files[k].crc32c:
                    problems.append(f"data file {m.files[k].name}: CRC-32C {file_crc[k]:08x}, the commit record "
                                    f"says {m.files[k].crc32c:08x}")
                a, b = r.start, r.start + r.nbytes
                pos = a
                while pos < b:
                    if cur is None:
                        s = starts[order[j]] if j < len(order) else b
                        gap_end = min(s, b)
                        if padded and bad_padding is None and gap_end > pos and \
                                np.frombuffer(data, np.uint8, gap_end - pos, pos - a).any():
                            bad_padding = pos + int(np.flatnonzero(np.frombuffer(data, np.uint8, gap_end - pos,
                                                                                 pos - a))[0])
                        pos = gap_end
                        if s >= b:
                            break
                        frames = t.frames_of(order[j])
                        cur = [order[j], 0, None if not hashed else xxhash.xxh3_128() if frames is None
                               else FrameHasher(frames, t.frame, f"blob {order[j]}")]
                        j += 1
                    i = cur[0]
                    hi = min(starts[i] + sizes[i], b)
                    piece = data[pos - a:hi - a]
                    cur[1] = crc32c.crc32c(piece, cur[1])
                    if cur[2] is not None:
                        cur[2].update(piece)
                    pos = hi
                    if hi == starts[i] + sizes[i]:
                        finish(*cur)
                        cur = None
            reader.check_ends()
    except CheckpointNotFoundError as e:
        problems.append(f"a data file is missing: {e}")
        return problems
    except CorruptCheckpointError as e:
        problems.append(str(e))
        return problems
    empty_hash = xxhash.xxh3_128().digest()
    for i, n in enumerate(sizes):   # an empty blob passes no bytes: its checksums are those of nothing
        if not n:
            finish(i, 0, None)
            if hashed and t.hash_of(i) != empty_hash:
                blob_problem(f"blob {i} (0 bytes): xxh3-128 is not that of no bytes")
    if bad_padding is not None:
        problems.append(f"padding at stream byte {bad_padding} is not zero")
    if blob_problems > _MAX_LISTED:
        problems.append(f"and {blob_problems - _MAX_LISTED} more blob problems")
    return problems
