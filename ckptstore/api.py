"""save / load / verify / exists: drop-in for torch.save and torch.load, on any URL."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from .commit import choose
from .compress import check_compression
from .errors import CheckpointError, CheckpointNotFoundError
from .foreign import load_file
from .format.tree import describe
from .info import CheckpointInfo, VerifyReport
from .plan import select_value
from .reader import load_committed, open_commit, verify_store
from .stores import open_store
from .writer import has_commit, write_checkpoint

log = logging.getLogger("ckptstore")

__all__ = ["CheckpointInfo", "VerifyReport", "save", "load", "verify", "exists", "info"]


def save(obj: Any, uri: Any, *, storage_options: Mapping[str, Any] | None = None, overwrite: bool = True,
         verify: bool = True, allow_pickle: bool = False, progress: bool = False,
         compression: str | None = None) -> CheckpointInfo:
    """Save ``obj`` to ``uri`` atomically and durably; returns a :class:`CheckpointInfo`.

    Unsupported values raise ``UnsupportedObjectError`` before anything is
    written. With ``verify=True`` what was stored is checked against the
    checksums computed while writing before the commit; a mismatch raises
    ``CorruptCheckpointError`` and the previous checkpoint stays as it was.
    ``compression="zstd"`` stores tensors and arrays of 64 KiB or more as
    byte-grouped zstd frames (lossless); ``"auto"`` does so where the backend
    is slower than the compressor (object stores, mounted remote drives) and
    the bytes shrink by 10% or more (docs/space.md).
    """
    check_compression(compression)
    store = open_store(uri, storage_options)
    with store.errors("save to"):
        done = write_checkpoint(store, obj, overwrite=overwrite, verify=verify, allow_pickle=allow_pickle,
                                progress=progress, compression=compression)
    log.debug("saved %s (%d bytes, %s, %.3fs)", done.uri, done.nbytes, done.strategy, done.seconds)
    return done


def load(uri: Any, *, map_location=None, storage_options: Mapping[str, Any] | None = None,
         verify: bool = True, allow_pickle: bool = False, select: Any = None, into: Any = None) -> Any:
    """Load what :func:`save` stored at ``uri`` (or a torch.save / safetensors file).

    With ``verify=True`` every byte is checked against its checksum and any
    mismatch raises ``CorruptCheckpointError``; nothing is ever unpickled
    unless ``allow_pickle=True``. ``select=`` a path (a tuple of keys, or one
    key) or a list of paths reads only those values; ``into=`` a tree of
    existing tensors reads each saved tensor at the same path straight into
    that tensor's memory (see docs/resume.md, "Resume without doubling
    memory"). A path the checkpoint lacks raises ``PathNotFoundError`` (a
    ``KeyError``), an ``into`` tensor that does not match raises
    ``PathMismatchError`` (a ``ValueError``), both naming the path and raised
    before anything is read. Guarantees: docs/guarantees.md.
    """
    store = open_store(uri, storage_options)
    with store.errors("load"):
        if store.is_file():
            obj = load_file(store, map_location=map_location, allow_pickle=allow_pickle)
            return obj if select is None and into is None else select_value(obj, select, into)
        return load_committed(store, map_location=map_location, verify=verify, allow_pickle=allow_pickle,
                              select=select, into=into)


def open(uri: Any, *, storage_options: Mapping[str, Any] | None = None, verify: bool = True,
         allow_pickle: bool = False):
    """A read-only lazy view (:class:`ckptstore.Checkpoint`) that has read only the commit record.

    Keys, lengths and ``tensors()`` come from the record; ``view[key]`` of a
    leaf and ``view.load(select=, into=)`` read just what they return. A
    torch.save or safetensors file is loaded whole when opened.
    """
    from .view import Checkpoint
    store = open_store(uri, storage_options)
    with store.errors("open"):
        if store.is_file():
            value = load_file(store, allow_pickle=allow_pickle)
            return Checkpoint(store, None, value=value, info=CheckpointInfo(uri=store.uri, nbytes=store.file_size(),
                                                                             seconds=0.0, strategy="file"))
        m, _ = open_commit(store)
        if not allow_pickle and m.pickled:
            from .format.tree import refuse_pickle
            refuse_pickle(m.nodes)
        return Checkpoint(store, m, verify=verify, allow_pickle=allow_pickle)


def export(uri: Any, dst: Any, *, select: Any = None, format: str | None = None,
           storage_options: Mapping[str, Any] | None = None, dst_options: Mapping[str, Any] | None = None,
           max_shard_size: Any = None) -> list[str]:
    """Write the selected part of a checkpoint as safetensors (optionally sharded) or a torch.save file.

    With one selected path, names are relative to it (``select="model"``
    writes the model's own state_dict keys). See docs/quickstart.md
    ("Export for inference") and docs/cli.md (``ckptstore export``).
    Returns the files written.
    """
    from .exporter import export as run
    return run(uri, dst, select=select, format=format, storage_options=storage_options, dst_options=dst_options,
               max_shard_size=max_shard_size)


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
        return verify_store(store, deep)


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
        return has_commit(store, listing)


def info(uri: Any, *, storage_options: Mapping[str, Any] | None = None) -> dict:
    """A description of the committed checkpoint at ``uri`` (for ``ckptstore info``)."""
    store = open_store(uri, storage_options)
    with store.errors("inspect"):
        if store.is_file():
            raise CheckpointNotFoundError(f"{store.uri} is a single-file checkpoint; `info` describes "
                                          "ckptstore checkpoints only", store.uri)
        m, _ = open_commit(store)
        d = describe(m)
        d["uri"] = store.uri
        d["strategy_hint"] = choose(store, store.location.commit).name
    return d
