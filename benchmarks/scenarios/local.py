"""The local disk: durable save and cold load against what the device does with the same
bytes (dd conv=fsync, cat), every file peer in the same rounds, and the crc32c share.

Targets (the project brief): at least 90% of the device's speed, at most 10% of the state
extra in memory; the better of load and load(into=) is the one the load target is for.
"""

from __future__ import annotations

from benchmarks.backends.local import LOCAL
from benchmarks.harness.context import Site
from benchmarks.harness.registry import Scenario, peers, scenario
from benchmarks.harness.rounds import directory_rows, directory_series, measure_directory
from benchmarks.harness.series import Row, Series


def measure(site: Site) -> list[Row]:
    """Baselines run through the same worker as the library (impl "dd" and "cat"), so both
    sides meet the same process and memory conditions. The quick run leaves out the peers
    not marked quick, load(into=) and the crc32c row."""
    ctx = site.ctx
    saves, loads = peers("local", "save", ctx.quick), peers("local", "load", ctx.quick)
    series = directory_series(saves, loads)
    full = not ctx.quick
    measure_directory(ctx, "local", site.scratch, series, saves, loads, crc=full, into=full)
    rows = directory_rows(ctx, "local", series, ctx.state_bytes, saves, loads, into=full)
    if full:
        rows.append(crc_row(series["torch_save"], series["ck_save"], ctx.state_bytes))
    return rows


def crc_row(with_crc: Series, save: Series, n: int) -> Row:
    """crc32c of every tensor byte in memory, as a share of the save (it rides on the
    torch.save worker, after that save's figures are taken)."""
    crc = [r["crc_seconds"] for r in with_crc.results if "crc_seconds" in r]
    # The share of a save that one pass of checksumming costs: against the
    # ckptstore save when there is one, else the torch.save it rode on.
    base, base_name = (save, "ckptstore.save (local)") if save.seconds else (with_crc, "torch.save + fsync")
    row = Row("cpu", "crc32c of all tensor bytes (in memory)", min(crc) if crc else None, n,
              None, base_name, base.best, None,
              ratio_meaning="time / baseline time: share of the save (lower is better)",
              samples=crc, baseline_samples=base.seconds,
              error=None if crc else (with_crc.error or "no crc measured"))
    if row.seconds:
        row.gb_per_s = n / row.seconds / 1e9
        if row.baseline_seconds:
            row.ratio = row.seconds / row.baseline_seconds
    return row


scenario(Scenario(
    "local", order=10, measure=measure, backend=LOCAL, disk=6, quick=True,
    baselines=("dd conv=fsync", "cat", "torch.save + fsync, torch.load, torch.load(mmap=True), "
               "safetensors save_file + fsync, load_file, DCP FileSystemWriter / Reader "
               "(peers, the same bytes)")))
