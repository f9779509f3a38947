"""A Drive-like rclone FUSE mount: the local disk's rows, on the mount.

``rclone mount REMOTE MNT --vfs-cache-mode writes --vfs-write-back 2s``: a save returns once
its bytes are in rclone's VFS cache (fsync on the mount does not upload) and rclone uploads
them to the remote directory afterwards. Every write is followed, untimed, by waiting for
that upload. Loads read through the mount: rclone serves a file from its VFS cache while it
holds it, else from the remote directory (a local directory here); dropping the page cache
reaches both. Every byte crosses FUSE up to three times (write, upload, read), so this
scenario uses the smaller ``--remote-size`` state. Targets: as for the local disk, with dd
and cat on the mount as the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.backends.fuse import FUSE
from benchmarks.harness.context import GIB, Context, Site
from benchmarks.harness.registry import Scenario, peers, scenario
from benchmarks.harness.rounds import directory_rows, directory_series, measure_directory
from benchmarks.harness.series import Row


def measure(site: Site) -> list[Row]:
    ctx = site.ctx
    saves, loads = peers("fuse", "save", ctx.quick), peers("fuse", "load", ctx.quick)
    series = directory_series(saves, loads)
    # Uploading a state from the cache to a local directory takes a few
    # seconds; a minute per GiB is plenty before calling it stuck.
    upload_timeout = max(60.0, 60.0 * ctx.state_bytes / GIB)

    def on_mount(mount: Any) -> None:
        measure_directory(ctx, "fuse", Path(site.uri(mount, "")), series, saves, loads,
                          settle=lambda: mount.wait_uploaded(timeout=upload_timeout))

    site.serve(on_mount, series, None)
    # Not "durable": fsync on the mount returns before rclone has uploaded.
    return directory_rows(ctx, "fuse", series, ctx.state_bytes, saves, loads, save_label="ckptstore.save",
                          load_extra="read through the mount from rclone's VFS cache / remote dir")


def notes(ctx: Context) -> list[str]:
    return [
        "fuse: rclone mount --vfs-cache-mode writes --vfs-write-back 2s over a local directory; "
        "a save there returns once rclone's cache has the bytes (as on a Colab Drive mount), "
        "the upload that follows is waited for, untimed, before the next measurement."]


scenario(Scenario(
    "fuse", order=50, measure=measure, backend=FUSE, remote=True, notes=notes, disk=8, quick=True,
    baselines=("dd conv=fsync on the mount", "cat on the mount",
               "torch.save / torch.load / safetensors on the mount (peers)")))
