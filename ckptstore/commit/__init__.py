"""How a written checkpoint becomes visible to readers, atomically.

Two strategies, one per module: ``RenameCommit`` where the backend's rename
atomically replaces a name (local POSIX filesystems), ``MarkerCommit`` where
it does not (object stores, FUSE and network mounts). ``choose`` is the single
function that picks one for a store.
"""

from __future__ import annotations

from .marker import MarkerCommit
from .rename import RenameCommit

STRATEGIES = {"rename": RenameCommit, "marker": MarkerCommit}


def choose(store, forced: str | None = None):
    """The commit strategy for ``store``: forced by ``commit=``, else by what the backend can do."""
    if forced is not None:
        strategy = STRATEGIES[forced]()
        if forced == "rename" and not store.atomic_rename:
            from ..errors import StorageError
            raise StorageError(
                f"{store.uri}: commit=rename needs a backend whose rename is atomic; use commit=marker",
                store.uri)
        return strategy
    return RenameCommit() if store.atomic_rename else MarkerCommit()
