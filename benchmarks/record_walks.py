"""How each reader of a commit record scales with the record's size (guarantee 7: never hang).

    python -m benchmarks.record_walks [--depth 25000] [--target 8]

Forges intact records (tests/helpers/records.py) whose node table is a chain of
containers n and 4n deep, and 4n dict keys held as nodes against n, then times
each reader on both: ``open().tensors()``, ``keys()``, ``walk``, ``view[key]``
down the chain, ``info``, ``verify`` (shallow and deep), ``load`` and
``load(select=)``. A reader linear in the record takes about 4x as long on the
larger; the quadratic walks that were replaced took 16x and more. Each ratio is
printed with the target (at most ``--target``, default 8); the exit status is 1
if any misses it. The cyclic GC is off while timing: whether a full collection
falls inside a run depends on what the process held before it, not on the
reader.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import ckptstore
from ckptstore.api import info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.records import chain, dict_keys_record, forge  # noqa: E402


def seconds(fn) -> float:
    """The best of two runs of ``fn``, GC off."""
    best = float("inf")
    for _ in range(2):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


def bottom(value, path):
    for k in path:
        value = value[k]
    return value


CHAIN_READERS = {
    "open().tensors()": lambda d, path: list(ckptstore.open(d).tensors()),
    "open().keys()": lambda d, path: ckptstore.open(d).keys(),
    "open().walk(kinds=tensor)": lambda d, path: list(ckptstore.open(d).walk(kinds=("tensor",))),
    "view[key] down the chain": lambda d, path: bottom(ckptstore.open(d), path[:-1]).keys(),
    "info": lambda d, path: info(d),
    "verify": lambda d, path: ckptstore.verify(d),
    "verify(deep=True)": lambda d, path: ckptstore.verify(d, deep=True),
    "load": lambda d, path: ckptstore.load(d),
    "load(select=)": lambda d, path: ckptstore.load(d, select=path),
}

KEY_READERS = {
    "keys()": lambda d: ckptstore.open(d).keys(),
    "tensors()": lambda d: list(ckptstore.open(d).tensors()),
    "key in view, for every key": lambda d: [k in v for v in [ckptstore.open(d)] for k in v],
    "load(select=)": lambda d: ckptstore.load(d, select=[((5,),)]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=25_000, help="n: the smaller chain's depth (default 25000)")
    ap.add_argument("--keys", type=int, default=10_000, help="the smaller dict's keys (default 10000)")
    ap.add_argument("--target", type=float, default=8.0, help="the largest ratio for 4x the nodes (default 8)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        chains = {}
        for n in (args.depth, 4 * args.depth):
            nodes, path = chain(n)
            chains[n] = (str(forge(Path(tmp) / f"chain{n}", nodes)), path)
        for name, fn in CHAIN_READERS.items():
            (small, sp), (large, lp) = chains[args.depth], chains[4 * args.depth]
            rows.append((f"chain: {name}", seconds(lambda: fn(small, sp)), seconds(lambda: fn(large, lp))))
        small_k = dict_keys_record(Path(tmp) / "keys-small", args.keys)
        large_k = dict_keys_record(Path(tmp) / "keys-large", 4 * args.keys)
        for name, fn in KEY_READERS.items():
            rows.append((f"keys: {name}", seconds(lambda: fn(small_k)), seconds(lambda: fn(large_k))))
    missed = 0
    print(f"{'reader':40} {'n (s)':>9} {'4n (s)':>9} {'ratio':>7}  target <= {args.target:g}")
    for name, small, large in rows:
        ratio = large / max(small, 1e-6)
        ok = ratio <= args.target or large < 0.05     # too small to compare
        missed += not ok
        print(f"{name:40} {small:9.3f} {large:9.3f} {ratio:7.2f}  {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
