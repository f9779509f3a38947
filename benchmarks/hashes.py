"""Content-hash candidates for incremental saves, against the save's own speed.

    python -m benchmarks.hashes [--mib 1024] [--repeat 3]

For each candidate (xxhash's xxh3-128, blake3 on one thread and on all cores,
and CRC-32C, which every save already computes) it hashes the same buffer of
random bytes in 8 MiB pieces, as a save streams them, and prints GB/s, best
of --repeat. It then saves a state of the same size with ckptstore.save to a
temporary directory (durable, best of --repeat) and prints what each hash
would add to that save if it ran in the save's path, not alongside it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

PIECE = 8 << 20


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def candidates():
    import crc32c
    import xxhash

    out = {"crc32c (already computed)": lambda buf: _pieces(buf, lambda m, v: crc32c.crc32c(m, v), 0)}

    def xxh(buf):
        h = xxhash.xxh3_128()
        for i in range(0, len(buf), PIECE):
            h.update(buf[i:i + PIECE])
        return h.digest()
    out["xxh3-128"] = xxh
    try:
        import blake3
    except ImportError:
        return out

    def b3(buf, threads=1):
        h = blake3.blake3(max_threads=threads)
        for i in range(0, len(buf), PIECE):
            h.update(buf[i:i + PIECE])
        return h.digest()
    out["blake3, 1 thread"] = b3
    out["blake3, all cores"] = lambda buf: b3(buf, blake3.blake3.AUTO)
    return out


def _pieces(buf, step, value):
    for i in range(0, len(buf), PIECE):
        value = step(buf[i:i + PIECE], value)
    return value


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    n = args.mib << 20
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    buf = memoryview(data).cast("B")
    rows = []
    for name, fn in candidates().items():
        s = _best(lambda: fn(buf), args.repeat)
        rows.append((name, s))
        print(f"{name:28s} {n / s / 1e9:6.2f} GB/s  ({s:.3f} s for {args.mib} MiB)", flush=True)

    import torch

    import ckptstore

    state = {"w": torch.from_numpy(data.copy())}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        k = [0]

        def save():
            k[0] += 1
            ckptstore.save(state, f"{d}/c{k[0]}")
        save_s = _best(save, args.repeat)
    print(f"{'ckptstore.save (durable)':28s} {n / save_s / 1e9:6.2f} GB/s  ({save_s:.3f} s)")
    for name, s in rows:
        print(f"  {name:26s} in the save's path: +{100 * s / save_s:5.1f}% of the save time")


if __name__ == "__main__":
    main()
