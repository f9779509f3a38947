"""save / load / verify / exists: drop-in for torch.save and torch.load, on any URL."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import commit, reader, writer
from .errors import CheckpointError, CheckpointNotFoundError
from .format.foreign import load_file
from .format.tree import refuse_pickle
from .stores import open_store

log = logging.getLogger("ckptstore")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save committed."""

    uri: str            #: where, secrets redacted
    nbytes: int         #: payload bytes written (data files)
    seconds: float      #: wall time of the whole save
    strategy: str       #: "rename" or "marker"
    generation: str = ""  #: id of this save inside the checkpoint directory
    created: float = 0.0  #: commit time, seconds since the epoch
    files: int = 0      #: data files written
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    problems: list
    nbytes: int
    uri: str = ""
    deep: bool = False
    generation: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _has_commit(store, listing) -> bool:
    return reader.find_commit(store, listing).manifest is not None


def save(obj: Any, uri: Any, *, storage_options: Mapping[str, Any] | None = None, overwrite: bool = True,
         verify: bool = True, allow_pickle: bool = False, progress: bool = False,
         _meta: dict | None = None) -> CheckpointInfo:
    """Save ``obj`` to ``uri`` atomically and durably; returns a :class:`CheckpointInfo`.

    Unsupported values raise ``UnsupportedObjectError`` before anything is
    written. With ``verify=True`` what was stored is checked against the
    checksums computed while writing before the commit; a mismatch raises
    ``CorruptCheckpointError`` and the previous checkpoint stays as it was.
    """
    store = open_store(uri, storage_options)
    strategy = commit.choose(store, store.location.commit)
    with store.errors("save to"):
        done = writer.write_checkpoint(
            store, strategy, obj, overwrite=overwrite, verify=verify, allow_pickle=allow_pickle,
            progress=progress, meta=_meta, has_commit=_has_commit)
    log.debug("saved %s (%d bytes, %s, %.3fs)", store.uri, done.manifest.nbytes, done.strategy, done.seconds)
    return info_of(store, done)


def info_of(store, done) -> CheckpointInfo:
    """The CheckpointInfo of a save ``writer.write_checkpoint`` finished."""
    m = done.manifest
    return CheckpointInfo(uri=store.uri, nbytes=m.nbytes, seconds=done.seconds, strategy=done.strategy,
                          generation=m.generation, created=m.created, files=len(m.files), meta=dict(m.meta))


def load(uri: Any, *, map_location=None, storage_options: Mapping[str, Any] | None = None,
         verify: bool = True, allow_pickle: bool = False) -> Any:
    """Load what :func:`save` stored at ``uri`` (or a torch.save / safetensors file).

    With ``verify=True`` every byte is checked against its checksum and any
    mismatch raises ``CorruptCheckpointError``; nothing is ever unpickled
    unless ``allow_pickle=True``.
    """
    store = open_store(uri, storage_options)
    with store.errors("load"):
        if store.is_file():
            return load_file(store, map_location=map_location, allow_pickle=allow_pickle)
        m, _ = reader.open_commit(store)
        if not allow_pickle:
            refuse_pickle(m.nodes)  # before a byte of data is read
        values = reader.read_blobs(store, m, verify=verify)
        return reader.build_state(m, values, map_location=map_location, allow_pickle=allow_pickle)


def verify(uri: Any, *, storage_options: Mapping[str, Any] | None = None, deep: bool = False) -> VerifyReport:
    """Check the checkpoint at ``uri`` without loading it; never raises for a corrupt one.

    Shallow: the commit record is intact and every data file is present with
    the size it vouches for. ``deep=True``: every byte is re-read and checked
    against its CRC-32C. Raises ``CheckpointNotFoundError`` when nothing
    committed is there.
    """
    store = open_store(uri, storage_options)
    with store.errors("verify"):
        if store.is_file():
            return _verify_file(store, deep)
        v = reader.verify_store(store, deep)
    return VerifyReport(ok=v.ok, problems=list(v.problems), nbytes=v.nbytes, uri=store.uri, deep=deep,
                        generation=v.manifest.generation if v.manifest else "")


def _verify_file(store, deep: bool) -> VerifyReport:
    """A foreign single file has no checksums; the best check is to load it."""
    problems: list[str] = []
    if deep:
        try:
            load_file(store, map_location="cpu", allow_pickle=False)
        except CheckpointError as e:
            problems.append(str(e))
    return VerifyReport(ok=not problems, problems=problems, nbytes=store.file_size(), uri=store.uri, deep=deep)


def exists(uri: Any, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a committed checkpoint (or a single-file checkpoint) is at ``uri``."""
    store = open_store(uri, storage_options)
    with store.errors("check"):
        if store.is_file():
            return True
        listing = store.list()
        if not listing:
            return False
        return _has_commit(store, listing)


def info(uri: Any, *, storage_options: Mapping[str, Any] | None = None) -> dict:
    """A description of the committed checkpoint at ``uri`` (for ``ckptstore info``)."""
    from .format.manifest import describe
    store = open_store(uri, storage_options)
    with store.errors("inspect"):
        if store.is_file():
            raise CheckpointNotFoundError(f"{store.uri} is a single-file checkpoint; `info` describes "
                                          "ckptstore checkpoints only", store.uri)
        m, _ = reader.open_commit(store)
    d = describe(m)
    d["uri"] = store.uri
    d["strategy_hint"] = commit.choose(store, store.location.commit).name
    return d

