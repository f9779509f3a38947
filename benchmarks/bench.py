"""ckptstore save/load benchmark against same-run baselines.

Run from the repository root::

    python -m benchmarks.bench                      # 1 GiB, best of 3, local + memory
    python -m benchmarks.bench --size-gib 0.1 --repeat 1 --backends local

Every figure is a ratio to a baseline measured in the same run on the same
bytes, so the numbers say something on any machine:

- durable save (``ckptstore.save``, which fsyncs) and ``torch.save`` + fsync
  vs ``dd if=/dev/zero bs=16M conv=fsync`` of the state's byte count;
- cold-cache load (``ckptstore.load``, ``torch.load(weights_only=True)``)
  plus reading every byte vs ``cat`` of the same files after dropping caches;
- extra peak RSS of each save and load as a fraction of the state's bytes;
- crc32c of every tensor byte in memory, as a share of the save time;
- the ``memory://`` backend vs cloning the state's tensors.

Each save and load runs in a fresh process (``benchmarks.worker``) so its
peak memory is its own. Times are the best of ``--repeat``; extra memory is
the worst. Results go to ``<out>/latest.json`` and ``<out>/latest.md``.

Backends live in ``BACKENDS``: a function taking a ``Context`` and returning
table rows. A remote one (s3, gcs, a FUSE mount) starts its server or mount,
saves and loads through the same worker ops with a URL and
``storage_options``, and measures its own baseline (e.g. a boto3 multipart
upload of the same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import psutil

from benchmarks.state import expected_nbytes, gpt_config
from benchmarks.sysutil import drop_caches, fs_type
from benchmarks.worker import RESULT_PREFIX

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30

# Targets from the project brief: ckptstore should run at >= 90% of the raw
# device speed and hold at most 10% of the state extra in memory.
SPEED_TARGET = 0.90
RSS_TARGET = 0.10

# A worker that takes longer than this has hung (or the disk is failing).
WORKER_TIMEOUT_S = 900


# --- plumbing --------------------------------------------------------------

@dataclass
class Context:
    """What every backend benchmark gets."""

    size_bytes: int  # requested size, passed to gpt_state
    state_bytes: int  # tensor bytes gpt_state actually produces
    repeat: int
    workdir: Path
    cold: bool  # page cache can be dropped before loads
    started: float = field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)


class WorkerError(RuntimeError):
    pass


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter and return its result dict."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{spec['op']} timed out after {WORKER_TIMEOUT_S}s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    # The last stderr line of a traceback is the exception itself.
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    raise WorkerError(lines[-1] if lines else f"worker exited with status {proc.returncode}")


def remove(path: Path) -> None:
    """Delete a file or tree, then sync so the freed blocks (and the
    discards ext4 issues for them) are not written back during the next
    timed operation."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


@dataclass
class Series:
    """Repeated measurements of one thing; stops repeating after an error."""

    seconds: list[float] = field(default_factory=list)
    extra_rss: list[int] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    error: str | None = None

    def add(self, fn: Callable[[], dict]) -> dict | None:
        if self.error:
            return None  # a broken operation fails the same way every time
        try:
            out = fn()
        except WorkerError as e:
            self.error = str(e)
            return None
        self.seconds.append(out["seconds"])
        if "extra_rss" in out:
            self.extra_rss.append(out["extra_rss"])
        self.results.append(out)
        return out

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


@dataclass
class Row:
    backend: str
    operation: str
    seconds: float | None  # best of the repeats
    nbytes: int
    gb_per_s: float | None
    baseline: str
    baseline_seconds: float | None
    ratio: float | None  # baseline_seconds / seconds unless ratio_meaning says otherwise
    ratio_meaning: str = "baseline time / time (higher is better)"
    target: float | None = None  # minimum ratio
    extra_rss: float | None = None  # worst extra peak RSS, fraction of nbytes
    rss_target: float | None = None  # maximum extra_rss
    meets_target: bool | None = None
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    extra_rss_bytes: list[int] = field(default_factory=list)
    note: str = ""
    error: str | None = None


