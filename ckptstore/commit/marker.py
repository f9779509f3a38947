"""Commit by marker: data first, then a small commit record written last.

For backends whose rename is a copy (object stores) or is not atomic and not
ordered with the data (FUSE mounts such as Google Drive, gcsfuse, rclone).
The record is written in one piece under its final name; what makes this safe
is the record itself: it carries its own CRC-32C and the size and CRC-32C of
every data file, so a record that arrives torn, or before the data it vouches
for, fails verification and is never taken as a commit.
"""

from __future__ import annotations


class MarkerCommit:
    name = "marker"

    def publish(self, store, record_name: str, record: bytes) -> None:
        store.put(record_name, record)
        store.sync_dir()
