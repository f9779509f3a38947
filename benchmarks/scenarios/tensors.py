"""What a checkpoint of many small tensors costs, at each of ``--tensor-counts``.

The state (``benchmarks.state.tensors_state``) has exactly n tensors of at most 1 KiB. Local
disk: ``ckptstore.save`` (durable) against torch.save + fsync, ``ckptstore.load`` against
``torch.load(weights_only=True)`` (cold unless --warm), the size of the commit record per
tensor, and a shallow ``ckptstore.verify``, ``ckptstore info DIR`` and ``ckptstore ls
PARENT`` (in-process, and through the CLI in a subprocess for the notes: op ``inspect``,
below). S3 (moto): ``ckptstore.save`` / ``load`` against torch.save to a BytesIO + boto3
``upload_fileobj`` / ``download_fileobj`` + ``torch.load``. If moto will not start, the
local rows still count.

Targets (the small-tensors issue): save and load at least as fast as torch.save + fsync /
torch.load on the same state, a commit record of at most 100 bytes per tensor, and a
shallow verify, `ckptstore info` and `ckptstore ls` under half a second each at 100,000
tensors.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.backends.s3 import S3
from benchmarks.harness.context import MIB, Context, Site, remove
from benchmarks.harness.registry import Scenario, op, scenario
from benchmarks.harness.rounds import rounds
from benchmarks.harness.series import Row, Series, compare, load_note, phase_note, save_note
from benchmarks.harness.servers import BUCKET, clear_prefix
from benchmarks.state import TENSOR_BYTES, tensors_nbytes

TENSOR_SPEED_TARGET = 1.0
COMMIT_BYTES_TARGET = 100
INSPECT_SECONDS_TARGET = 0.5
INSPECT_TARGET_FROM = 100_000  # tensor counts from which the inspection target applies

# Each tensor count's series: the local rows', then the S3 rows'.
TENSOR_LOCAL_SERIES = ("ck_save", "pt_save", "ck_load", "pt_load", "verify", "info", "ls")
TENSOR_S3_SERIES = ("s3_pt_save", "s3_ck_save", "s3_pt_load", "s3_ck_load")


# The inspections (worker.op_inspect's commands): the row, and the command line of its note.
INSPECTIONS = {
    "verify": ("ckptstore.verify (shallow)", "python -m ckptstore verify DIR"),
    "info": ("ckptstore info DIR (cli.main, in-process)", "python -m ckptstore info DIR"),
    "ls": ("ckptstore ls PARENT (cli.main, in-process)", "python -m ckptstore ls PARENT"),
}


def _tensors_local(ctx: Context, root: Path, n: int, s: dict[str, Series]) -> tuple[int, list[str]] | None:
    """The local rows' series for ``n`` tensors; returns the commit record's
    size and file name(s) after the last ckptstore save (None: no record)."""
    where = root / str(n)
    ckpts = where / "ckpts"  # holds the checkpoint alone, for ls
    ckpt, torch_file = ckpts / "ckpt", where / "state.pt"
    ckpts.mkdir(parents=True)
    nbytes = tensors_nbytes(n)
    save = {"op": "save", "tensors": n, "nbytes": nbytes}
    load = {"op": "load", "state_bytes": nbytes, "cold": ctx.cold}
    inspect = {"op": "inspect", "uri": str(ckpt), "parent": str(ckpts)}
    # The inspections run right after the ckptstore load has read the
    # checkpoint back in, so they meet a warm page cache in every round.
    rounds(ctx, f"tensors: {n:,} tensors, local", s,
           saves=[("ck_save", "ckptstore.save", lambda: remove(ckpt),
                   {**save, "impl": "ckptstore", "uri": str(ckpt)}),
                  ("pt_save", "torch.save", lambda: remove(torch_file),
                   {**save, "impl": "torch", "uri": str(torch_file)})],
           loads=[("ck_load", "ck_save", {**load, "impl": "ckptstore", "uri": str(ckpt)}),
                  *((k, "ck_save", {**inspect, "command": k}) for k in INSPECTIONS),
                  ("pt_load", "pt_save", {**load, "impl": "torch", "uri": str(torch_file)})])
    records = sorted(ckpt.glob("*.commit")) if s["ck_save"].seconds else []
    record = (sum(p.stat().st_size for p in records), [p.name for p in records]) if records else None
    remove(where)
    return record


def _tensors_s3(ctx: Context, site: Site, server: Any, n: int, s: dict[str, Series]) -> None:
    """The S3 rows' series for ``n`` tensors, on a running moto server."""
    fs = server.filesystem()  # the driver's, for emptying prefixes
    prefix = f"tensors/{n}"
    uri = site.uri(server, f"{prefix}/ckptstore")
    nbytes = tensors_nbytes(n)
    boto = {"storage_options": server.options(), "bucket": BUCKET, "key": f"{prefix}/torch/state.pt"}
    save = {"op": "save", "tensors": n, "nbytes": nbytes}
    load = {"op": "load", "state_bytes": nbytes, "cold": False}
    rounds(ctx, f"tensors: {n:,} tensors, s3", s,
           saves=[("s3_pt_save", "torch.save + upload_fileobj",
                   lambda: clear_prefix(fs, f"{BUCKET}/{prefix}/torch"),
                   {**save, **boto, "impl": "boto3_fileobj"}),
                  ("s3_ck_save", "ckptstore.save", lambda: clear_prefix(fs, f"{BUCKET}/{prefix}/ckptstore"),
                   {**save, "impl": "ckptstore", "uri": uri})],
           loads=[("s3_pt_load", "s3_pt_save", {**load, **boto, "impl": "boto3_fileobj"}),
                  ("s3_ck_load", "s3_ck_save", {**load, "impl": "ckptstore", "uri": uri})])
    clear_prefix(fs, f"{BUCKET}/{prefix}")


