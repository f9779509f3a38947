"""How a benchmark figure is taken: one timed save or load, its extra peak memory.

``ckptstore bench`` (in-process, at one URL) and the repository's benchmark
(``make bench``, a fresh worker process per measurement) both time their saves
and loads with ``measure_save`` / ``measure_load``, so the quick check and the
benchmark never disagree about what a figure covers:

- a save is the call alone, the state already built;
- a load is the call plus reading every byte of every tensor it returned
  (``touch``), so a loader that hands back lazily mapped tensors pays for
  its reads too;
- extra memory is the peak resident size during the call (the kernel's
  high-water mark, reset right before it) less the resident size before
  it, less, for a load, the bytes of the state it returns.

Only the standard library is imported here; torch when a function needs it.
No psutil: the figures come from ``/proc/self`` (Linux), as psutil's would.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator


# --- the state's tensors ---------------------------------------------------------

def iter_tensors(obj: Any) -> Iterator[Any]:
    """Every tensor inside nested dicts/lists/tuples, shared ones repeated."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


def unique_storages(obj: Any) -> Iterator[Any]:
    """Each distinct tensor storage in ``obj`` once (tied weights and views share one)."""
    seen: set[tuple[int, int]] = set()
    for t in iter_tensors(obj):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            yield storage


def state_nbytes(state: Any) -> int:
    """Tensor bytes ``state`` holds, each shared storage counted once."""
    return sum(s.nbytes() for s in unique_storages(state))


def bytes_view(storage: Any) -> Any:
    """A flat uint8 tensor over a storage, whatever dtype its tensors have."""
    import torch

    return torch.empty(0, dtype=torch.uint8).set_(storage)


def touch(obj: Any) -> int:
    """Read every byte of every tensor storage in ``obj``.

    A loader may hand back lazily mapped tensors (mmap); timing the call alone
    would then measure nothing. Summing forces every page in, for every loader
    alike. The sum runs over int64 words because torch's uint8 sum is ~500x
    slower than a word sum; the few tail bytes are summed as bytes. Costs
    ~0.05 s per GiB on data already in memory.
    """
    import torch

    total = 0
    for storage in unique_storages(obj):
        raw = bytes_view(storage)
        words = raw.numel() // 8 * 8
        if words:
            total += int(raw[:words].view(torch.int64).sum())
        if words < raw.numel():
            total += int(raw[words:].sum())
    return total


# --- memory -------------------------------------------------------------------------

def current_rss() -> int:
    """Resident bytes of this process now (``/proc/self/statm``, as psutil reads it)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil  # not Linux: the only portable way

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


# --- one figure ------------------------------------------------------------------------

def measure_save(save: Callable[[Any], Any], state: Any) -> dict:
    """Time ``save(state)``: {"seconds", "extra_rss" (peak - RSS before), "info" (what it returned)}."""
    gc.collect()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    info = save(state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss": peak_rss() - rss_before, "info": info}


def measure_load(load: Callable[[], Any], state_bytes: int) -> tuple[dict, Any]:
    """Time ``load()`` and reading every byte it returned: ({"seconds", "extra_rss" (peak - RSS
    before - ``state_bytes``), "loaded_nbytes"}, the loaded object)."""
    gc.collect()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    obj = load()
    touch(obj)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "extra_rss": peak_rss() - rss_before - state_bytes,
        # A loader that loses tied-weight sharing returns more bytes than saved.
        "loaded_nbytes": state_nbytes(obj),
    }
    return result, obj


def ratio(baseline_seconds: float | None, seconds: float | None) -> float | None:
    """baseline seconds / seconds: 1.0 is as fast as the baseline, higher is faster."""
    if not baseline_seconds or not seconds:
        return None
    return baseline_seconds / seconds
