"""What checking a save on a FUSE mount costs, and which checks are honest.

    python -m benchmarks.fuse_check [--mib 512] [--repeat 3] [--workdir DIR]

It mounts rclone as the benchmark does (``--vfs-cache-mode writes``, 2 s
write-back, everything under a scratch directory) and writes --mib of random
bytes to the mount in 16 MiB pieces, computing their CRC-32C as a save does.

Part 1 times, in interleaved rounds (best of --repeat), the ways a writer
could check what the mount holds before it commits:

- ``write``: write, fsync, close; no check (what torch.save and safetensors do);
- ``full``: then a fresh open reads every byte back and compares the CRC-32C
  (what ``ckptstore.save`` does on a mount);
- ``full, 2 threads``: the same read-back split between two threads;
- ``early reader``: a reader opened before the write reads each piece right
  after it is written, so the check overlaps the write;
- ``sample``: write as above, then a fresh open reads 1 MiB of every 64 MiB.

Part 2 asks which of them would see a byte the mount does not hold as it was
written. It writes a file, fsyncs and closes it, then flips one byte in
rclone's VFS cache copy of the file (what the mount now serves from), and
reads the byte through a reader opened before the write and through a fresh
open. A check is honest only if it reads what the mount holds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import crc32c
import numpy as np

PIECE = 16 << 20
SAMPLE, STRIDE = 1 << 20, 64 << 20


def _write(path: Path, data: memoryview, early=None) -> tuple[int, int]:
    """Write ``data`` in pieces, fsync, close; return (crc written, crc read by ``early``)."""
    crc = seen = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), PIECE):
            piece = data[off:off + PIECE]
            os.write(fd, piece)
            crc = crc32c.crc32c(piece, crc)
            if early is not None:
                seen = crc32c.crc32c(os.pread(early, len(piece), off), seen)
        os.fsync(fd)
    finally:
        os.close(fd)
    return crc, seen


def _read_crc(path: Path, start: int, stop: int) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while start < stop:
            chunk = f.read(min(PIECE, stop - start))
            if not chunk:
                break
            crc = crc32c.crc32c(chunk, crc)
            start += len(chunk)
    return crc


def way_write(path: Path, data: memoryview) -> bool:
    _write(path, data)
    return True


def way_full(path: Path, data: memoryview) -> bool:
    crc, _ = _write(path, data)
    return _read_crc(path, 0, len(data)) == crc


def way_full_2(path: Path, data: memoryview) -> bool:
    _write(path, data)
    half = (len(data) // 2 // PIECE) * PIECE
    parts = [(0, half), (half, len(data))]
    got: list[bool] = [False, False]

    def check(i: int) -> None:
        a, b = parts[i]
        got[i] = _read_crc(path, a, b) == crc32c.crc32c(data[a:b])

    threads = [threading.Thread(target=check, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(got)


def way_early(path: Path, data: memoryview) -> bool:
    path.touch()
    early = os.open(path, os.O_RDONLY)
    try:
        crc, seen = _write(path, data, early)
    finally:
        os.close(early)
    return crc == seen


def _sample_differs(path: Path, data: memoryview) -> bool:
    """Through a fresh open: does 1 MiB of some 64 MiB differ from ``data``?"""
    with open(path, "rb", buffering=0) as f:
        for off in range(0, len(data), STRIDE):
            n = min(SAMPLE, len(data) - off)
            f.seek(off)
            if f.read(n) != bytes(data[off:off + n]):
                return True
    return False


def way_sample(path: Path, data: memoryview) -> bool:
    _write(path, data)
    return not _sample_differs(path, data)


WAYS = {"write (no check)": way_write, "full read-back (ckptstore)": way_full,
        "full read-back, 2 threads": way_full_2, "early reader (pipelined)": way_early,
        "sample 1 MiB per 64 MiB": way_sample}


def cache_copy(cache: Path, name: str) -> Path:
    """rclone's VFS cache copy of the file called ``name`` (the data, not its metadata)."""
    hits = [p for p in cache.rglob(name) if p.is_file() and "vfsMeta" not in p.parts]
    if len(hits) != 1:
        raise RuntimeError(f"expected one cache copy of {name} under {cache}, found {hits}")
    return hits[0]


def honesty(mnt: Path, cache: Path, data: memoryview) -> dict[str, bool]:
    """Flip a byte in what the mount holds; which readers see it?"""
    path = mnt / "flip.bin"
    path.touch()
    early = os.open(path, os.O_RDONLY)
    try:
        _write(path, data, early)
        at = min(len(data) - 1, len(data) // 2 + SAMPLE + 12345)  # between two samples
        copy = cache_copy(cache, path.name)
        with open(copy, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())
        early_sees = os.pread(early, 1, at)[0] != data[at]
    finally:
        os.close(early)
    with open(path, "rb", buffering=0) as f:
        f.seek(at)
        fresh_sees = f.read(1)[0] != data[at]
    return {"early reader": early_sees, "fresh open": fresh_sees,
            f"sample ({SAMPLE * 100 / STRIDE:.1f}% of the bytes)": _sample_differs(path, data)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir on the repository's disk)")
    args = ap.parse_args(argv)

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tests"))
    from helpers.backends import RcloneMount

    scratch = Path(tempfile.mkdtemp(prefix="ckptstore-fuse-check-", dir=args.workdir or repo.parent))
    remote, mnt, cache = scratch / "remote", scratch / "mnt", scratch / "cache"
    data = memoryview(np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8).tobytes())
    mount = RcloneMount(str(remote), str(mnt), str(cache), write_back="2s")
    mount.start()
    try:
        best = {k: float("inf") for k in WAYS}
        for r in range(args.repeat):
            for name, way in WAYS.items():
                path = mnt / "check.bin"
                mount.wait_uploaded(timeout=120)  # the last round's upload must not compete
                t = time.perf_counter()
                ok = way(path, data)
                dt = time.perf_counter() - t
                best[name] = min(best[name], dt)
                print(f"round {r + 1}: {name:28s} {dt:6.3f} s  read-back {'matches' if ok else 'DIFFERS'}", flush=True)
                path.unlink()
        mount.wait_uploaded(timeout=120)
        seen = honesty(mnt, cache, data)
    finally:
        mount.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{args.mib} MiB on an rclone mount, best of {args.repeat}:")
    for name, dt in best.items():
        print(f"  {name:28s} {dt:6.3f} s  ({dt / best['write (no check)']:.2f}x the unchecked write)")
    print("\na byte flipped in what the mount holds, after the write:")
    for who, sees in seen.items():
        print(f"  {who:28s} {'sees it' if sees else 'does NOT see it'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