def measure(site: Site) -> list[Row]:
    """The local rows at every count, then the S3 rows on one moto server (see the module docstring)."""
    ctx = site.ctx
    ctx.log("tensors: " + ", ".join(f"{n:,} tensors ({tensors_nbytes(n) / MIB:.2f} MiB)"
                                    for n in ctx.tensor_counts))
    s = {n: {k: Series() for k in (*TENSOR_LOCAL_SERIES, *TENSOR_S3_SERIES)} for n in ctx.tensor_counts}
    records = {n: _tensors_local(ctx, site.scratch, n, s[n]) for n in ctx.tensor_counts}

    def on_server(server: Any) -> None:
        for n in ctx.tensor_counts:
            _tensors_s3(ctx, site, server, n, s[n])

    site.serve(on_server, {f"{n} {k}": s[n][k] for n in ctx.tensor_counts for k in TENSOR_S3_SERIES}, None)
    return _tensor_rows(ctx, s, records)


def _tensor_row(n: int, operation: str, series: Series, baseline: str, base: Series,
                target: float | None = None, note: str = "") -> Row:
    """A row at ``n`` tensors. Extra memory goes into the note in MiB: as a
    fraction of a state of a few KiB it would say nothing."""
    row = compare("tensors", f"{operation}, {n:,} tensors", series, baseline, base,
                  tensors_nbytes(n), target, note=note)
    row.extra_rss = None
    mem = ", ".join(f"{who} {max(x.extra_rss) / MIB:.1f} MiB"
                    for who, x in (("extra peak RSS", series), ("the baseline's", base)) if x.extra_rss)
    row.note = "; ".join(x for x in (note, mem) if x)
    return row


def _commit_row(n: int, record: tuple[int, list[str]] | None, save: Series) -> Row:
    row = Row("tensors", f"commit record bytes per tensor, {n:,} tensors", None, tensors_nbytes(n),
              None, "-", None, None, ratio_meaning="commit record bytes / tensors (lower is better)",
              target=COMMIT_BYTES_TARGET, target_is_max=True)
    if record is None:
        row.error = save.error or "no *.commit file in the saved checkpoint"
        return row
    size, names = record
    row.ratio = size / n
    row.meets_target = row.ratio <= COMMIT_BYTES_TARGET
    row.note = f"{size:,} bytes in {', '.join(names)} for {n:,} tensors"
    return row


def _inspect_row(n: int, command: str, series: Series) -> Row:
    """The in-process time; from INSPECT_TARGET_FROM tensors on, against the
    time limit (ratio = limit / seconds), else for reference."""
    label, cli = INSPECTIONS[command]
    sub = [r["subprocess_seconds"] for r in series.results]
    note = f"through the CLI, `{cli}` in a subprocess: {min(sub):.3f} s (best)" if sub else ""
    if n >= INSPECT_TARGET_FROM:
        row = _tensor_row(n, label, series, f"{INSPECT_SECONDS_TARGET:g} s limit",
                          Series([INSPECT_SECONDS_TARGET]), 1.0, note)
    else:
        row = _tensor_row(n, label, series, "-", Series(), note=note)
    # Not a speed against a baseline: the plot leaves these rows out.
    row.ratio_meaning = (f"limit seconds / seconds (>= 1: within the limit), from "
                         f"{INSPECT_TARGET_FROM:,} tensors on")
    row.gb_per_s = None  # reads metadata, not the tensors
    return row


