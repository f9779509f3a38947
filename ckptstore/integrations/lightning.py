"""A Lightning ``CheckpointIO`` that saves, loads and removes through ckptstore.

    from ckptstore.integrations.lightning import StoreCheckpointIO
    trainer = lightning.Trainer(plugins=[StoreCheckpointIO()],
                                callbacks=[ModelCheckpoint(dirpath="s3://bucket/run1")])

Every checkpoint Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``,
``fabric.save``) becomes a ckptstore checkpoint: a *directory* at the path
Lightning chose (``.../epoch=0-step=100.ckpt/``) holding a commit record and
data files, committed atomically and verified before the commit. Resuming
(``trainer.fit(ckpt_path=...)``) loads it with every byte checked.

Lightning's checkpoint dict is saved as it is, with one exception: Lightning's
``AttributeDict`` (a ``dict`` subclass that only adds attribute access, used
for hyperparameters) is stored as a plain ``dict``. Anything else the safe
format cannot hold raises ``UnsupportedObjectError`` naming where it sits,
before anything is written; nothing is dropped and nothing is pickled unless
``allow_pickle=True``.

Works with the ``lightning`` package and the standalone ``pytorch_lightning``
(whichever are installed; with both, the plugin is a ``CheckpointIO`` of each).

Wrapped in Lightning's ``AsyncCheckpointIO``, saves run in a worker thread while
``ModelCheckpoint`` removes checkpoints from the training thread. A removal of a
path whose save is under way waits for that save to finish, then removes the
checkpoint; a save of a path being removed waits for the removal. A save still
waiting in ``AsyncCheckpointIO``'s queue has not reached the plugin: the removal
finds nothing to wait for, and the save, when it runs, commits a complete
checkpoint (as Lightning's own ``TorchCheckpointIO`` writes its file then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
from typing import Any, Iterator, Mapping, Optional, Union

from ..api import load, save
from ..errors import CheckpointError, UnsupportedObjectError
from ..format.manifest import SHARED_DIR
from ..format.walk import transform
from ..gc import listed_by_steps
from ..incremental import SharedIndex, commit_step, run_records, sweep
from ..stores import open_location, open_store
from ..stores.base import Store
from ..url import parse, redact
from ..writer import remove_files

log = logging.getLogger("ckptstore")

_PATH = Union[str, "os.PathLike[str]"]


def _checkpoint_io_classes() -> list[type]:
    """Lightning's ``CheckpointIO`` base of every installed flavour: the unified
    ``lightning`` package first, then the standalone ``lightning_fabric`` (what
    ``pytorch_lightning`` checks plugins against). They are distinct classes."""
    found = []
    for module in ("lightning.fabric.plugins.io", "lightning_fabric.plugins.io"):
        try:
            found.append(importlib.import_module(module).CheckpointIO)
        except ImportError:
            continue
    if not found:
        raise ImportError("ckptstore.integrations.lightning needs Lightning: pip install 'ckptstore[lightning]'")
    return found


_BASES = _checkpoint_io_classes()

# Lightning keeps hyperparameters in these; they add attribute access to a dict
# and no state of their own (``__setattr__`` writes items), so a plain dict of
# the same items loses nothing. The modules are looked up, not imported: an
# object of a class from a module that was never imported cannot be in a checkpoint.
_ATTRIBUTE_DICT_MODULES = (
    "lightning.fabric.utilities.data", "lightning.pytorch.utilities.parsing",
    "lightning_fabric.utilities.data", "pytorch_lightning.utilities.parsing",
)

_LIGHTNING_HINT = ("With Lightning: give the value a supported type (a hyperparameter can be left out with "
                   "self.save_hyperparameters(ignore=[...])), or use StoreCheckpointIO(allow_pickle=True) "
                   "if the checkpoints will only be loaded from trusted storage.")


def _attribute_dict_types() -> tuple[type, ...]:
    types = []
    for name in _ATTRIBUTE_DICT_MODULES:
        cls = getattr(sys.modules.get(name), "AttributeDict", None)
        if isinstance(cls, type) and issubclass(cls, dict):
            types.append(cls)
    return tuple(types)


def _safe_tree(obj: Any) -> Any:
    """``obj`` with every Lightning ``AttributeDict`` replaced by a plain ``dict`` of the same items.

    Only containers on the way to a replaced one are copied; everything else
    (tensors above all) is the very same object, and ``obj`` itself is never
    modified: Lightning's hooks may still hold it. Values of any other type are
    left for the encoder to accept or refuse, so nothing is converted that is
    not listed here.
    """
    convert = _attribute_dict_types()
    if not convert:
        return obj
    return transform(obj, lambda leaf: leaf, as_dict=convert)


class _PathLocks:
    """One lock per checkpoint path, kept while a save or removal of it holds or waits for it.

    A save and a removal of the same path in different threads (``AsyncCheckpointIO``'s
    worker and the training thread) run one after the other, never interleaved. One
    table for the process, so it holds whichever plugin instances are involved, and
    a plugin stays picklable (strategies that spawn processes pickle it).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, path: _PATH, action: str) -> Iterator[None]:
        key = _path_key(path)
        if key is None:
            yield        # a malformed URL: the save or removal itself reports it
            return
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            if not lock.acquire(blocking=False):
                log.debug("%s: %s waits for the save or removal of it in progress", _shown(path), action)
                lock.acquire()
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