def compare(backend: str, operation: str, series: Series, baseline: str,
            base: Series, nbytes: int, target: float | None = None,
            rss_target: float | None = None, note: str = "") -> Row:
    """Row for an operation timed against a baseline doing the same work."""
    row = Row(backend, operation, series.best, nbytes, None, baseline, base.best, None,
              target=target, rss_target=rss_target, samples=series.seconds,
              baseline_samples=base.seconds, extra_rss_bytes=series.extra_rss, note=note,
              error=series.error or base.error)
    if row.seconds:
        row.gb_per_s = nbytes / row.seconds / 1e9
        if row.baseline_seconds:
            row.ratio = row.baseline_seconds / row.seconds
    if series.extra_rss:
        row.extra_rss = max(series.extra_rss) / nbytes
    if target is not None and row.ratio is not None:
        row.meets_target = row.ratio >= target and (
            rss_target is None or (row.extra_rss is not None and row.extra_rss <= rss_target))
    return row


# --- backends ----------------------------------------------------------------

def bench_local(ctx: Context) -> list[Row]:
    """Durable save and cold load on the local disk, against dd and cat.

    Baselines run through the same worker as the library (impl "dd" and
    "cat"), so both sides meet the same process and memory conditions.
    """
    base = ctx.workdir / "local"
    base.mkdir()
    ckpt, torch_file, zeros = base / "ckpt", base / "state.pt", base / "dd.bin"
    n = ctx.state_bytes
    save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
    dd, ck_save, pt_save = Series(), Series(), Series()

    # Repeats are interleaved (dd, ckptstore, torch, dd, ...) so a slow drift
    # in the disk's speed hits every series alike. Each target is removed
    # first: a save over an existing checkpoint would also time its deletion.
    for r in range(ctx.repeat):
        ctx.log(f"local: save round {r + 1}/{ctx.repeat}")
        remove(zeros)
        dd.add(lambda: run_worker({**save, "impl": "dd", "uri": str(zeros)}))
        remove(zeros)
        remove(ckpt)
        ck_save.add(lambda: run_worker({**save, "impl": "ckptstore", "uri": str(ckpt)}))
        remove(torch_file)
        # The crc32c figure rides on the torch.save process: it already holds
        # the state, and torch.save works even while ckptstore does not.
        pt_save.add(lambda: run_worker({**save, "impl": "torch", "uri": str(torch_file), "crc": True}))

    cat_ck, ck_load, cat_pt, pt_load = Series(), Series(), Series(), Series()
    load = {"op": "load", "state_bytes": n, "cold": ctx.cold}
    for r in range(ctx.repeat):
        ctx.log(f"local: load round {r + 1}/{ctx.repeat}")
        if ck_save.seconds:
            cat_ck.add(lambda: run_worker({**load, "impl": "cat", "uri": str(ckpt)}))
            ck_load.add(lambda: run_worker({**load, "impl": "ckptstore", "uri": str(ckpt)}))
        if pt_save.seconds:
            cat_pt.add(lambda: run_worker({**load, "impl": "cat", "uri": str(torch_file)}))
            pt_load.add(lambda: run_worker({**load, "impl": "torch", "uri": str(torch_file)}))
    if not ck_save.seconds:
        ck_load.error = cat_ck.error = "nothing saved to load (ckptstore.save failed)"
    remove(base)

    cache = "cold" if ctx.cold else "warm cache"
    rows = [
        compare("local", "ckptstore.save (durable)", ck_save, "dd conv=fsync", dd, n,
                SPEED_TARGET, RSS_TARGET, note=_save_note(ck_save)),
        compare("local", "torch.save + fsync", pt_save, "dd conv=fsync", dd, n),
        compare("local", f"ckptstore.load ({cache})", ck_load, "cat", cat_ck, n,
                SPEED_TARGET, RSS_TARGET, note=_load_note(ck_load, n, ctx.cold)),
        compare("local", f"torch.load ({cache}, weights_only)", pt_load, "cat", cat_pt, n,
                note=_load_note(pt_load, n, ctx.cold)),
    ]
    rows.append(_crc_row(pt_save, ck_save, n))
    return rows


def _save_note(series: Series) -> str:
    infos = [r.get("info") or {} for r in series.results]
    strategies = sorted({str(i.get("strategy")) for i in infos if i.get("strategy")})
    return f"commit strategy: {', '.join(strategies)}" if strategies else ""


