"""A Drive-like FUSE mount: ``rclone mount REMOTE MNT --vfs-cache-mode writes --vfs-write-back 2s``.

REMOTE (a local directory standing in for Drive), the mount point and rclone's VFS cache
are all in the scenario's scratch directory. A save on the mount returns once rclone's
cache has the bytes (fsync does not upload, as on a Colab Drive mount); the scenarios wait,
untimed, until rclone has uploaded each write (``mount.wait_uploaded``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from benchmarks.harness.registry import Backend
from benchmarks.harness.servers import fs_type, launchers, running

if TYPE_CHECKING:
    from benchmarks.harness.context import Site


@contextlib.contextmanager
def rclone_mount(site: "Site") -> Iterator[Any]:
    """The mount, with an empty ``bench`` directory on it."""
    remote, mnt, cache = site.scratch / "remote", site.scratch / "mnt", site.scratch / "cache"
    for d in (remote, mnt, cache):
        d.mkdir(parents=True)
    rclone = launchers().RcloneMount(str(remote), str(mnt), str(cache), write_back="2s")
    with running(site.ctx, rclone) as mount:
        (mnt / "bench").mkdir()
        site.ctx.log(f"{site.key}: rclone mount on {mnt} ({fs_type(str(mnt))})")
        yield mount


FUSE = Backend("fuse", uri=lambda mount, name: str(Path(mount.mountpoint) / "bench" / name),
               launcher=rclone_mount)
