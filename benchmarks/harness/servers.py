"""Starting and stopping what a backend measures, and object-store chores.

The servers and mounts are the test suite's (``tests/helpers/backends.py``: ``MotoServer``,
``GcsEmulator``, ``RcloneMount``), one implementation shared with the tests, each in a
process of its own on a free loopback port.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from benchmarks.harness.context import GIB, REPO, Context

if TYPE_CHECKING:
    from benchmarks.harness.context import Site

BUCKET = "bench"


def launchers() -> Any:
    """The test suite's loopback servers and mounts (``tests/helpers/backends.py``)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import backends

    return backends


@contextlib.contextmanager
def running(ctx: Context, backend: Any) -> Iterator[Any]:
    """Start a server or mount; stop it however the block ends.

    On Ctrl-C (or SIGTERM) a mount is killed rather than waited for, and a failure while
    stopping is logged, never raised: it must not replace the interrupt (the benchmark
    would carry on) or the error that ended the block (which says more).
    """
    backend.start()
    try:
        yield backend
    except BaseException as e:
        interrupted = not isinstance(e, Exception)
        try:
            if interrupted and hasattr(backend, "kill_vm"):
                backend.kill_vm()  # nothing on it is worth an upload now
            else:
                backend.stop()
        except Exception as stop_error:  # noqa: BLE001 - see above
            ctx.log(f"while stopping {backend!r}: {type(stop_error).__name__}: {stop_error}")
        raise
    backend.stop()


def loopback_server(cls: str, what: str) -> Callable[["Site"], ContextManager[Any]]:
    """A launcher for one of the test suite's loopback object stores, bucket ``BUCKET`` created."""
    @contextlib.contextmanager
    def launch(site: "Site") -> Iterator[Any]:
        with running(site.ctx, getattr(launchers(), cls)()) as server:
            server.create_bucket(BUCKET)
            site.ctx.log(f"{site.key}: {what} at {server.endpoint}")
            yield server

    return launch


def clear_prefix(fs: Any, path: str) -> None:
    """Delete everything under ``path`` on an object store, if anything is there."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def range_probe(fs: Any, path: str, server: str) -> str:
    """What a small ranged read of the big object costs the server.

    moto answers a ranged GET by building the whole object's response and slicing it, so
    there a client that reads in ranges (boto3's download_file, any parallel reader) pays
    object-size work per range; real S3 and GCS do not. A 1 KiB range of the benchmark's
    object is timed against a 1 KiB range of a 4 KiB object (best of 3 each, untimed for
    the table), so the notes can say whether, and how much, that happens here.
    """
    size = fs.size(path)
    small = path.rsplit("/", 1)[0] + "/range-probe.bin"
    fs.pipe_file(small, b"\0" * 4096)

    def ranged(p: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fs.cat_file(p, start=0, end=1024)
            times.append(time.perf_counter() - t0)
        return min(times)

    big, tiny = ranged(path), ranged(small)
    fs.rm(small)
    head = (f"on {server} a 1 KiB ranged GET of the {size / GIB:.2f} GiB object took {big:.3f} s, "
            f"of a 4 KiB object {tiny:.3f} s")
    if big > 5 * tiny and big - tiny > 0.02:
        ranges = -(-size // (8 << 20))
        return (f"{head}: the server reads the whole object for every range, so reading it in "
                f"8 MiB ranges ({ranges} GETs, as download_file does) costs ~{ranges * (big - tiny):.0f} s "
                "here that real S3/GCS would not charge")
    return f"{head}: ranges cost about their size"


def fs_type(path: str) -> str:
    """Filesystem type (ext4, tmpfs, fuse.rclone, ...) of the mount holding ``path``."""
    import os

    import psutil

    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best, best_type = mp, part.fstype
    return best_type


def mounts_under(path: Any) -> list[str]:
    """The mount points inside ``path`` (an rclone mount that failed to unmount)."""
    import psutil

    root = str(path.resolve()).rstrip("/") + "/"
    return [p.mountpoint for p in psutil.disk_partitions(all=True) if p.mountpoint.startswith(root)]