def _load_note(series: Series, nbytes: int, expect_cold: bool = False) -> str:
    """Flag loads that returned a different number of tensor bytes than were
    saved: typically tied weights (lm_head / wte) loaded as two copies."""
    got = {r["loaded_nbytes"] for r in series.results}
    if got and got != {nbytes}:
        return f"loaded {sorted(got)} tensor bytes, saved {nbytes} (storage sharing lost?)"
    if expect_cold and any(not r.get("cold", True) for r in series.results):
        return "the worker could not drop the page cache: warm-cache figure"
    return ""


def _crc_row(with_crc: Series, save: Series, n: int) -> Row:
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


def bench_memory(ctx: Context) -> list[Row]:
    """fsspec's ``memory://`` store vs cloning the tensors in memory.

    The store lives in the process, so clone, save and load share one worker
    per repeat. A save's extra memory includes the store's copy of the data
    (about 1x by nature); a load's can be below zero if it shares the
    store's buffers.
    """
    clone, save, load = Series(), Series(), Series()
    for r in range(ctx.repeat):
        ctx.log(f"memory: round {r + 1}/{ctx.repeat}")
        spec = {"op": "roundtrip", "size_bytes": ctx.size_bytes, "uri": f"memory://bench/r{r}"}
        try:
            out = run_worker(spec)
        except WorkerError as e:
            save.error = load.error = str(e)
            break
        clone.seconds.append(out["clone_seconds"])
        save.add(lambda: out["save"])
        load.add(lambda: out["load"])
    n = ctx.state_bytes
    return [
        compare("memory", "ckptstore.save", save, "tensor clone", clone, n,
                note="extra RSS includes the in-memory store's copy of the data"),
        compare("memory", "ckptstore.load", load, "tensor clone", clone, n,
                note=_load_note(load, n)),
    ]


# Add fuse / s3 / gcs here: each a function (Context) -> list[Row].
BACKENDS: dict[str, Callable[[Context], list[Row]]] = {
    "local": bench_local,
    "memory": bench_memory,
}


# --- report --------------------------------------------------------------------

COLUMNS = ["backend", "operation", "seconds", "GB/s", "baseline", "baseline s",
           "ratio", "target", "extra peak RSS", "meets target"]


def _cells(row: Row) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    if row.error and row.seconds is None:
        return [row.backend, row.operation, "error", "-", row.baseline,
                num(row.baseline_seconds, ".3f"), "-", "-", "-", "error"]
    target = "-" if row.target is None else f">={row.target:.2f}"
    rss = "-" if row.extra_rss is None else f"{row.extra_rss:+.3f}x"
    if row.rss_target is not None and row.extra_rss is not None:
        rss += f" (<={row.rss_target:.2f})"
    meets = {None: "-", True: "yes", False: "NO"}[row.meets_target]
    return [row.backend, row.operation, num(row.seconds, ".3f"), num(row.gb_per_s, ".2f"),
            row.baseline, num(row.baseline_seconds, ".3f"), num(row.ratio, ".2f"),
            target, rss, meets]


