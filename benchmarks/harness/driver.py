"""The run: a scratch directory on the disk to measure, each chosen scenario in a directory
of its own, the table and notes printed, the results written.

A scenario that cannot start its server, or whose operations fail, still returns its rows
marked with the error; one whose own code breaks becomes a single error row. Servers and
mounts are stopped, and scratch files removed, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from ckptstore.benchmeasure import drop_caches

from benchmarks.harness.context import GIB, REPO, Context, Site
from benchmarks.harness.registry import Scenario
from benchmarks.harness.report import (
    gpt_scenarios, machine_info, notes_for, text_table, write_results)
from benchmarks.harness.series import Row
from benchmarks.harness.servers import fs_type, mounts_under

# gcsfs probes every bucket over gRPC first and waits 60 s for that to time out against the
# emulator. Set before anything imports gcsfs; the workers inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def pick_workdir_parent() -> Path:
    """A scratch directory on the repository's disk.

    A benchmark of durable saves on tmpfs (/dev/shm, or /tmp on many systems) would
    measure memory copies, and fsync there is a no-op.
    """
    repo_dev = os.stat(REPO).st_dev
    for cand in (tempfile.gettempdir(), "/var/tmp", str(REPO.parent)):
        if (os.path.isdir(cand) and os.access(cand, os.W_OK)
                and os.stat(cand).st_dev == repo_dev
                and fs_type(cand) not in ("tmpfs", "ramfs")):
            return Path(cand)
    return REPO  # last resort; the scratch dir is removed at the end anyway


def cleanup(workdir: Path) -> None:
    """Remove the scratch directory, unless a mount is still inside it: then rmtree would
    delete through the mount, so leave it and say so."""
    mounts = mounts_under(workdir)
    if mounts:
        print(f"warning: {', '.join(mounts)} still mounted; leaving {workdir} in place "
              f"(unmount with fusermount3 -uz, then remove it)", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


def run_scenario(sc: Scenario, ctx: Context) -> list[Row]:
    """Measure one scenario in a scratch directory of its own."""
    site = Site(sc, ctx.remote() if sc.remote else ctx)
    site.scratch.mkdir()
    try:
        return sc.measure(site)
    finally:
        # Never through a mount that failed to unmount (see cleanup).
        if ctx.dry or not mounts_under(site.scratch):
            shutil.rmtree(site.scratch, ignore_errors=True)
            if not ctx.dry:
                os.sync()


def _terminated(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so servers are stopped, mounts unmounted and scratch
    # files removed on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def _scenario_failed(name: str, ctx: Context, e: Exception) -> list[Row]:
    """A row saying a scenario's own code broke (a bug in it, not a measured failure, which
    the scenario records in its own rows)."""
    traceback.print_exc()
    ctx.log(f"{name}: benchmark failed: {type(e).__name__}: {e}")
    return [Row(name, "benchmark", None, ctx.state_bytes, None, "-", None, None, error=f"{type(e).__name__}: {e}")]


def list_rows(chosen: list[Scenario], ctx: Context) -> list[Row]:
    """Every row the run would produce, with its target, measuring nothing: each scenario
    runs with every measurement failing at once as "not measured" (``Context.dry``)."""
    workdir = Path(tempfile.mkdtemp(prefix="ckptstore-bench-list-"))
    ctx = replace(ctx, workdir=workdir, dry=True, cold=True)
    rows: list[Row] = []
    try:
        for sc in chosen:
            rows += run_scenario(sc, ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def run(chosen: list[Scenario], ctx: Context, out: Path, warm: bool, config: dict, reproduce: str,
        official: bool) -> int:
    """Measure ``chosen`` and write the results to ``out``; ``official``: a complete full run,
    which also rewrites the generated tables of README.md and docs/benchmarks.md."""
    parent = ctx.workdir
    parent.mkdir(parents=True, exist_ok=True)
    if fs_type(str(parent)) in ("tmpfs", "ramfs"):
        print(f"warning: {parent} is on tmpfs; save figures will not reflect a disk", file=sys.stderr)
    # Each scenario's ``disk``: the local one holds a checkpoint, a torch file and a dd file
    # at once, plus whatever a save writes before it removes the previous one; the FUSE
    # mount holds each of them twice (rclone's cache and the remote directory); s3 stages a
    # torch.save file on local disk and moto spools objects there.
    need = max((sc.disk * sc.state_bytes(ctx) for sc in chosen), default=0)
    if need and shutil.disk_usage(parent).free < need:
        print(f"error: {parent} has less than {need / GIB:.1f} GiB free", file=sys.stderr)
        return 2
    # Our own subdirectory, so cleaning up never touches anything else.
    workdir = Path(tempfile.mkdtemp(prefix="ckptstore-bench-", dir=parent))
    if warm:
        cold, cold_note = False, "page cache not dropped (--warm): load figures are warm-cache"
    else:
        cold, cold_note = drop_caches()
    ctx = replace(ctx, workdir=workdir, cold=cold)
    from benchmarks.state import gpt_config

    ctx.log(f"state: {ctx.state_bytes / GIB:.3f} GiB ({gpt_config(ctx.size_bytes)}); workdir {workdir} "
            f"({fs_type(str(workdir))}); {'cold' if cold else 'WARM'} cache loads"
            + ("; quick run (make bench-full for every row)" if ctx.quick else ""))
    if any(sc.remote for sc in chosen):
        keys = {sc.key for sc in chosen}
        ctx.log(f"{'/'.join(k for k in gpt_scenarios(remote=True) if k in keys)} state: "
                f"{ctx.remote_state_bytes / GIB:.3f} GiB "
                f"({gpt_config(ctx.remote_size_bytes)})")

    rows: list[Row] = []
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for sc in chosen:
            try:
                rows += run_scenario(sc, ctx)
            except Exception as e:  # one broken scenario must not lose the others' figures
                rows += _scenario_failed(sc.key, ctx, e)
        info = machine_info(workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup(workdir)
    ctx.log(f"done in {time.perf_counter() - ctx.started:.0f}s")

    notes = notes_for(rows, ctx, cold_note)
    print(text_table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    result = write_results(out, rows, ctx, info, {**config, "cold_cache": cold}, notes, reproduce)
    if official:
        from benchmarks.harness import readme
        for path in readme.update_all(result):
            ctx.log(f"updated the generated benchmark table in {path.relative_to(REPO)}")
    print(f"\nresults: {out}", file=sys.stderr)
    return 0
