"""Save: encoded blobs -> data files -> read-back check -> commit -> retire the old.

Tensor bytes go from tensor memory to storage in chunks of a few tens of
MiB (CUDA storages through one pinned staging buffer), so a save never holds
a second copy of the state. CRC-32C of each blob and of each file is computed
on the way, in a helper thread that overlaps with the write of the same chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
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
    ALIGN, COMMIT_SUFFIX, TMP_SUFFIX, FileName, Manifest, commit_name, crc_hex, data_name, new_generation,
)
from .checksum import stored_crc32c
from .stores.base import CHUNK, Store

_ZEROS = bytes(ALIGN)


@dataclass
class _Planned:
    index: int
    blob: tree.Blob
    file: int
    offset: int


def _plan(blobs: list[tree.Blob], file_bytes: int | None) -> tuple[list[list[_Planned]], list[int]]:
    """Assign blobs to data files and aligned offsets, in order."""
    files: list[list[_Planned]] = [[]]
    sizes = [0]
    for i, b in enumerate(blobs):
        pos = sizes[-1]
        if file_bytes and pos > 0 and pos + b.nbytes > file_bytes:
            files.append([])
            sizes.append(0)
            pos = 0
        start = -(-pos // ALIGN) * ALIGN
        files[-1].append(_Planned(i, b, len(files) - 1, start))
        sizes[-1] = start + b.nbytes
    return files, sizes


def blob_chunks(blob: tree.Blob, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The blob's bytes as memoryviews of at most ``chunk`` bytes, without copying CPU data."""
    if blob.nbytes == 0:
        return
    if blob.kind == tree.STORAGE:
        storage: torch.UntypedStorage = blob.source
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


def _crc2(chunk: memoryview, a: int, b: int) -> tuple[int, int]:
    return crc32c.crc32c(chunk, a), crc32c.crc32c(chunk, b)


def _write_file(store: Store, name: str, planned: list[_Planned], size: int,
                blob_crcs: dict[int, int], pool: cf.ThreadPoolExecutor, bar) -> int:
    """Write one data file; returns its CRC-32C."""
    w = store.open_writer(name)
    try:
        file_crc, pos = 0, 0
        for p in planned:
            if p.offset > pos:
                pad = memoryview(_ZEROS)[: p.offset - pos]
                file_crc = crc32c.crc32c(pad, file_crc)
                w.write(pad)
                pos = p.offset
            blob_crc = 0
            for chunk in blob_chunks(p.blob):
                fut = pool.submit(_crc2, chunk, blob_crc, file_crc)
                w.write(chunk)
                blob_crc, file_crc = fut.result()
                pos += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            blob_crcs[p.index] = blob_crc
        if pos != size:
            raise CheckpointError(f"{store.uri}: internal error: wrote {pos} bytes of {name}, planned {size}")
        w.close()
    except BaseException:
        w.abort()
        raise
    return file_crc


def retire_older(store: Store, gen: str, listing: dict) -> None:
    """Remove every generation older than ``gen`` in ``listing``: commit records first, then data.

    The listing taken before the save names every older generation; one a
    concurrent writer added meanwhile is left for ``gc``.
    """
    records, rest = [], []
    for name in listing:
        f = FileName.parse(name)
        if f is None or f.gen >= gen:
            continue
        (records if f.role == "commit" else rest).append(name)
    store.remove(sorted(records))
    store.remove(sorted(rest))


@dataclass
class Written:
    manifest: Manifest
    strategy: str
    seconds: float


def write_checkpoint(store: Store, strategy, state: Any, *, overwrite: bool, verify: bool,
                     allow_pickle: bool, progress: bool, meta: dict | None = None,
                     has_commit=None) -> Written:
    """The whole save. ``has_commit(store, listing)`` says if a checkpoint is already committed there."""
    t0 = time.perf_counter()
    nodes, blobs = tree.encode(state, allow_pickle=allow_pickle)   # refuses before any I/O

    if store.is_file():
        raise CheckpointExistsError(
            f"{store.uri} is a file, not a ckptstore checkpoint directory; remove it or save elsewhere",
            store.uri)
    listing = store.list()
    if not overwrite and listing and has_commit is not None and has_commit(store, listing):
        raise CheckpointExistsError(f"{store.uri}: a checkpoint is already committed here (overwrite=False)",
                                    store.uri)
    files, sizes = _plan(blobs, store.file_bytes)
    total = sum(sizes)
    free = store.free_bytes()
    if free is not None and total > free:
        raise InsufficientSpaceError(
            f"{store.uri}: the checkpoint needs {total} bytes but only {free} are free; "
            "free space or choose another location", store.uri)
    store.makedirs()

    gen = new_generation([f.gen for f in map(FileName.parse, listing or {}) if f is not None])
    names = [data_name(gen, k) for k in range(len(files))]
    written: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"saving {store.uri}", leave=False)
    try:
        blob_crcs: dict[int, int] = {}
        file_entries = []
        with cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-crc") as pool:
            for k, planned in enumerate(files):
                written.append(names[k])
                crc = _write_file(store, names[k], planned, sizes[k], blob_crcs, pool, bar)
                file_entries.append({"name": names[k], "nbytes": sizes[k], "crc32c": crc_hex(crc)})
        if verify:
            for entry in file_entries:
                stored = stored_crc32c(store, entry["name"], entry["nbytes"])
                if crc_hex(stored) != entry["crc32c"]:
                    raise CorruptCheckpointError(
                        f"{store.uri}/{entry['name']}: read back with CRC-32C {crc_hex(stored)}, "
                        f"written as {entry['crc32c']}; nothing was committed", store.uri)
        blob_entries = []
        for planned in files:
            for p in planned:
                blob_entries.append({"file": p.file, "offset": p.offset, "nbytes": p.blob.nbytes,
                                     "crc32c": crc_hex(blob_crcs[p.index]), "kind": p.blob.kind,
                                     "device": p.blob.device})
        manifest = Manifest(
            generation=gen, files=file_entries, blobs=blob_entries, nodes=nodes, meta=meta or {},
            writer={"ckptstore": __version__, "torch": torch.__version__.split("+")[0]},
        )
        if not overwrite and has_commit is not None:
            now = store.list()
            if now and has_commit(store, now):
                raise CheckpointExistsError(
                    f"{store.uri}: another writer committed a checkpoint here first (overwrite=False)", store.uri)
        record = commit_name(gen)
        written.append(record)
        strategy.publish(store, record, manifest.to_bytes())
    except BaseException:
        _discard(store, written)
        raise
    finally:
        if bar is not None:
            bar.close()
    # Committed. What is older is now garbage; failing to remove it is harmless.
    try:
        retire_older(store, gen, listing or {})
    except CheckpointError:
        pass
    return Written(manifest, strategy.name, time.perf_counter() - t0)


def _discard(store: Store, names: list[str]) -> None:
    try:
        store.remove(list(reversed(names)) + [n + TMP_SUFFIX for n in names if n.endswith(COMMIT_SUFFIX)])
    except BaseException:  # noqa: BLE001 - the original error matters more
        pass
