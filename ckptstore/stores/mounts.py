"""Which mount a local path lives on, read from /proc/self/mountinfo.

A FUSE mount (Colab's Google Drive, gcsfuse, rclone, s3fs-fuse) or a network
filesystem looks like a local directory, but its rename is not atomic and its
fsync does not reach the storage that outlives the machine. Such paths are
committed with the marker strategy.
"""

from __future__ import annotations

import os
import re

_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo writes space as \040

# Filesystem types whose rename is not atomic or whose fsync does not reach
# the storage that survives the machine: network and FUSE mounts.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
               "lustre", "gpfs", "beegfs", "davfs", "sshfs"}


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount this process sees."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
                out.append((point, right.split()[0]))
    except OSError:
        pass
    return out


def mount_fstype(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    path = os.path.realpath(path)
    best, best_type = "", None
    for point, fstype in _mounts():
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def is_remote_mount(path: str) -> bool:
    fstype = mount_fstype(path)
    if fstype is None:
        return False
    return fstype == "fuse" or fstype.startswith("fuse.") or fstype.split(".")[0] in _NETWORK_FS