_PATH_LOCKS = _PathLocks()


def _path_key(path: _PATH) -> Optional[tuple[str, str]]:
    """The checkpoint ``path`` names, however spelled (``./x``, ``file://``, a query string)."""
    try:
        location = parse(path)
    except ValueError:
        return None
    return location.protocol, location.path


def _remove_single_file(store: Store) -> None:
    """Remove the one file at ``store``'s location (a ``torch.save`` checkpoint an earlier
    run left where ModelCheckpoint now prunes), through the store of its directory."""
    loc = store.location
    parent_path, _, name = loc.path.rstrip("/").rpartition("/")
    parent_uri = loc.uri.rstrip("/").rpartition("/")[0]
    parent = open_location(dataclasses.replace(loc, path=parent_path or "/", uri=parent_uri))
    parent.remove([name])


class StoreCheckpointIO(_BASES[0]):
    """Lightning ``CheckpointIO`` plugin: every checkpoint is a verified, atomically
    committed ckptstore checkpoint at the path Lightning gives, on any fsspec URL.

    ``storage_options`` (endpoint, credentials, ...) apply to every save, load
    and remove; options passed to ``trainer.save_checkpoint(..., storage_options=)``
    are merged over them. ``allow_pickle`` stores and loads values the safe
    format cannot hold by pickling them (only for checkpoints from trusted
    storage). ``verify`` checks what was stored before each commit and every
    byte read on load.

    ``incremental=True``: the checkpoints in one directory (``ModelCheckpoint``'s
    ``dirpath``) form one incremental run, as a ``CheckpointManager(incremental=True)``'s
    steps do. A tensor storage whose bytes a checkpoint in that directory already
    holds is not written again, the data lives in ``<dirpath>/.shared/``, and removing
    or replacing a checkpoint (``ModelCheckpoint`` pruning, ``last.ckpt`` rewritten)
    frees what only it listed. Not with ``allow_pickle`` (an incremental step holds
    tensors and plain values only).

    Saves and removals may come from different threads (``AsyncCheckpointIO``): a
    save and a removal of the same path in this process never overlap, the later
    one waits.
    """

    def __init__(self, storage_options: Optional[Mapping[str, Any]] = None, *, allow_pickle: bool = False,
                 verify: bool = True, incremental: bool = False):
        super().__init__()
        if not isinstance(incremental, bool):
            raise TypeError(f"incremental must be True or False, got {incremental!r:.40}")
        if incremental and allow_pickle:
            raise ValueError("incremental=True cannot be combined with allow_pickle=True")
        self.storage_options: dict[str, Any] = dict(_mapping("storage_options", storage_options))
        self.allow_pickle = allow_pickle
        self.verify = verify
        self.incremental = incremental

    def __repr__(self) -> str:
        # storage_options may hold credentials: never shown.
        return (f"StoreCheckpointIO(allow_pickle={self.allow_pickle}, verify={self.verify}, "
                f"incremental={self.incremental})")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` as a ckptstore checkpoint at ``path`` (replacing one that is there).

        A value the safe format cannot hold raises ``UnsupportedObjectError``
        naming it, before anything is written. A removal of ``path`` in progress
        in another thread finishes first.
        """
        options = {**self.storage_options, **_mapping("storage_options", storage_options)}
        try:
            with _PATH_LOCKS.hold(path, "save"):
                if self.incremental:
                    info = _save_incremental(_safe_tree(checkpoint), open_store(path, options), self.verify)
                else:
                    info = save(_safe_tree(checkpoint), path, storage_options=options, verify=self.verify,
                                allow_pickle=self.allow_pickle)
        except UnsupportedObjectError as e:
            raise UnsupportedObjectError(f"{e}. {_LIGHTNING_HINT}", e.uri) from None
        log.debug("lightning checkpoint saved to %s (%d bytes)", info.uri, info.nbytes)

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load the checkpoint at ``path``: a ckptstore checkpoint, or a single
        ``torch.save`` / safetensors file (as ``ckptstore.load`` does).

        ``map_location=None`` loads every tensor into CPU memory, as Lightning's
        own ``TorchCheckpointIO`` does; the strategy moves the state to its
        device. ``weights_only=True`` never unpickles, even with ``allow_pickle``.
        A missing checkpoint raises ``CheckpointNotFoundError`` (a ``FileNotFoundError``).
        """
        state = load(path, map_location="cpu" if map_location is None else map_location,
                         storage_options=self.storage_options, verify=self.verify,
                         allow_pickle=self.allow_pickle and not weights_only)
        if not isinstance(state, dict):
            raise TypeError(f"{_shown(path)} holds a {type(state).__name__}, not a Lightning checkpoint dict")
        return state

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove the checkpoint directory at ``path``; nothing there is not an error.

        Commit records go first, so a checkpoint removed halfway is never
        taken as committed; then every other file in it, then the directory.
        A single file at ``path`` (a ``torch.save`` checkpoint) is removed too.

        A save of ``path`` in progress in another thread (``AsyncCheckpointIO``'s
        worker) is waited for, then what it committed is removed; a save of
        ``path`` that starts meanwhile waits for the removal, and is a new save.
        """
        with _PATH_LOCKS.hold(path, "removal"):
            self._remove(path)
        log.debug("lightning checkpoint removed: %s", _shown(path))

    def _remove(self, path: _PATH) -> None:
        store = open_store(path, self.storage_options)
        with store.errors("remove"):
            if _is_local_link(store):
                # ModelCheckpoint(save_last="link") makes last.ckpt a symlink to a
                # checkpoint directory: removing it removes the link, not the target.
                os.unlink(store.location.path)
                return
            if store.is_file():
                _remove_single_file(store)
                return
            remove_files(store, store.list() or {})
            store.remove_dir()
            run = store.parent()
            if SHARED_DIR in run.subdirs():
                # An incremental run: free the shared bytes only the removed checkpoint listed.
                _sweep(run)

    def teardown(self) -> None:
        """Nothing to release: every save is finished and committed before ``save_checkpoint`` returns."""


for _other in _BASES[1:]:
    # pytorch_lightning checks plugins against its own CheckpointIO; the plugin
    # implements that interface in full, so it is registered as one.
    _other.register(StoreCheckpointIO)


def _save_incremental(state: Any, store: Store, verify: bool):
    """Save ``state`` at ``store`` as a step of the incremental run in its parent directory."""
    run = store.parent()
    index = SharedIndex()
    records = run_records(run)
    for m in records.values():
        index.add(m)
    with store.errors("save to"):
        _, info = commit_step(store, state, index, overwrite=True, verify=verify)
    if store.location.path.rstrip("/").rsplit("/", 1)[-1] in records:
        _sweep(run)      # it replaced a checkpoint (last.ckpt): what only the old one listed goes
    return info


def _sweep(run: Store) -> None:
    try:
        gone = sweep(run, lambda: listed_by_steps(run))
    except CheckpointError as e:
        # Nothing a kept checkpoint needs is lost; what stays, ``ckptstore gc`` removes later.
        log.warning("%s: removing unreferenced shared files failed: %s", _shown(run.uri), e)
        return
    if gone:
        log.debug("%s: removed %d shared files no checkpoint lists", _shown(run.uri), len(gone))


def _is_local_link(store: Store) -> bool:
    return store.location.protocol == "file" and os.path.islink(store.location.path)


def _mapping(what: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping (e.g. {{'endpoint_url': ...}}) or None, "
                        f"got {type(value).__name__}")
    return value


def _shown(path: _PATH) -> str:
    return redact(os.fspath(path))


__all__ = ["StoreCheckpointIO"]
