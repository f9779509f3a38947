"""Commit by rename: the record is written under a temporary name, synced,
then renamed into place, and the directory synced.

On a local POSIX filesystem rename(2) is atomic and, once the directory is
fsynced, durable: a reader (or a machine rebooting after power loss) sees the
complete commit record or none, never a torn one.
"""

from __future__ import annotations

from ..format.manifest import TMP_SUFFIX


class RenameCommit:
    name = "rename"

    def publish(self, store, record_name: str, record: bytes) -> None:
        tmp = record_name + TMP_SUFFIX
        store.put(tmp, record)          # written and fsynced under a name no reader trusts
        try:
            store.rename(tmp, record_name)
        except BaseException:
            store.remove([tmp])
            raise
        store.sync_dir()                # the rename itself is durable only after this
