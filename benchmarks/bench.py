"""ckptstore save/load benchmark against same-run baselines and the peers a user would pick.

Run from the repository root::

    python -m benchmarks.bench                       # quick (make bench): local disk, FUSE mount, S3; ~3 min
    python -m benchmarks.bench --backends s3 --size 1GiB
    python -m benchmarks.bench --full                # every scenario and row (make bench-full); over an hour
    python -m benchmarks.bench --full --backends tensors --tensor-counts 10,1000 --repeat 1
    python -m benchmarks.bench --full --list         # every row and target the full run produces

Every figure is a ratio to a baseline measured in the same run on the same bytes, in
interleaved rounds, each save and load in a fresh process (``benchmarks.worker``) so its
peak memory is its own. The quick run measures ckptstore and the quick peers (torch.save /
torch.load, its mmap load, safetensors; boto3 and s3torchconnector on S3) at 128 MiB on the
local disk, an rclone FUSE mount and S3 (moto); ``--full`` is every scenario at 1 GiB
(0.5 GiB remote) with every peer. A run writes into a fresh
``benchmarks/results/runs/<date>-<time>/``; only a complete full run at the default settings
rewrites ``benchmarks/results/latest.*`` and the generated tables of README.md and
docs/benchmarks.md.

The harness is ``benchmarks/harness/``; each scenario is a module of
``benchmarks/scenarios/``, each backend of ``benchmarks/backends/``, the peers are in
``benchmarks/peers/`` (see benchmarks/README.md). This module only reads the command line:
``--help`` needs neither psutil nor matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

from benchmarks.harness.context import (
    DEFAULT_TENSOR_COUNTS, GIB, REPO, SCALING_SIZES_MIB, WORKER_TIMEOUT_S, Context)
from benchmarks.harness.registry import Scenario, scenarios

RESULTS = REPO / "benchmarks" / "results"
# (local size GiB, remote size GiB, repeat) of each profile.
QUICK = (0.125, 0.125, 2)
FULL = (1.0, 0.5, 3)
SCALING_S3_MAX_MIB = 1024
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9}


def _size(text: str) -> float:
    """``256MiB``, ``1GiB``, ``0.5`` (GiB) -> GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 256MiB or 1GiB)")
    if not m.group(2):
        return float(m.group(1))
    return float(m.group(1)) * _UNITS[m.group(2).lower()] / GIB


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of counts >= 1, got {text!r}")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    every = scenarios()
    epilog = "scenarios (* = in the quick run) and their baselines:\n" + "\n".join(
        f"  {s.key + ('*' if s.quick else ''):<15} {'; '.join(s.baselines)}" for s in every)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="every scenario, every peer, 1 GiB (0.5 GiB remote), best of 3: the full run "
                        "(make bench-full); without it the quick run (make bench)")
    p.add_argument("--list", action="store_true",
                   help="print every row (backend, operation, baseline, targets) the run would produce, "
                        "measuring nothing")
    p.add_argument("--backends", help=f"comma-separated scenarios, from: {', '.join(s.key for s in every)} "
                                      "(default: the quick ones, or all with --full)")
    p.add_argument("--size", type=_size, help="state size of every scenario, e.g. 256MiB, 1GiB "
                                              "(sets --size-gib and --remote-size-gib)")
    p.add_argument("--size-gib", type=_size, help=f"state size for the local scenarios "
                                                  f"(quick {QUICK[0]}, full {FULL[0]})")
    p.add_argument("--remote-size-gib", type=_size,
                   help=f"state size for the remote ones (fuse, s3, gcs, ...-s3), which move ~50-300 MB/s "
                        f"here (quick {QUICK[1]}, full {FULL[1]})")
    p.add_argument("--repeat", type=int, help=f"rounds per figure; best is reported (quick {QUICK[2]}, "
                                              f"full {FULL[2]})")
    p.add_argument("--tensor-counts", type=_counts,
                   help=f"tensor counts for the tensors and scaling scenarios (default "
                        f"{','.join(map(str, DEFAULT_TENSOR_COUNTS))})")
    p.add_argument("--scaling-sizes-mib", type=_counts,
                   help=f"state sizes in MiB for the scaling scenario (default "
                        f"{','.join(map(str, SCALING_SIZES_MIB))}); S3 measures those up to {SCALING_S3_MAX_MIB}")
    p.add_argument("--out", type=Path,
                   help="where latest.json, latest.md and latest.png go (default: a new "
                        "benchmarks/results/runs/<date>-<time>/; a complete full run: benchmarks/results)")
    p.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S,
                   help=f"seconds one measurement may take before it counts as hung (default {WORKER_TIMEOUT_S})")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch space for checkpoints, on the disk to measure (default: a temp dir on "
                        "the repository's disk)")
    p.add_argument("--warm", action="store_true",
                   help="do not drop the page cache before loads (figures are then warm-cache)")
    args = p.parse_args(argv)
    known = {s.key: s for s in every}
    custom = [k for k in ("backends", "size", "size_gib", "remote_size_gib", "repeat", "tensor_counts",
                          "scaling_sizes_mib") if getattr(args, k) is not None] + (["warm"] if args.warm else [])
    if args.backends is None:
        args.chosen = [s for s in every if args.full or s.quick]
    else:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in names if b not in known]
        if unknown:
            p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
        args.chosen = [known[b] for b in names]
    local, remote, repeat = FULL if args.full else QUICK
    args.size_gib = args.size_gib or args.size or local
    args.remote_size_gib = args.remote_size_gib or args.size or remote
    args.repeat = args.repeat or repeat
    args.tensor_counts = args.tensor_counts or DEFAULT_TENSOR_COUNTS
    args.scaling_sizes_mib = args.scaling_sizes_mib or SCALING_SIZES_MIB
    if args.repeat < 1 or args.size_gib <= 0 or args.remote_size_gib <= 0:
        p.error("--repeat must be >= 1, the sizes > 0")
    if args.worker_timeout <= 0:
        p.error("--worker-timeout must be > 0")
    # Only the full run as it is defined rewrites the results on record.
    args.official = args.full and not custom and args.out is None
    if args.out is None:
        args.out = RESULTS if args.official else (
            RESULTS / "runs" / (datetime.now().strftime("%Y%m%d-%H%M%S") + ("-full" if args.full else "-quick")))
    return args