def _tensor_rows(ctx: Context, s: dict[int, dict[str, Series]],
                 records: dict[int, tuple[int, list[str]] | None]) -> list[Row]:
    """One group of rows per figure, each at every tensor count."""
    cache = "cold" if ctx.cold else "warm cache"
    counts = ctx.tensor_counts
    rows = [_tensor_row(n, "ckptstore.save (durable)", s[n]["ck_save"], "torch.save + fsync",
                        s[n]["pt_save"], TENSOR_SPEED_TARGET, save_note(s[n]["ck_save"])) for n in counts]
    rows += [_tensor_row(n, f"ckptstore.load ({cache})", s[n]["ck_load"],
                         f"torch.load ({cache}, weights_only)", s[n]["pt_load"], TENSOR_SPEED_TARGET,
                         load_note(s[n]["ck_load"], tensors_nbytes(n), ctx.cold)) for n in counts]
    rows += [_commit_row(n, records[n], s[n]["ck_save"]) for n in counts]
    rows += [_inspect_row(n, command, s[n][command]) for command in INSPECTIONS for n in counts]
    rows += [_tensor_row(n, "ckptstore.save to s3", s[n]["s3_ck_save"],
                         "torch.save to BytesIO + upload_fileobj", s[n]["s3_pt_save"],
                         note=phase_note(s[n]["s3_pt_save"]).replace("fastest run", "baseline's fastest run"))
             for n in counts]
    rows += [_tensor_row(n, "ckptstore.load from s3", s[n]["s3_ck_load"],
                         "download_fileobj one GET + torch.load", s[n]["s3_pt_load"],
                         note="; ".join(x for x in (
                             load_note(s[n]["s3_ck_load"], tensors_nbytes(n)),
                             phase_note(s[n]["s3_pt_load"]).replace("fastest run", "baseline's fastest run"))
                             if x))
             for n in counts]
    return rows


def notes(ctx: Context) -> list[str]:
    counts = ", ".join(f"{n:,}" for n in ctx.tensor_counts)
    sizes = ", ".join(f"{tensors_nbytes(n) / MIB:.2f}" for n in ctx.tensor_counts)
    return [
        f"tensors: states of exactly {counts} tensors ({sizes} MiB of tensor bytes): n // 3 weights "
        f"`layers.{{i}}.weight` of {TENSOR_BYTES} bytes (float32), each with an optimizer entry (a "
        f"0-dim float32 `step` and a {TENSOR_BYTES}-byte `exp_avg`), plus n % 3 frozen weights. "
        f"Save and load ratios are torch seconds / ckptstore seconds (local target >= "
        f"{TENSOR_SPEED_TARGET:.2f}); the s3 rows (moto, on this machine) are references, their "
        "baselines timed in full: torch.save to a BytesIO + boto3 upload_fileobj (default "
        "TransferConfig), and download_fileobj with one GET + torch.load. Extra peak RSS is in the "
        "rows' notes in MiB.",
        f"tensors: the commit record is the checkpoint's *.commit file after the last save (ratio = "
        f"bytes per tensor, target <= {COMMIT_BYTES_TARGET}). verify, info and ls each run as the "
        "first call in a fresh worker (ckptstore and its CLI imported), right after a load (warm "
        "page cache), then as `python -m ckptstore ...` in a subprocess (in the row's note); from "
        f"{INSPECT_TARGET_FROM:,} tensors on the target is < {INSPECT_SECONDS_TARGET:g} s in-process "
        "(ratio = limit / seconds >= 1)."]



# --- worker side ------------------------------------------------------------------

def _inspect_calls(uri: str, parent: str) -> dict[str, tuple[Callable[[], int], list[str]]]:
    """For each inspection: the call in this process (returns an exit status)
    and the same as ``python -m ckptstore`` arguments."""
    import ckptstore
    from ckptstore import cli

    return {
        "verify": (lambda: 0 if ckptstore.verify(uri).ok else 1, ["verify", uri]),
        "info": (lambda: cli.main(["info", uri]), ["info", uri]),
        "ls": (lambda: cli.main(["ls", parent]), ["ls", parent]),
    }


@op("inspect")
def op_inspect(spec: dict) -> dict:
    """One inspection of a saved checkpoint, ``spec["command"]``: a shallow
    ``ckptstore.verify(uri)``, ``ckptstore.cli.main(["info", uri])`` or
    ``ckptstore.cli.main(["ls", parent])``, timed as the first call in this
    process (ckptstore and its CLI imported beforehand, output to a buffer),
    then the same through the command line, ``python -m ckptstore ...`` in a
    subprocess (interpreter start and imports included). Either failing
    (a non-zero status) fails the measurement."""
    command = spec["command"]
    call, argv = _inspect_calls(spec["uri"], spec["parent"])[command]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        start = time.perf_counter()
        status = call()
        seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{command} returned {status}: {(err.getvalue() or out.getvalue())[-500:]}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckptstore", *argv], capture_output=True, text=True)
    subprocess_seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"python -m ckptstore {command} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-500:]}")
    return {"seconds": seconds, "subprocess_seconds": subprocess_seconds,
            "output_lines": len(out.getvalue().splitlines())}



scenario(Scenario(
    "tensors", order=130, measure=measure, backend=S3, notes=notes, disk=4,
    nbytes=lambda ctx: tensors_nbytes(max(ctx.tensor_counts)),
    baselines=("torch.save + fsync", "torch.load", "torch.save to BytesIO + upload_fileobj",
               "download_fileobj + torch.load", f"a {INSPECT_SECONDS_TARGET:g} s limit")))