def text_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    # Text left-aligned, numbers right-aligned, as a reader scans them.
    left = {0, 1, 4, 9}
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in left else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i in (0, 1, 4, 9) else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def notes_for(rows: list[Row], ctx: Context, cold_note: str) -> list[str]:
    notes = [
        "ratio = baseline seconds / seconds (1.0 = as fast as the baseline), except the "
        "crc32c row, where it is checksum time / save time.",
        f"times are the best of {ctx.repeat}; extra peak RSS is the worst, as a fraction of "
        "the state's tensor bytes (save: peak - RSS before; load: peak - RSS before - state).",
        "loads include reading every byte of every tensor, so lazily mapped results are paid for.",
    ]
    if cold_note:
        notes.append(cold_note)
    for r in rows:
        if r.note:
            notes.append(f"{r.backend} {r.operation}: {r.note}")
        if r.error:
            notes.append(f"{r.backend} {r.operation}: ERROR {r.error}")
    return notes


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(workdir: Path) -> dict[str, Any]:
    """Enough to compare runs; deliberately no hostname or user names."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "ckptstore", "numpy", "fsspec", "crc32c")},
        "workdir_fs": fs_type(str(workdir)),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- main ----------------------------------------------------------------------

def pick_workdir_parent() -> Path:
    """A scratch directory on the repository's disk.

    A benchmark of durable saves on tmpfs (/dev/shm, or /tmp on many
    systems) would measure memory copies, and fsync there is a no-op.
    """
    repo_dev = os.stat(REPO).st_dev
    for cand in (tempfile.gettempdir(), "/var/tmp", str(REPO.parent)):
        if (os.path.isdir(cand) and os.access(cand, os.W_OK)
                and os.stat(cand).st_dev == repo_dev
                and fs_type(cand) not in ("tmpfs", "ramfs")):
            return Path(cand)
    return REPO  # last resort; the scratch dir is removed at the end anyway


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="state size in GiB (default 1.0)")
    p.add_argument("--repeat", type=int, default=3, help="repeats per figure; best is reported (default 3)")
    p.add_argument("--backends", default="local,memory",
                   help=f"comma-separated, from: {', '.join(BACKENDS)} (default local,memory)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="where latest.json and latest.md go (default benchmarks/results)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch space for checkpoints, on the disk to measure "
                        "(default: a temp dir on the repository's disk)")
    p.add_argument("--warm", action="store_true",
                   help="do not drop the page cache before loads (figures are then warm-cache)")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    if args.repeat < 1 or args.size_gib <= 0:
        p.error("--repeat must be >= 1 and --size-gib > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size_bytes = int(args.size_gib * GIB)
    state_bytes = expected_nbytes(size_bytes)

    parent = args.workdir or pick_workdir_parent()
    parent.mkdir(parents=True, exist_ok=True)
    if fs_type(str(parent)) in ("tmpfs", "ramfs"):
        print(f"warning: {parent} is on tmpfs; save figures will not reflect a disk", file=sys.stderr)
    # The local backend holds a checkpoint, a torch file and a dd file at once,
    # plus whatever a save writes before it removes the previous one.
    need = 4 * state_bytes
    if "local" in args.backends and shutil.disk_usage(parent).free < need:
        print(f"error: {parent} has less than {need / GIB:.1f} GiB free", file=sys.stderr)
        return 2
    # Our own subdirectory, so cleaning up never touches anything else.
    workdir = Path(tempfile.mkdtemp(prefix="ckptstore-bench-", dir=parent))

    if args.warm:
        cold, cold_note = False, "page cache not dropped (--warm): load figures are warm-cache"
    else:
        cold, cold_note = drop_caches()
    ctx = Context(size_bytes, state_bytes, args.repeat, workdir, cold)
    cfg = gpt_config(size_bytes)
    ctx.log(f"state: {state_bytes / GIB:.3f} GiB ({cfg}); workdir {workdir} "
            f"({fs_type(str(workdir))}); {'cold' if cold else 'WARM'} cache loads")

    rows: list[Row] = []
    try:
        for name in args.backends:
            rows += BACKENDS[name](ctx)
        info = machine_info(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ctx.log("done")

    notes = notes_for(rows, ctx, cold_note)
    table = text_table(rows)
    print(table)
    print()
    for note in notes:
        print(f"- {note}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "schema": 1,
        "machine": info,
        "config": {"size_gib": args.size_gib, "repeat": args.repeat, "backends": args.backends,
                   "cold_cache": cold, "speed_target": SPEED_TARGET, "rss_target": RSS_TARGET},
        "state": {"bytes": state_bytes, "gpt": cfg},
        "rows": [asdict(r) for r in rows],
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - ctx.started, 1),
    }
    write_atomic(args.out / "latest.json", json.dumps(result, indent=2) + "\n")
    versions = info["versions"]
    md = [
        "# ckptstore benchmark: latest run",
        "",
        f"{info['date']} · {info['cpu_count']} CPUs, {info['memory_bytes'] / GIB:.0f} GiB RAM · "
        f"{info['platform']} · Python {info['python']}, torch {versions['torch']} · "
        f"workdir on {info['workdir_fs']} · state {state_bytes / GIB:.2f} GiB "
        f"(GPT d={cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, AdamW) · "
        f"best of {args.repeat} · {'cold' if cold else 'warm'} cache loads",
        "",
        markdown_table(rows),
        "",
        *[f"- {n}" for n in notes],
        "",
        "Reproduce: `python -m benchmarks.bench "
        f"--size-gib {args.size_gib:g} --repeat {args.repeat} --backends {','.join(args.backends)}`",
        "",
    ]
    write_atomic(args.out / "latest.md", "\n".join(md))
    ctx.log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
