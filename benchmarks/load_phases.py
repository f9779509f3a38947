"""Where a cold local ``ckptstore.load`` spends its time, phase by phase, against ``cat``.

    python -m benchmarks.load_phases [--mib 1024] [--repeat 5] [--workdir DIR]

It saves --mib of float32 tensors with ``ckptstore.save`` to a temporary
directory on the repository's disk, then times, from a dropped page cache
each time and in interleaved rounds, the steps a cold load is made of:

- ``cat``: ``cat`` of the checkpoint's data files to /dev/null (the baseline);
- ``populate``: map the data file privately and fault it in front to back in
  8 MiB steps with ``MADV_POPULATE_READ`` (one thread, no checksum);
- ``crc on the mapping``: map it and compute the CRC-32C of each half in two
  threads, the checksums' reads doing the faulting;
- ``populate + crc``: both at once, as ``load`` does;
- ``ckptstore.load(verify=False)`` and ``ckptstore.load()``, every byte of
  every tensor then read (as the benchmark's loads are).

It prints each phase's samples, its best and median, and the ratio of its
median to ``cat``'s. Needs root for the page cache to be dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import crc32c
import torch

@contextlib.contextmanager
def _mapped(path: Path):
    """A private mapping of ``path`` and its address, as ``load`` maps a data file."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        yield mm, ctypes.addressof(anchor)
    finally:
        del anchor
        mm.close()


def _populate(addr: int, n: int) -> None:
    """ckptstore's own populate step (``reader._populate``), run to the end."""
    from ckptstore.reader import _populate as populate
    populate(addr, n, threading.Event())


def _crc_halves(mm) -> None:
    view = memoryview(mm)
    half = len(view) // 2
    threads = [threading.Thread(target=crc32c.crc32c, args=(view[a:b],)) for a, b in ((0, half), (half, len(view)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view.release()


def phase_populate(files):
    for p in files:
        with _mapped(p) as (mm, addr):
            _populate(addr, len(mm))


def phase_crc(files):
    for p in files:
        with _mapped(p) as (mm, _):
            _crc_halves(mm)


def phase_both(files):
    for p in files:
        with _mapped(p) as (mm, addr):
            filler = threading.Thread(target=_populate, args=(addr, len(mm)))
            filler.start()
            _crc_halves(mm)
            filler.join()


def _touch(state) -> None:
    for t in state.values():
        t.view(torch.int64).sum()  # reads every byte


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ckptstore
    from ckptstore.benchmeasure import drop_caches

    scratch = Path(tempfile.mkdtemp(prefix="ckptstore-load-phases-",
                                    dir=args.workdir or Path(__file__).resolve().parent.parent.parent))
    try:
        g = torch.Generator().manual_seed(0)
        state = {f"t{i}": torch.randn(4 << 20, generator=g) for i in range(args.mib // 16)}
        ckpt = scratch / "ckpt"
        ckptstore.save(state, str(ckpt))
        del state
        files = sorted((p for p in ckpt.rglob("*") if p.is_file() and p.stat().st_size >= (1 << 20)),
                       key=lambda p: p.name)
        total = sum(p.stat().st_size for p in files)
        phases = {
            "cat": lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True),
            "populate (1 thread)": lambda: phase_populate(files),
            "crc on the mapping (2 threads)": lambda: phase_crc(files),
            "populate + crc (as load does)": lambda: phase_both(files),
            "ckptstore.load(verify=False) + touch": lambda: _touch(ckptstore.load(str(ckpt), verify=False)),
            "ckptstore.load() + touch": lambda: _touch(ckptstore.load(str(ckpt))),
        }
        samples: dict[str, list[float]] = {k: [] for k in phases}
        for r in range(args.repeat):
            for name, fn in phases.items():
                ok, why = drop_caches()
                if not ok:
                    print(why, file=sys.stderr)
                    return 1
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.repeat} done", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(samples["cat"])
    print(f"\n{total / 2**20:.0f} MiB in {len(files)} data file(s), cold, {args.repeat} interleaved rounds (seconds):")
    for name, s in samples.items():
        med = statistics.median(s)
        print(f"  {name:38s} best {min(s):.3f}  median {med:.3f}  ({base / med:.2f}x cat)  "
              f"[{', '.join(f'{x:.3f}' for x in s)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