def context(args: argparse.Namespace) -> Context:
    from benchmarks.state import expected_nbytes

    size, remote = int(args.size_gib * GIB), int(args.remote_size_gib * GIB)
    return Context(size, expected_nbytes(size), args.repeat, args.workdir or Path("."), False, remote,
                   expected_nbytes(remote), args.worker_timeout, args.tensor_counts, args.scaling_sizes_mib,
                   SCALING_S3_MAX_MIB, quick=not args.full)


def reproduce(args: argparse.Namespace, chosen: list[Scenario]) -> str:
    return (f"python -m benchmarks.bench{' --full' if args.full else ''} --size-gib {args.size_gib:g} "
            f"--remote-size-gib {args.remote_size_gib:g} --repeat {args.repeat} "
            f"--backends {','.join(s.key for s in chosen)}"
            + (f" --tensor-counts {','.join(map(str, args.tensor_counts))}"
               if args.tensor_counts != DEFAULT_TENSOR_COUNTS else "")
            + (f" --scaling-sizes-mib {','.join(map(str, args.scaling_sizes_mib))}"
               if args.scaling_sizes_mib != SCALING_SIZES_MIB else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = context(args)
    if args.list:
        from benchmarks.harness.driver import list_rows

        rows = list_rows(args.chosen, ctx)
        for r in rows:
            target = "-" if r.target is None else f"{'<=' if r.target_is_max else '>='}{r.target:.2f}"
            rss = "-" if r.rss_target is None else f"<={r.rss_target:.2f}"
            print(f"{r.backend}\t{r.operation}\t{r.baseline}\t{target}\t{rss}")
        print(f"{len(rows)} rows", file=sys.stderr)
        return 0
    try:
        import psutil  # noqa: F401 - the harness reads mounts and the network through it
    except ImportError:
        print("error: the benchmark needs the `bench` extra: pip install -e '.[bench]' "
              "(make bench installs it)", file=sys.stderr)
        return 2
    from benchmarks.harness.driver import pick_workdir_parent, run

    ctx.workdir = args.workdir or pick_workdir_parent()
    config = {"profile": "full" if args.full else "quick", "size_gib": args.size_gib,
              "remote_size_gib": args.remote_size_gib, "repeat": args.repeat,
              "backends": [s.key for s in args.chosen], "worker_timeout_s": args.worker_timeout,
              "tensor_counts": list(args.tensor_counts), "scaling_sizes_mib": list(args.scaling_sizes_mib)}
    return run(args.chosen, ctx, args.out, args.warm, config, reproduce(args, args.chosen), args.official)


if __name__ == "__main__":
    sys.exit(main())
