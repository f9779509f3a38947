"""Operating-system helpers shared by the benchmark driver and its workers.

Kept free of torch so the driver stays a small process.
"""

from __future__ import annotations

import os
import resource
import sys

import psutil


def drop_caches() -> tuple[bool, str]:
    """Write back dirty pages and empty the page cache, for cold-cache reads.

    Returns (ok, why_not). Needs root on Linux; elsewhere (or in a container
    that forbids it) reads are warm and the caller has to say so.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return False, f"cannot drop the page cache ({e.strerror}); cold-load figures are warm-cache"
    return True, ""


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current RSS.

    Linux >= 4.0 resets VmHWM (which ``ru_maxrss`` also reads) when "5" is
    written to /proc/self/clear_refs. Without it the peak of an operation
    would be hidden behind any earlier, higher peak, e.g. while the state
    was being built. Returns False where that is not possible.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process since start or the last reset.

    Prefers VmHWM from /proc/self/status: ``ru_maxrss`` is the larger of it
    and a per-process record that, on Linux, also keeps the parent's peak
    from before ``exec`` (the forked address space), which would inflate a
    small child's figure. Falls back to ``ru_maxrss`` (KiB on Linux, bytes on
    macOS) where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def fs_type(path: str) -> str:
    """Filesystem type (ext4, tmpfs, fuse.rclone, ...) of the mount holding ``path``."""
    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best, best_type = mp, part.fstype
    return best_type
