"""The generation transaction: the one sequence under every write of a checkpoint.

``save``, ``cp``, the manager and the DCP writer all go through
``Generation``, in this order:

1. ``Generation.begin(store, overwrite=, nbytes=)``: list the directory once,
   refuse a location that is a file, refuse early when ``overwrite=False``
   and a checkpoint is committed, check the free space, create the
   directory, pick the new generation id. (A rank of a distributed save
   ``join``s the coordinator's generation instead: it writes files, never
   commits.)
2. Write data files under ``data_name(k)``, naming each in ``written``
   before it is started (``datafiles.write_files`` does), so a failure
   discards exactly what exists.
3. ``commit(manifest)``: with ``overwrite=False``, check again and take the
   exclusive claim; publish the record with the store's commit strategy
   (rename or marker). Any failure up to here discards everything written.
4. Retire the generations the listing of step 1 named (commit records
   first, then data). The checkpoint is committed by then, so a failure to
   retire is harmless: what is left is garbage ``ckptstore gc`` removes.

``remove_files`` is the one way files of generations are removed, by
retirement, retention, gc and the Lightning plugin alike: commit records
first, then data, so a removal cut short never leaves a record whose data is
gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import torch

from ._version import __version__
from .commit import choose
from .compress import check_compression, compress_blobs, compresses
from .datafiles import blob_table, plan, write_files
from .errors import CheckpointError, CheckpointExistsError, ClaimHeldError, FormatTooNewError, InsufficientSpaceError
from .format import tree
from .format.manifest import (
    CLAIM_NAME, COMMIT_SUFFIX, COMPRESSED_MAJOR, FORMAT_MAJOR, FORMAT_MINOR, TMP_SUFFIX, FileName, Manifest,
    commit_generations, commit_name, data_name, new_generation,
)
from .info import CheckpointInfo
from .reader import find_commit
from .stores.base import Store

log = logging.getLogger("ckptstore")

# A save with overwrite=False publishes only after creating this file with
# an exclusive create, so of two writers of the same new checkpoint one
# commits and the other gets CheckpointExistsError. It is removed once the
# commit is in place. One left by a writer that died in between is taken over
# at once when that writer provably is gone (it ran on this machine, in this
# boot and PID namespace, and its process no longer exists), else once it is
# older than CLAIM_STALE seconds: a claim is held only from the last check to
# the commit record's publication, so a live writer never holds one that long.
CLAIM_STALE = 60.0


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def _machine() -> dict:
    """What identifies this process across processes of this machine: boot, PID namespace,
    PID and the process's start time (a reused PID has another)."""
    out: dict = {}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot"] = f.read().strip()
        out["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    pid = os.getpid()
    start = _process_start(pid)
    if start is None:
        return {}
    out.update(pid=pid, start=start)
    return out


def claim_owner_gone(body: bytes) -> bool:
    """Whether the writer that wrote claim ``body`` is provably no longer running."""
    try:
        owner = json.loads(body).get("owner") or {}
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False
    me = _machine()
    if not me or not isinstance(owner, dict) or owner.get("boot") != me["boot"] or owner.get("pidns") != me["pidns"]:
        return False      # another machine, boot or namespace: only the lease can tell
    pid = owner.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    return _process_start(pid) != owner.get("start")


def writer_fields(**extra: Any) -> dict:
    """The record's ``writer`` object: who wrote it (informative)."""
    return {"ckptstore": __version__, "torch": torch.__version__.split("+")[0], **extra}


def has_commit(store: Store, listing: dict) -> bool:
    """Whether a checkpoint is committed in ``listing`` (one of a newer format counts)."""
    try:
        return find_commit(store, listing).manifest is not None
    except FormatTooNewError:
        return True


def remove_files(store: Store, names) -> None:
    """Remove ``names`` from ``store``: commit records first, then everything else."""
    names = set(names)
    records = sorted(n for n in names if (f := FileName.parse(n)) is not None and f.is_record)
    rest = sorted(names.difference(records))
    if records:
        store.remove(records)
    if rest:
        store.remove(rest)


class Generation:
    """One new generation of one checkpoint directory (see the module docstring for the sequence)."""

    def __init__(self, store: Store, gen: str, listing: dict, *, overwrite: bool = True, strategy=None):
        self.store, self.id, self.listing = store, gen, listing
        self.overwrite = overwrite
        self.strategy = strategy
        self.written: list[str] = []
        self.committed = False
        self._claimed = False

    @classmethod
    def begin(cls, store: Store, *, overwrite: bool = True, nbytes: int | None = None,
              after: str | None = None) -> "Generation":
        """A new generation of ``store``, its id past every one there. ``after``: the id sorts
        right after that generation (and the others), not at the clock: a rewrite of a
        committed generation (thinning) keeps its place in the order of commits."""
        strategy = choose(store, store.location.commit)
        if store.is_file():
            raise CheckpointExistsError(
                f"{store.uri} is a file, not a ckptstore checkpoint directory; remove it or save elsewhere",
                store.uri)
        listing = store.list() or {}
        if not overwrite and listing and has_commit(store, listing):
            raise CheckpointExistsError(f"{store.uri}: a checkpoint is already committed here (overwrite=False)",
                                        store.uri)
        gens = [f.gen for f in map(FileName.parse, listing) if f is not None]
        gen_id = new_generation(gens) if after is None else new_generation(gens + [after], now=0)
        g = cls(store, gen_id, listing, overwrite=overwrite, strategy=strategy)
        if nbytes is not None:
            g.check_space(nbytes)
        store.makedirs()
        return g

    @classmethod
    def join(cls, store: Store, gen: str) -> "Generation":
        """A participant in generation ``gen`` that another process begins and commits."""
        return cls(store, gen, {})

    def check_space(self, nbytes: int) -> None:
        free = self.store.free_bytes()
        if free is not None and nbytes > free:
            raise InsufficientSpaceError(
                f"{self.store.uri}: the checkpoint needs {nbytes} bytes but only {free} are free; "
                "free space or choose another location", self.store.uri)

    def data_name(self, k: int) -> str:
        return data_name(self.id, k)

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.committed:
            self.discard()

    # -- the end of the transaction

    def commit(self, manifest: Manifest) -> None:
        """Publish ``manifest`` as the checkpoint, then retire what it supersedes."""
        if manifest.generation != self.id or self.strategy is None:
            raise CheckpointError(f"{self.store.uri}: internal error: commit of a generation not begun here")
        store = self.store
        try:
            if not self.overwrite:
                now = store.list() or {}
                if now and has_commit(store, now):
                    raise CheckpointExistsError(
                        f"{store.uri}: another writer committed a checkpoint here first (overwrite=False)",
                        store.uri)
                self._claim()
            record = commit_name(self.id)
            self.written.append(record)
            self.strategy.publish(store, record, manifest.to_bytes())
        except BaseException:
            self.discard()
            raise
        self.committed = True
        try:
            self.retire_older()
            if self._claimed:
                store.remove([CLAIM_NAME])
        except CheckpointError as e:
            log.debug("%s: committed; retiring older generations failed (gc removes them): %s", store.uri, e)

    def discard(self) -> None:
        """Remove everything this generation wrote (never raises: the original error matters more)."""
        names = list(reversed(self.written)) + [n + TMP_SUFFIX for n in self.written if n.endswith(COMMIT_SUFFIX)]
        if self._claimed:
            names.append(CLAIM_NAME)
        # Once is enough: commit discards before it re-raises, and the caller's ``with`` would again.
        self.written, self._claimed = [], False
        try:
            self.store.remove(names)
        except BaseException:  # noqa: BLE001 - the original error matters more
            pass

    def retire_older(self) -> None:
        """Remove every generation older than this one in the listing of ``begin``.

        One a concurrent writer added meanwhile is left for ``gc``. Where the
        store keeps the previous generation (FUSE mounts, which upload in the
        background and in any order), the newest older commit stays as well.
        """
        keep = None
        if self.store.keep_previous:
            older = [g for g in commit_generations(self.listing) if g < self.id]
            keep = older[0] if older else None
        remove_files(self.store, [n for n in self.listing if (f := FileName.parse(n)) is not None
                                  and f.gen < self.id and f.gen != keep])

    def _claim(self) -> None:
        store = self.store
        body = json.dumps({"generation": self.id, "time": time.time(), "owner": _machine()}).encode()
        for retry in range(2):
            if store.create_exclusive(CLAIM_NAME, body):
                # A writer that claimed and committed before us has removed its
                # claim by now, but its commit is there to see.
                if has_commit(store, store.list() or {}):
                    store.remove([CLAIM_NAME])
                    break
                self._claimed = True
                return
            listing = store.list() or {}
            if has_commit(store, listing):
                break
            entry = listing.get(CLAIM_NAME)
            if entry is None and retry == 0:
                continue                       # the other writer finished or gave up meanwhile
            if retry == 0 and entry is not None and self._claim_abandoned(entry):
                store.remove([CLAIM_NAME])     # left by a writer that died before its commit
                continue
            break
        raise ClaimHeldError(
            f"{store.uri}: another writer is committing a checkpoint here right now (overwrite=False); nothing is "
            f"committed here yet. A claim ({CLAIM_NAME}) left by a writer that died is taken over once that "
            f"writer is provably gone, or after {CLAIM_STALE:.0f} s", store.uri)

    def _claim_abandoned(self, entry) -> bool:
        if entry.mtime is not None and time.time() - entry.mtime > CLAIM_STALE:
            return True
        try:
            body = self.store.get(CLAIM_NAME)
        except CheckpointError:
            return False
        return claim_owner_gone(body)


def write_checkpoint(store: Store, state: Any, *, overwrite: bool = True, verify: bool = True,
                     allow_pickle: bool = False, progress: bool = False, meta: dict | None = None,
                     devices: dict | None = None, encoded: tuple | None = None,
                     compression: str | None = None) -> CheckpointInfo:
    """The whole save: encode (refusing before any I/O), compress, write, check, commit, retire.

    ``encoded``: ``tree.encode``'s (nodes, blobs) of the state, made earlier (an async save
    encodes its copy in the caller's thread, so a refused value raises there).
    """
    t0 = time.perf_counter()
    check_compression(compression)
    nodes, blobs = encoded if encoded is not None else tree.encode(state, allow_pickle=allow_pickle,
                                                                   devices=devices)
    hashes = None
    if compresses(compression, store.compression_pays):
        blobs, hashes = compress_blobs(blobs, nodes, compression, store.compression_pays)
        if not any(b.frames is not None for b in blobs):
            hashes = None       # nothing paid: an ordinary version 2 checkpoint
    p = plan(blobs, store.part_bytes)
    with Generation.begin(store, overwrite=overwrite, nbytes=p.total) as gen, \
            progress_bar(progress, p.total, f"saving {store.uri}") as bar:
        names = [gen.data_name(k) for k in range(len(p.sizes))]
        files, crcs = write_files(store, names, p, verify=verify, bar=bar, written=gen.written)
        manifest = Manifest(generation=gen.id, files=files, blobs=blob_table(blobs, crcs, hashes), nodes=nodes,
                            meta=meta or {}, writer=writer_fields(),
                            version=(COMPRESSED_MAJOR, 0) if hashes is not None else (FORMAT_MAJOR, FORMAT_MINOR))
        gen.commit(manifest)
    return info_of(store, manifest, gen.strategy.name, time.perf_counter() - t0)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar of ``total`` bytes, or None when not ``enabled``."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def info_of(store: Store, m: Manifest, strategy: str, seconds: float) -> CheckpointInfo:
    return CheckpointInfo(uri=store.uri, nbytes=m.nbytes, seconds=seconds, strategy=strategy,
                          generation=m.generation, created=m.created, files=len(m.files), meta=dict(m.meta),
                          logical_nbytes=m.logical)
