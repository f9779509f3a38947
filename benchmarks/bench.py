"""ckptstore save/load benchmark against same-run baselines.

Run from the repository root::

    python -m benchmarks.bench                      # every backend: local, memory, manager, dcp, fuse, s3, gcs, tensors
    python -m benchmarks.bench --size-gib 0.1 --remote-size-gib 0.1 --repeat 1
    python -m benchmarks.bench --backends s3,gcs
    python -m benchmarks.bench --backends tensors --tensor-counts 10,1000,100000

Every figure is a ratio to a baseline measured in the same run on the same
bytes, so the numbers say something on any machine:

- durable save (``ckptstore.save``, which fsyncs) and ``torch.save`` + fsync
  vs ``dd if=/dev/zero bs=16M conv=fsync`` of the state's byte count, on the
  local disk and on an rclone FUSE mount (a Drive-like mount);
- cold-cache load (``ckptstore.load``, ``torch.load(weights_only=True)``)
  plus reading every byte vs ``cat`` of the same files after dropping caches;
- S3 (moto server): save vs boto3 ``upload_file`` of a torch.save file,
  load vs boto3 ``download_file`` + ``torch.load``; the Lightning-style save
  (torch.save to BytesIO, s3fs ``pipe``) as a reference;
- GCS (gcp-storage-emulator): save vs gcsfs ``pipe`` of the torch.save
  bytes, load vs gcsfs ``cat`` + ``torch.load``;
- extra peak RSS of each save and load as a fraction of the state's bytes;
- crc32c of every tensor byte in memory, as a share of the save time;
- the ``memory://`` backend vs cloning the state's tensors;
- ``CheckpointManager`` on local disk: how long ``save()`` blocks with
  ``async_save=True`` vs cloning every tensor storage (blocking manager and
  torch.save + fsync saves for reference), and a small CPU training loop's
  steps/s while the background save runs vs with nothing running;
- many small tensors (10, 1,000, 100,000 by ``--tensor-counts``): save and
  load vs torch.save/torch.load on the local disk and on S3, the commit
  record's bytes per tensor, and how long verify, ``ckptstore info`` and
  ``ckptstore ls`` take.

Each save and load runs in a fresh process (``benchmarks.worker``) so its
peak memory is its own. Times are the best of ``--repeat``; extra memory is
the worst. Results go to ``<out>/latest.json``, ``<out>/latest.md`` and
``<out>/latest.png`` (when matplotlib is installed).

Backends live in ``BACKENDS``, one ``Backend`` entry each: its key, whether
it is remote, its launcher (a context manager that starts its server or
mount, on the test suite's launchers in ``tests/helpers/backends.py``, and
yields a handle), how a checkpoint URI is built from that handle, its
baselines, its notes and targets, the scratch space it needs and the
function that measures it and returns its rows. The driver gives that
function a ``Site`` (its context, with the state size it measures, a
scratch directory, the URI builder, and ``serve()``, which runs a
measurement under the launcher). Saves and loads go through the same worker
ops whatever the URI, and each backend measures its own baseline in the
same worker. A backend that cannot start or whose saves fail still returns
its rows, marked with the error, so one broken backend never hides the
others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import psutil

from benchmarks.plot import write_plot, write_scaling_plot
from benchmarks.state import TENSOR_BYTES, expected_nbytes, gpt_config, tensors_nbytes
from benchmarks.sysutil import drop_caches, fs_type
from benchmarks.worker import RESULT_PREFIX

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30

# Targets from the project brief: ckptstore should run at >= 90% of the raw
# device speed and hold at most 10% of the state extra in memory. They apply
# to the local disk and, with dd/cat on the mount as the device, to FUSE.
SPEED_TARGET = 0.90
RSS_TARGET = 0.10
# Targets from the object-store issue: at least as fast as the boto3/gcsfs
# way of doing the same thing, at most a quarter of the state extra in memory.
REMOTE_SPEED_TARGET = 1.0
REMOTE_RSS_TARGET = 0.25
# Targets from the async-checkpoint issue: an async save blocks training for
# at most 1.5x the time a plain in-memory copy of the state takes (as a
# ratio clone / stall: >= 1/1.5), and training keeps >= 80% of its steps/s
# while the background write runs.
STALL_TARGET = 1 / 1.5
TRAIN_TARGET = 0.80
# torch intra-op threads for the training loop of the throughput rows: 0 is
# torch's default (one per core), 1 the fair alternative of leaving the
# other core(s) to the save.
TRAIN_THREADS = (0, 1)

# Targets from the small-tensors issue: save and load at least as fast as
# torch.save + fsync / torch.load on the same state, a commit record of at
# most 100 bytes per tensor, and a shallow verify, `ckptstore info` and
# `ckptstore ls` under half a second each at 100,000 tensors.
TENSOR_SPEED_TARGET = 1.0
COMMIT_BYTES_TARGET = 100
INSPECT_SECONDS_TARGET = 0.5
INSPECT_TARGET_FROM = 100_000  # tensor counts from which the inspection target applies
DEFAULT_TENSOR_COUNTS = (10, 1_000, 100_000)

# A worker that takes longer than this has hung (or the disk is failing).
WORKER_TIMEOUT_S = 600

BUCKET = "bench"

# gcsfs probes every bucket over gRPC first and waits 60 s for that to time
# out against the emulator. Set before anything imports gcsfs; the workers
# inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# --- plumbing --------------------------------------------------------------

@dataclass
class Context:
    """What every backend benchmark gets."""

    size_bytes: int  # requested size, passed to gpt_state
    state_bytes: int  # tensor bytes gpt_state actually produces
    repeat: int
    workdir: Path
    cold: bool  # page cache can be dropped before loads
    remote_size_bytes: int = 0  # the same two for the remote backends (--remote-size-gib)
    remote_state_bytes: int = 0
    worker_timeout: float = WORKER_TIMEOUT_S
    tensor_counts: tuple[int, ...] = DEFAULT_TENSOR_COUNTS  # for the tensors and scaling backends
    scaling_sizes_mib: tuple[int, ...] = (64, 256, 1024, 4096)  # the scaling backend's local sizes
    scaling_s3_max_mib: int = 1024  # ... and the largest it also measures on S3
    started: float = field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def run(self, spec: dict) -> dict:
        return run_worker(spec, self.worker_timeout)

    def remote(self) -> "Context":
        """This context with the remote backends' state size."""
        return replace(self, size_bytes=self.remote_size_bytes, state_bytes=self.remote_state_bytes)


class WorkerError(RuntimeError):
    pass


def run_worker(spec: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Run one measurement in a fresh interpreter and return its result dict."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        what = " ".join(x for x in (spec.get("impl"), spec["op"]) if x)
        raise WorkerError(f"{what} timed out after {timeout:.0f}s") from None
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

    def view(self, seconds: Callable[[dict], float]) -> "Series":
        """The same runs timed differently: e.g. only the upload step of a
        baseline that first torch.saves to a file and then uploads it."""
        return Series([seconds(r) for r in self.results], list(self.extra_rss),
                      list(self.results), self.error)

    def phase(self, *names: str) -> "Series":
        """The runs timed as the sum of the named steps in their ``phases``."""
        return self.view(lambda r: sum(r["phases"][n] for n in names))

    def fail(self, error: str) -> None:
        """Record an error from outside the worker (a server that would not
        start, a cleanup that failed); the first error is kept."""
        self.error = self.error or error


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
    target: float | None = None  # minimum ratio (maximum with target_is_max)
    extra_rss: float | None = None  # worst extra peak RSS, fraction of nbytes
    rss_target: float | None = None  # maximum extra_rss
    meets_target: bool | None = None
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    extra_rss_bytes: list[int] = field(default_factory=list)
    note: str = ""
    error: str | None = None
    target_is_max: bool = False  # the ratio must be at most the target (e.g. bytes per tensor)
    # A point of a scaling curve (scaling.png): the curve's name, its axis ("size": x is the
    # state's bytes; "tensors": x is the tensor count) and x.
    curve: str = ""
    axis: str = ""
    x: int | None = None


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


# --- the backend registry ------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class Backend:
    """One backend of the benchmark: everything the driver knows about it.

    Adding a backend is one of these in ``REGISTRY`` (its ``measure``
    function included) and, when it needs a server or mount, one launcher.
    """

    key: str  # its --backends name and the backend column of its rows
    measure: Callable[["Site"], list[Row]]  # runs its benchmark, returns its rows
    remote: bool = False  # behind a server or mount: measures the --remote-size-gib state
    # Starts what it measures and stops it however the block ends: a context
    # manager factory taking the Site and yielding a handle (the server or
    # mount) for ``uri`` and the measurement; see ``Site.serve``.
    launcher: Callable[["Site"], ContextManager[Any]] | None = None
    uri: Callable[[Any, str], str] | None = None  # (handle, name) -> where checkpoint ``name`` goes
    baselines: tuple[str, ...] = ()  # what its rows are timed against (listed by --help)
    notes: Callable[[Context], list[str]] = lambda ctx: []  # its notes and targets under the table
    disk: float = 0.0  # scratch space it needs, in multiples of its state's bytes
    # Its state's tensor bytes when it does not measure the GPT state of
    # --size-gib / --remote-size-gib.
    nbytes: Callable[[Context], int] | None = None

    def state_bytes(self, ctx: Context) -> int:
        if self.nbytes is not None:
            return self.nbytes(ctx)
        return ctx.remote_state_bytes if self.remote else ctx.state_bytes


@dataclass
class Site:
    """What a backend's ``measure`` gets: its entry, the context (with the
    state size the backend measures) and a scratch directory of its own,
    which the driver creates before and removes after."""

    backend: Backend
    ctx: Context

    @property
    def key(self) -> str:
        return self.backend.key

    @property
    def scratch(self) -> Path:
        return self.ctx.workdir / self.key

    def uri(self, handle: Any, name: str) -> str:
        assert self.backend.uri is not None, f"{self.key} has no uri builder"
        return self.backend.uri(handle, name)

    def serve(self, measure: Callable[[Any], T], series: dict[str, Series], default: T) -> T:
        """``measure(handle)`` with the backend's launcher running. A launcher
        that will not start, a server that dies or a cleanup that fails marks
        every series in ``series`` that did not get all its runs with the
        error, and returns ``default``: the rows still come, saying why."""
        assert self.backend.launcher is not None, f"{self.key} has no launcher"
        try:
            with self.backend.launcher(self) as handle:
                return measure(handle)
        except Exception as e:
            _fail_unfinished(self.ctx, self.key, series, e)
            return default


def run_backend(backend: Backend, ctx: Context) -> list[Row]:
    """Measure one backend in a scratch directory of its own."""
    site = Site(backend, ctx.remote() if backend.remote else ctx)
    site.scratch.mkdir()
    try:
        return backend.measure(site)
    finally:
        # Never through a mount that failed to unmount (see cleanup).
        if not _mounts_under(site.scratch):
            shutil.rmtree(site.scratch, ignore_errors=True)
            os.sync()


def launchers():
    """The test suite's loopback servers and mounts (``tests/helpers/backends.py``):
    one implementation of starting moto, the GCS emulator and rclone, shared
    with the tests."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers import backends

    return backends


@contextlib.contextmanager
def running(ctx: Context, backend: Any) -> Iterator[Any]:
    """Start a server or mount; stop it however the block ends.

    On Ctrl-C (or SIGTERM) a mount is killed rather than waited for, and a
    failure while stopping is logged, never raised: it must not replace the
    interrupt (the benchmark would carry on) or the error that ended the
    block (which says more).
    """
    backend.start()
    try:
        yield backend
    except BaseException as e:
        interrupted = not isinstance(e, Exception)
        try:
            if interrupted and hasattr(backend, "kill_vm"):
                backend.kill_vm()  # nothing on it is worth an upload now
            else:
                backend.stop()
        except Exception as stop_error:  # noqa: BLE001 - see above
            ctx.log(f"while stopping {backend!r}: {type(stop_error).__name__}: {stop_error}")
        raise
    backend.stop()


def _fail_unfinished(ctx: Context, backend: str, series: dict[str, Series], e: BaseException) -> None:
    """Mark every series that did not get all its runs with what stopped it."""
    msg = f"{type(e).__name__}: {e}".strip()
    ctx.log(f"{backend}: {msg}")
    for s in series.values():
        if len(s.seconds) < ctx.repeat:
            s.fail(msg)


# --- launchers and URIs ----------------------------------------------------------
# A launcher is a context manager factory (Site) -> handle; a URI builder maps
# (handle, name) to where a checkpoint called ``name`` goes.

def _loopback_server(cls: str, what: str) -> Callable[[Site], ContextManager[Any]]:
    """A launcher for one of the test suite's loopback object stores, with
    bucket ``BUCKET`` created."""
    @contextlib.contextmanager
    def launch(site: Site) -> Iterator[Any]:
        with running(site.ctx, getattr(launchers(), cls)()) as server:
            server.create_bucket(BUCKET)
            site.ctx.log(f"{site.key}: {what} at {server.endpoint}")
            yield server

    return launch


moto_server = _loopback_server("MotoServer", "moto")
gcs_emulator = _loopback_server("GcsEmulator", "emulator")


@contextlib.contextmanager
def rclone_mount(site: Site) -> Iterator[Any]:
    """``rclone mount REMOTE MNT --vfs-cache-mode writes --vfs-write-back 2s``,
    remote, mount point and cache in the scratch directory, with an empty
    ``bench`` directory on the mount."""
    remote, mnt, cache = site.scratch / "remote", site.scratch / "mnt", site.scratch / "cache"
    for d in (remote, mnt, cache):
        d.mkdir(parents=True)
    rclone = launchers().RcloneMount(str(remote), str(mnt), str(cache), write_back="2s")
    with running(site.ctx, rclone) as mount:
        (mnt / "bench").mkdir()
        site.ctx.log(f"{site.key}: rclone mount on {mnt} ({fs_type(str(mnt))})")
        yield mount


def s3_uri(server: Any, name: str) -> str:
    opts = server.options()
    return (f"s3://{BUCKET}/{name}?endpoint_url={opts['endpoint_url']}"
            f"&key={opts['key']}&secret={opts['secret']}")


def gcs_uri(server: Any, name: str) -> str:
    opts = server.options()
    return (f"gs://{BUCKET}/{name}?endpoint_url={opts['endpoint_url']}"
            f"&token={opts['token']}&project={opts['project']}")


def mount_uri(mount: Any, name: str) -> str:
    return str(Path(mount.mountpoint) / "bench" / name)


def memory_uri(_: Any, name: str) -> str:
    return f"memory://bench/{name}"


# --- backends ----------------------------------------------------------------

def bench_local(site: Site) -> list[Row]:
    """Durable save and cold load on the local disk, against dd and cat.

    Baselines run through the same worker as the library (impl "dd" and
    "cat"), so both sides meet the same process and memory conditions.
    """
    ctx = site.ctx
    series = _directory_series(LOCAL_PEERS)
    _measure_directory(ctx, "local", site.scratch, series, LOCAL_PEERS, crc=True, into=True)
    rows = _directory_rows(ctx, "local", series, ctx.state_bytes, LOCAL_PEERS)
    rows.append(_crc_row(series["pt_save"], series["ck_save"], ctx.state_bytes))
    return rows


@dataclass(frozen=True)
class Peers:
    """The peers a user would pick instead, on the same bytes. Each save is
    (series, worker impl, row label, what it writes: a key of ``PEER_FILES``);
    each load reads what the save with the same last field wrote."""

    saves: tuple[tuple[str, str, str, str], ...]
    loads: tuple[tuple[str, str, str, str], ...]

    def keys(self) -> tuple[str, ...]:
        return tuple(p[0] for p in (*self.saves, *self.loads))


PEER_FILES = {"pt": "state.pt", "st": "state.safetensors", "dcp": "dcp"}
FILE_PEERS = Peers(
    saves=(("pt_save", "torch", "torch.save + fsync", "pt"),
           ("st_save", "safetensors", "safetensors save_file + fsync", "st")),
    loads=(("pt_load", "torch", "torch.load", "pt"),
           ("pt_mmap_load", "torch_mmap", "torch.load(mmap=True)", "pt"),
           ("st_load", "safetensors", "safetensors load_file", "st")))
# On the local disk DCP's own writer too (FileSystemWriter fsyncs by default).
LOCAL_PEERS = Peers(
    saves=(*FILE_PEERS.saves, ("dcp_save", "dcp_fs", "DCP save, FileSystemWriter", "dcp")),
    loads=(*FILE_PEERS.loads, ("dcp_load", "dcp_fs", "DCP load, FileSystemReader (in place)", "dcp")))


def _directory_series(peers: Peers) -> dict[str, Series]:
    return {k: Series() for k in ("dd", "ck_save", "cat", "ck_load", "ck_into", *peers.keys())}


def _measure_directory(ctx: Context, backend: str, base: Path, s: dict[str, Series], peers: Peers,
                       settle: Callable[[], Any] = lambda: None, crc: bool = False,
                       state: dict | None = None, into: bool = False) -> None:
    """dd / ckptstore.save / torch.save / safetensors save_file into ``base``, then cat and
    every loader of what was saved.

    Each round measures the baseline and every candidate once, one after the other, so every
    ratio in a table shares one baseline series measured in the same rounds. ``settle`` runs,
    untimed, after every write and removal: on a FUSE mount it waits for the background
    upload so that it never overlaps the next measurement.
    """
    ckpt, zeros = base / "ckpt", base / "dd.bin"
    files = {k: base / name for k, name in PEER_FILES.items()}
    n = ctx.state_bytes
    # ``state``: another state than the GPT one of ctx.size_bytes (worker.build_state's keys).
    save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n, **(state or {})}

    def clear(path: Path) -> None:
        remove(path)
        settle()

    # A slow drift in the disk's speed hits every series alike. Each target is removed
    # first: a save over an existing checkpoint would also time its deletion.
    for r in range(ctx.repeat):
        ctx.log(f"{backend}: save round {r + 1}/{ctx.repeat}")
        clear(zeros)
        s["dd"].add(lambda: ctx.run({**save, "impl": "dd", "uri": str(zeros)}))
        settle()
        clear(zeros)
        clear(ckpt)
        s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": str(ckpt)}))
        settle()
        for key, impl, _, src in peers.saves:
            path = files[src]
            clear(path)
            # The crc32c figure rides on the torch.save process: it already holds
            # the state, and torch.save works even while ckptstore does not.
            s[key].add(lambda: ctx.run({**save, "impl": impl, "uri": str(path),
                                        "crc": crc and impl == "torch"}))
            settle()

    # size_bytes: DCP loads in place into tensors of the saved structure.
    load = {"op": "load", "state_bytes": n, "size_bytes": ctx.size_bytes, "cold": ctx.cold, **(state or {})}
    saved = {src: bool(s[key].seconds) for key, _, _, src in peers.saves}
    for r in range(ctx.repeat):
        ctx.log(f"{backend}: load round {r + 1}/{ctx.repeat}")
        if s["ck_save"].seconds:
            s["cat"].add(lambda: ctx.run({**load, "impl": "cat", "uri": str(ckpt)}))
            s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": str(ckpt)}))
            if into:  # ``into``: also load(into=), which writes into tensors that already exist
                s["ck_into"].add(lambda: ctx.run({**load, "impl": "ckptstore_into", "uri": str(ckpt)}))
        for key, impl, _, src in peers.loads:
            if saved[src]:
                s[key].add(lambda: ctx.run({**load, "impl": impl, "uri": str(files[src])}))
    if not s["ck_save"].seconds:
        for k in ("ck_load", "cat", *(("ck_into",) if into else ())):
            s[k].fail("nothing saved to load (ckptstore.save failed)")
    for key, _, _, src in peers.loads:
        if not saved[src]:
            s[key].fail(f"nothing saved to load ({src} save failed)")


def _peers_note(ours: Series, peers: list[tuple[str, Series]]) -> str:
    """ckptstore's best time against each peer's best, measured in the same rounds."""
    if not ours.seconds:
        return ""
    parts = [f"{min(p.seconds) / min(ours.seconds):.2f}x {label}" for label, p in peers if p.seconds]
    return ("against " + ", ".join(parts)) if parts else ""


def _directory_rows(ctx: Context, backend: str, s: dict[str, Series], n: int, peers: Peers,
                    load_note: str = "", save_label: str = "ckptstore.save (durable)") -> list[Row]:
    cache = "cold" if ctx.cold else "warm cache"

    def joined(*notes: str) -> str:
        return "; ".join(x for x in notes if x)

    save_peers = [(label, s[key]) for key, _, label, _ in peers.saves]
    load_peers = [(label, s[key]) for key, _, label, _ in peers.loads]
    rows = [compare(backend, save_label, s["ck_save"], "dd conv=fsync", s["dd"], n, SPEED_TARGET, RSS_TARGET,
                    note=joined(_save_note(s["ck_save"]), _peers_note(s["ck_save"], save_peers)))]
    rows += [compare(backend, label, s[key], "dd conv=fsync", s["dd"], n) for key, _, label, _ in peers.saves]
    rows.append(compare(backend, f"ckptstore.load ({cache})", s["ck_load"], "cat", s["cat"], n,
                        SPEED_TARGET, RSS_TARGET,
                        note=joined(_load_note(s["ck_load"], n, ctx.cold), load_note,
                                    _peers_note(s["ck_load"], load_peers))))
    if s["ck_into"].seconds or s["ck_into"].error:
        rows.append(compare(backend, f"ckptstore.load(into=) ({cache})", s["ck_into"], "cat", s["cat"], n,
                            SPEED_TARGET, RSS_TARGET,
                            note=joined(_load_note(s["ck_into"], n, ctx.cold),
                                        "into tensors allocated and written before the clock, as a "
                                        "resuming model's and optimizer's are",
                                        _peers_note(s["ck_into"], load_peers))))
    rows += [compare(backend, f"{label} ({cache}{', weights_only' if key.startswith('pt') else ''})", s[key],
                     "cat", s["cat"], n, note=_load_note(s[key], n, ctx.cold))
             for key, _, label, _ in peers.loads]
    return rows


def bench_fuse(site: Site) -> list[Row]:
    """Durable save and cold load on an rclone FUSE mount, as on a Drive mount.

    The same measurements as the local disk, on ``rclone mount REMOTE MNT
    --vfs-cache-mode writes --vfs-write-back 2s``: a save returns once its
    bytes are in rclone's VFS cache (fsync on the mount does not upload) and
    rclone uploads them to the remote directory afterwards. Every write is
    followed, untimed, by waiting for that upload. Loads read through the
    mount: rclone serves a file from its VFS cache while it holds it, else
    from the remote directory (a local directory here); dropping the page
    cache reaches both. Every byte crosses FUSE up to three times (write,
    upload, read), so this backend uses the smaller ``--remote-size-gib`` state.
    """
    ctx = site.ctx
    series = _directory_series(FILE_PEERS)
    # Uploading a state from the cache to a local directory takes a few
    # seconds; a minute per GiB is plenty before calling it stuck.
    upload_timeout = max(60.0, 60.0 * ctx.state_bytes / GIB)

    def measure(mount: Any) -> None:
        _measure_directory(ctx, "fuse", Path(site.uri(mount, "")), series, FILE_PEERS,
                           settle=lambda: mount.wait_uploaded(timeout=upload_timeout))

    site.serve(measure, series, None)
    # Not "durable": fsync on the mount returns before rclone has uploaded.
    return _directory_rows(ctx, "fuse", series, ctx.state_bytes, FILE_PEERS, save_label="ckptstore.save",
                           load_note="read through the mount from rclone's VFS cache / remote dir")


def _clear_prefix(fs: Any, path: str) -> None:
    """Delete everything under ``path`` on an object store, if anything is there."""
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def bench_s3(site: Site) -> list[Row]:
    """S3 on a moto server: ckptstore vs boto3's multipart transfers.

    Save: ``ckptstore.save`` vs ``upload_file`` (default ``TransferConfig``) of
    a torch.save file, the upload alone timed; torch.save + upload and the
    Lightning-style save (torch.save to BytesIO, s3fs ``pipe``) are reference
    rows. Load: ``ckptstore.load`` vs ``download_file`` + ``torch.load``, both
    followed by reading every byte. Every save goes to an emptied prefix.
    """
    ctx = site.ctx
    n = ctx.state_bytes
    scratch = site.scratch
    s = {k: Series() for k in ("upload", "ck_save", "lightning", "ck_load", "download", "download_one",
                               *(p[0] for p in S3_PEERS), *(p[1] for p in S3_PEERS))}

    def measure(server: Any) -> str:
        """The rows' series; returns the note on ranged reads."""
        opts = server.options()
        fs = server.filesystem()  # the driver's, for emptying prefixes
        uri = site.uri(server, "ckptstore/ckpt")
        boto = {"storage_options": opts, "bucket": BUCKET, "key": "boto3/state.pt"}
        lightning = {"protocol": "s3", "storage_options": opts, "path": f"{BUCKET}/lightning/state.pt"}
        save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
        for r in range(ctx.repeat):
            ctx.log(f"s3: save round {r + 1}/{ctx.repeat}")
            _clear_prefix(fs, f"{BUCKET}/boto3")
            s["upload"].add(lambda: ctx.run({**save, **boto, "impl": "boto3_upload",
                                             "tmp": str(scratch / "upload.pt")}))
            _clear_prefix(fs, f"{BUCKET}/ckptstore")
            s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": uri}))
            _clear_prefix(fs, f"{BUCKET}/lightning")
            s["lightning"].add(lambda: ctx.run({**save, **lightning, "impl": "fsspec_pipe"}))
            for key, _, impl, where, _, _ in S3_PEERS:
                _clear_prefix(fs, f"{BUCKET}/{where.split('/')[0]}")
                s[key].add(lambda: ctx.run({**save, "impl": impl, "uri": f"s3://{BUCKET}/{where}",
                                            "storage_options": opts}))
        _clear_prefix(fs, f"{BUCKET}/lightning")  # only saved, never loaded

        load = {"op": "load", "state_bytes": n, "cold": False}
        for r in range(ctx.repeat):
            ctx.log(f"s3: load round {r + 1}/{ctx.repeat}")
            if s["upload"].seconds and not s["upload"].error:
                down = {**load, **boto, "impl": "boto3_download", "tmp": str(scratch / "download.pt")}
                s["download"].add(lambda: ctx.run(down))
                s["download_one"].add(lambda: ctx.run({**down, "single_get": True}))
            if s["ck_save"].seconds and not s["ck_save"].error:
                s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": uri}))
            for key, lkey, impl, where, _, _ in S3_PEERS:
                if s[key].seconds and not s[key].error:
                    s[lkey].add(lambda: ctx.run({**load, "impl": impl, "uri": f"s3://{BUCKET}/{where}",
                                                 "storage_options": opts, "size_bytes": ctx.size_bytes}))
        for key, lkey, *_ in S3_PEERS:
            if not s[key].seconds or s[key].error:
                s[lkey].fail(f"nothing saved to load ({s[key].error or 'the save failed'})")
        if not s["ck_save"].seconds or s["ck_save"].error:
            s["ck_load"].fail("nothing saved to load (ckptstore.save failed)")
        if not s["upload"].seconds or s["upload"].error:
            for k in ("download", "download_one"):
                s[k].fail("nothing saved to load (boto3 upload failed)")
            return ""
        return _range_probe(fs, f"{BUCKET}/boto3/state.pt", "moto")

    range_note = site.serve(measure, s, "")
    upload = s["upload"].phase("upload")
    save_peers = [("torch.save + upload_file", s["upload"].phase("torch.save", "upload")),
                  *((label, s[key]) for key, _, _, _, label, _ in S3_PEERS)]
    load_peers = [("download_file + torch.load", s["download"]),
                  *((label, s[lkey]) for _, lkey, _, _, _, label in S3_PEERS)]
    peers = [compare("s3", label, s[key], "boto3 upload_file", upload, n) for key, _, _, _, label, _ in S3_PEERS]
    peers += [compare("s3", label, s[lkey], "download_file + torch.load", s["download"], n,
                      note=_load_note(s[lkey], n)) for _, lkey, _, _, _, label in S3_PEERS]
    return [
        compare("s3", "ckptstore.save", s["ck_save"], "boto3 upload_file", upload, n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note="; ".join(x for x in (_save_note(s["ck_save"]), _peers_note(s["ck_save"], save_peers)) if x)),
        compare("s3", "torch.save to file + upload_file", s["upload"].phase("torch.save", "upload"),
                "boto3 upload_file", upload, n, note=_phase_note(s["upload"])),
        compare("s3", "Lightning-style: torch.save to BytesIO + s3fs pipe", s["lightning"],
                "boto3 upload_file", upload, n, note=_phase_note(s["lightning"])),
        compare("s3", "ckptstore.load", s["ck_load"], "download_file + torch.load", s["download"], n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note="; ".join(x for x in (_load_note(s["ck_load"], n), range_note,
                                           _peers_note(s["ck_load"], load_peers)) if x)),
        # The same load against a baseline that makes a single GET, which
        # moto's ranged-GET cost (see the note) does not touch.
        compare("s3", "ckptstore.load", s["ck_load"], "download_file one GET + torch.load",
                s["download_one"], n),
        compare("s3", "download_file + torch.load (weights_only)", s["download"], "-", Series(), n,
                note=_phase_note(s["download"])),
        compare("s3", "download_file one GET + torch.load (weights_only)", s["download_one"], "-",
                Series(), n, note=_phase_note(s["download_one"])),
        *peers,
    ]


# The S3 peers: (save series, load series, worker impl, key under the bucket, save row, load row).
S3_PEERS = (
    ("s3tc_save", "s3tc_load", "s3tc_checkpoint", "s3tc/state.pt",
     "s3torchconnector S3Checkpoint writer + torch.save", "s3torchconnector S3Checkpoint reader + torch.load"),
    ("dcp_s3tc_save", "dcp_s3tc_load", "dcp_s3tc", "dcp_s3tc",
     "DCP save, s3torchconnector S3StorageWriter", "DCP load, s3torchconnector S3StorageReader"),
    ("dcp_fsspec_save", "dcp_fsspec_load", "dcp_fsspec", "dcp_fsspec",
     "DCP save, FsspecWriter (s3fs)", "DCP load, FsspecReader (s3fs)"),
)


def bench_gcs(site: Site) -> list[Row]:
    """GCS on gcp-storage-emulator: ckptstore vs gcsfs with torch.save bytes.

    Save: ``ckptstore.save`` vs gcsfs ``pipe`` of the bytes torch.save wrote
    to a BytesIO, the pipe alone timed (torch.save + pipe is a reference
    row). Load: ``ckptstore.load`` vs gcsfs ``cat`` + ``torch.load`` from a
    BytesIO, both timed, both followed by reading every byte.
    """
    ctx = site.ctx
    n = ctx.state_bytes
    s = {k: Series() for k in ("pipe", "ck_save", "ck_load", "cat", "dcp_save", "dcp_load")}

    def measure(server: Any) -> str:
        """The rows' series; returns the note on ranged reads."""
        fs = server.filesystem()
        uri = site.uri(server, "ckptstore/ckpt")
        gcsfs_obj = {"protocol": "gcs", "storage_options": server.options(),
                     "path": f"{BUCKET}/gcsfs/state.pt"}
        dcp = {"impl": "dcp_fsspec", "uri": f"gcs://{BUCKET}/dcp_fsspec", "storage_options": server.options()}
        save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
        for r in range(ctx.repeat):
            ctx.log(f"gcs: save round {r + 1}/{ctx.repeat}")
            _clear_prefix(fs, f"{BUCKET}/gcsfs")
            s["pipe"].add(lambda: ctx.run({**save, **gcsfs_obj, "impl": "fsspec_pipe"}))
            _clear_prefix(fs, f"{BUCKET}/ckptstore")
            s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": uri}))
            _clear_prefix(fs, f"{BUCKET}/dcp_fsspec")
            s["dcp_save"].add(lambda: ctx.run({**save, **dcp}))

        load = {"op": "load", "state_bytes": n, "cold": False}
        for r in range(ctx.repeat):
            ctx.log(f"gcs: load round {r + 1}/{ctx.repeat}")
            if s["pipe"].seconds and not s["pipe"].error:
                s["cat"].add(lambda: ctx.run({**load, **gcsfs_obj, "impl": "fsspec_cat"}))
            if s["ck_save"].seconds and not s["ck_save"].error:
                s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": uri}))
            if s["dcp_save"].seconds and not s["dcp_save"].error:
                s["dcp_load"].add(lambda: ctx.run({**load, **dcp, "size_bytes": ctx.size_bytes}))
        if not s["ck_save"].seconds or s["ck_save"].error:
            s["ck_load"].fail("nothing saved to load (ckptstore.save failed)")
        if not s["dcp_save"].seconds or s["dcp_save"].error:
            s["dcp_load"].fail(f"nothing saved to load ({s['dcp_save'].error or 'the DCP save failed'})")
        if not s["pipe"].seconds or s["pipe"].error:
            s["cat"].fail("nothing saved to load (gcsfs pipe failed)")
            return ""
        return _range_probe(fs, f"{BUCKET}/gcsfs/state.pt", "the emulator")

    range_note = site.serve(measure, s, "")
    pipe = s["pipe"].phase("pipe")
    dcp_less_rename = s["dcp_save"].view(lambda r: r["seconds"] - r.get("phases", {}).get("metadata rename", 0.0))
    save_peers = [("torch.save + gcsfs pipe", s["pipe"]), ("DCP FsspecWriter", s["dcp_save"]),
                  ("DCP FsspecWriter less its metadata rename", dcp_less_rename)]
    load_peers = [("gcsfs cat + torch.load", s["cat"]), ("DCP FsspecReader", s["dcp_load"])]
    return [
        compare("gcs", "ckptstore.save", s["ck_save"], "gcsfs pipe", pipe, n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note="; ".join(x for x in (_save_note(s["ck_save"]), _peers_note(s["ck_save"], save_peers)) if x)),
        compare("gcs", "torch.save to BytesIO + gcsfs pipe", s["pipe"], "gcsfs pipe", pipe, n,
                note=_phase_note(s["pipe"])),
        compare("gcs", "DCP save, FsspecWriter (gcsfs)", s["dcp_save"], "gcsfs pipe", pipe, n,
                note=_phase_note(s["dcp_save"])),
        # What the emulator's refused moveTo (see the note) costs, taken out.
        compare("gcs", "DCP save, FsspecWriter, less its metadata rename", dcp_less_rename,
                "gcsfs pipe", pipe, n),
        compare("gcs", "ckptstore.load", s["ck_load"], "gcsfs cat + torch.load", s["cat"], n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note="; ".join(x for x in (_load_note(s["ck_load"], n), range_note,
                                           _peers_note(s["ck_load"], load_peers)) if x)),
        compare("gcs", "gcsfs cat + torch.load (weights_only)", s["cat"], "-", Series(), n,
                note=_phase_note(s["cat"])),
        compare("gcs", "DCP load, FsspecReader (gcsfs)", s["dcp_load"], "gcsfs cat + torch.load", s["cat"], n,
                note=_load_note(s["dcp_load"], n)),
    ]


def _range_probe(fs: Any, path: str, server: str) -> str:
    """What a small ranged read of the big object costs the server.

    moto answers a ranged GET by building the whole object's response and
    slicing it, so there a client that reads in ranges (boto3's
    download_file, any parallel reader) pays object-size work per range;
    real S3 and GCS do not. A 1 KiB range of the benchmark's object is timed
    against a 1 KiB range of a 4 KiB object (best of 3 each, untimed for the
    table), so the notes can say whether, and how much, that happens here.
    """
    size = fs.size(path)
    small = path.rsplit("/", 1)[0] + "/range-probe.bin"
    fs.pipe_file(small, b"\0" * 4096)

    def ranged(p: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fs.cat_file(p, start=0, end=1024)
            times.append(time.perf_counter() - t0)
        return min(times)

    big, tiny = ranged(path), ranged(small)
    fs.rm(small)
    head = (f"on {server} a 1 KiB ranged GET of the {size / GIB:.2f} GiB object took {big:.3f} s, "
            f"of a 4 KiB object {tiny:.3f} s")
    if big > 5 * tiny and big - tiny > 0.02:
        ranges = -(-size // (8 << 20))
        return (f"{head}: the server reads the whole object for every range, so reading it in "
                f"8 MiB ranges ({ranges} GETs, as download_file does) costs ~{ranges * (big - tiny):.0f} s "
                "here that real S3/GCS would not charge")
    return f"{head}: ranges cost about their size"


def _phase_note(series: Series) -> str:
    """The steps of the fastest run of a multi-step baseline."""
    runs = [r for r in series.results if r.get("phases")]
    if not runs:
        return ""
    best = min(runs, key=lambda r: r["seconds"])
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in best["phases"].items())
    return f"fastest run's steps: {steps} (of {best['seconds']:.2f} s in all)"


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


def bench_memory(site: Site) -> list[Row]:
    """fsspec's ``memory://`` store vs cloning the tensors in memory.

    The store lives in the process, so clone, save and load share one worker
    per repeat. A save's extra memory includes the store's copy of the data
    (about 1x by nature); a load's can be below zero if it shares the
    store's buffers.
    """
    ctx = site.ctx
    clone, save, load = Series(), Series(), Series()
    for r in range(ctx.repeat):
        ctx.log(f"memory: round {r + 1}/{ctx.repeat}")
        spec = {"op": "roundtrip", "size_bytes": ctx.size_bytes, "uri": site.uri(None, f"r{r}")}
        try:
            out = ctx.run(spec)
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


def bench_dcp(site: Site) -> list[Row]:
    """torch.distributed.checkpoint on the local disk, one process: ckptstore's
    StoreWriter/StoreReader against DCP's own FileSystemWriter/Reader.

    Both sides save the same state with dcp.save and load it in place with
    dcp.load into freshly allocated tensors (counted as the state, not as
    extra memory); FileSystemWriter fsyncs its files (its default), and
    StoreWriter also reads what it stored back before committing.
    """
    ctx, base = site.ctx, site.scratch
    dirs = {"dcp_fs": base / "fs", "dcp_store": base / "store"}
    s = {k: Series() for k in ("dcp_fs_save", "dcp_store_save", "dcp_fs_load", "dcp_store_load")}
    n = ctx.state_bytes
    save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
    for r in range(ctx.repeat):
        ctx.log(f"dcp: save round {r + 1}/{ctx.repeat}")
        for impl, where in dirs.items():
            remove(where)
            s[f"{impl}_save"].add(lambda: ctx.run({**save, "impl": impl, "uri": str(where)}))
    load = {"op": "load", "size_bytes": ctx.size_bytes, "state_bytes": n, "cold": ctx.cold}
    for r in range(ctx.repeat):
        ctx.log(f"dcp: load round {r + 1}/{ctx.repeat}")
        for impl, where in dirs.items():
            if s[f"{impl}_save"].seconds:
                s[f"{impl}_load"].add(lambda: ctx.run({**load, "impl": impl, "uri": str(where)}))
            elif not s[f"{impl}_load"].error:
                s[f"{impl}_load"].fail("nothing saved to load (the save failed)")
    cache = "cold" if ctx.cold else "warm cache"
    return [
        compare("dcp", "dcp.save, StoreWriter (1 process)", s["dcp_store_save"], "dcp.save, FileSystemWriter",
                s["dcp_fs_save"], n, note="durable on both sides; StoreWriter also verifies by read-back"),
        compare("dcp", f"dcp.load, StoreReader ({cache})", s["dcp_store_load"], "dcp.load, FileSystemReader",
                s["dcp_fs_load"], n, note=_load_note(s["dcp_store_load"], n, ctx.cold)),
    ]


def bench_manager(site: Site) -> list[Row]:
    """``CheckpointManager`` on the local disk: what a save costs the training loop.

    Stall: how long ``save()`` blocks with ``async_save=True`` (until it
    returns the handle) against cloning every tensor storage in memory, the
    copy an async save cannot avoid; a blocking ``CheckpointManager`` save
    and ``torch.save`` + fsync against the same clone for reference. The
    async save's extra peak RSS is taken from the call until the background
    write is committed.

    Throughput: a small CPU training loop's time per step while the async
    save's background write runs, against the same number of steps with no
    save, once with torch's default intra-op threads and once with
    ``torch.set_num_threads(1)`` for the loop in both runs; and, for
    reference, the loop while ``dd conv=fsync`` writes the same bytes from
    another process. The save runs in a thread of the training process, as
    it does for a user.

    One worker per round builds the state once and measures both
    (``worker.op_manager``), so the rows cost one state build per round.
    """
    ctx, base = site.ctx, site.scratch
    n = ctx.state_bytes
    s = {k: Series() for k in ("clone", "async", "sync", "torch")}
    # Seconds per training step, per thread setting: with the save, without, with dd.
    train = {t: {k: Series() for k in ("save", "none", "dd")} for t in TRAIN_THREADS}
    runs: dict[int, list[dict]] = {t: [] for t in TRAIN_THREADS}
    for r in range(ctx.repeat):
        ctx.log(f"manager: round {r + 1}/{ctx.repeat}")
        try:
            out = ctx.run({"op": "manager", "size_bytes": ctx.size_bytes, "dir": str(base),
                           "round": r, "threads": list(TRAIN_THREADS)})
        except WorkerError as e:
            for x in [*s.values(), *(x for t in train.values() for x in t.values())]:
                x.fail(str(e))
            continue
        for k, x in s.items():
            x.add(lambda: out["stall"][k])
        for t, series in train.items():
            run = out["train"][str(t)]
            runs[t].append(run)
            series["save"].add(lambda: {"seconds": run["with_save_seconds"] / run["steps"]})
            series["none"].add(lambda: {"seconds": run["without_seconds"] / run["steps"]})
            series["dd"].add(lambda: {"seconds": run["with_dd_seconds"] / run["dd_steps"]})

    clone = s["clone"]

    def times_clone(x: Series) -> str:
        return f"{x.best / clone.best:.2f}x the clone" if x.best and clone.best else ""

    a = s["async"]
    async_note = ""
    if a.results and clone.results:
        async_note = (
            f"stall = {times_clone(a)} (target <= {1 / STALL_TARGET:.1f}x, i.e. ratio >= "
            f"{STALL_TARGET:.2f}); committed {min(r['committed_seconds'] for r in a.results):.2f} s "
            "after save() was called (best, nothing else running); extra peak RSS counted from the "
            "call until commit, during the stall alone "
            f"{max(r['stall_extra_rss'] for r in a.results) / n:+.3f}x, the clone's "
            f"{max(clone.extra_rss) / n:+.3f}x; commit strategy "
            f"{', '.join(sorted({str(r.get('strategy')) for r in a.results}))}")
    rows = [
        compare("manager", "async save stall (CheckpointManager, async_save=True)", a,
                "storage clone", clone, n, STALL_TARGET, note=async_note),
        compare("manager", "blocking save (CheckpointManager, async_save=False)", s["sync"],
                "storage clone", clone, n, note=times_clone(s["sync"])),
        compare("manager", "blocking torch.save + fsync", s["torch"], "storage clone", clone, n,
                note=times_clone(s["torch"])),
    ]
    meaning = ("baseline time / time (higher is better): seconds per training step without "
               "the save / with it, i.e. steps/s with / without")
    for t, series in train.items():
        tr = runs[t]
        label = ((f"{tr[0]['threads']} threads, default" if tr else "default threads") if t == 0
                 else f"set_num_threads({t})")
        note = dd_note = ""
        if tr:
            dd_note = ("reference: what the machine leaves the loop while another process writes the "
                       "same bytes durably (dd bs=16M conv=fsync: no checksums, no Python); "
                       "ratio per round: ") + ", ".join(
                f"{r['without_seconds'] / r['steps'] / (r['with_dd_seconds'] / r['dd_steps']):.2f}"
                for r in tr)
            per_run = ", ".join(f"{r['without_seconds'] / r['with_save_seconds']:.2f}" for r in tr)
            note = (
                "seconds = per training step (MLP 512-1024-1024-512, batch 256, AdamW); "
                f"{min(r['steps'] for r in tr)}-{max(r['steps'] for r in tr)} steps while the save "
                f"ran, which took {min(r['save_seconds'] for r in tr):.2f}-"
                f"{max(r['save_seconds'] for r in tr):.2f} s from the call to the first step ending "
                f"after its commit; ratio per round: {per_run}")
        row = compare("manager", f"training during async save ({label})", series["save"],
                      "same steps, no save", series["none"], n, TRAIN_TARGET, note=note)
        ref = compare("manager", f"training during dd of the same bytes ({label})",
                      series["dd"], "same steps, no save", series["none"], n,
                      note=dd_note)
        for x in (row, ref):
            x.gb_per_s = None  # seconds are per training step here
            x.ratio_meaning = meaning
        rows += [row, ref]
    return rows


# --- many small tensors ------------------------------------------------------

# Each tensor count's series: the local rows', then the S3 rows'.
TENSOR_LOCAL_SERIES = ("ck_save", "pt_save", "ck_load", "pt_load", "verify", "info", "ls")
TENSOR_S3_SERIES = ("s3_pt_save", "s3_ck_save", "s3_pt_load", "s3_ck_load")
# The inspections (worker.op_inspect's commands): the row, and the command line of its note.
INSPECTIONS = {
    "verify": ("ckptstore.verify (shallow)", "python -m ckptstore verify DIR"),
    "info": ("ckptstore info DIR (cli.main, in-process)", "python -m ckptstore info DIR"),
    "ls": ("ckptstore ls PARENT (cli.main, in-process)", "python -m ckptstore ls PARENT"),
}
MIB = 1 << 20


def _rounds(ctx: Context, label: str, s: dict[str, Series],
            saves: list[tuple[str, str, Callable[[], Any], dict]],
            loads: list[tuple[str, str, dict]]) -> None:
    """``ctx.repeat`` rounds of every save in turn, then of every load, so a
    drift in the machine's speed hits each series alike.

    saves: (series key, what it is, an untimed clear to run before it, worker
    spec); loads: (series key, the key of the save it reads, worker spec). A
    load whose save failed is marked so rather than run.
    """
    what = {key: name for key, name, _, _ in saves}

    def saved(key: str) -> bool:
        return bool(s[key].seconds) and not s[key].error

    for r in range(ctx.repeat):
        ctx.log(f"{label}: save round {r + 1}/{ctx.repeat}")
        for key, _, clear, spec in saves:
            clear()
            s[key].add(lambda: ctx.run(spec))
    for r in range(ctx.repeat):
        ctx.log(f"{label}: load round {r + 1}/{ctx.repeat}")
        for key, source, spec in loads:
            if saved(source):
                s[key].add(lambda: ctx.run(spec))
    for key, source, _ in loads:
        if not saved(source):
            s[key].fail(f"nothing saved to load ({what[source]} failed)")


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
    _rounds(ctx, f"tensors: {n:,} tensors, local", s,
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
    _rounds(ctx, f"tensors: {n:,} tensors, s3", s,
            saves=[("s3_pt_save", "torch.save + upload_fileobj",
                    lambda: _clear_prefix(fs, f"{BUCKET}/{prefix}/torch"),
                    {**save, **boto, "impl": "boto3_fileobj"}),
                   ("s3_ck_save", "ckptstore.save", lambda: _clear_prefix(fs, f"{BUCKET}/{prefix}/ckptstore"),
                    {**save, "impl": "ckptstore", "uri": uri})],
            loads=[("s3_pt_load", "s3_pt_save", {**load, **boto, "impl": "boto3_fileobj"}),
                   ("s3_ck_load", "s3_ck_save", {**load, "impl": "ckptstore", "uri": uri})])
    _clear_prefix(fs, f"{BUCKET}/{prefix}")


def bench_tensors(site: Site) -> list[Row]:
    """What a checkpoint of many small tensors costs, at each of ``--tensor-counts``.

    The state (``benchmarks.state.tensors_state``) has exactly n tensors of
    at most 1 KiB. Local disk: ``ckptstore.save`` (durable) against
    torch.save + fsync, ``ckptstore.load`` against ``torch.load(weights_only=True)``
    (cold unless --warm, as the local rows), the size of the commit record
    per tensor, and a shallow ``ckptstore.verify``, ``ckptstore info DIR`` and
    ``ckptstore ls PARENT`` (in-process, and through the CLI in a subprocess
    for the notes). S3 (moto): ``ckptstore.save`` / ``load`` against torch.save
    to a BytesIO + boto3 ``upload_fileobj`` / ``download_fileobj`` +
    ``torch.load``. If moto will not start, the local rows still count.
    """
    ctx = site.ctx
    ctx.log("tensors: " + ", ".join(f"{n:,} tensors ({tensors_nbytes(n) / MIB:.2f} MiB)"
                                    for n in ctx.tensor_counts))
    s = {n: {k: Series() for k in (*TENSOR_LOCAL_SERIES, *TENSOR_S3_SERIES)} for n in ctx.tensor_counts}
    records = {n: _tensors_local(ctx, site.scratch, n, s[n]) for n in ctx.tensor_counts}

    def measure(server: Any) -> None:
        for n in ctx.tensor_counts:
            _tensors_s3(ctx, site, server, n, s[n])

    site.serve(measure, {f"{n} {k}": s[n][k] for n in ctx.tensor_counts for k in TENSOR_S3_SERIES}, None)
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
                        s[n]["pt_save"], TENSOR_SPEED_TARGET, _save_note(s[n]["ck_save"])) for n in counts]
    rows += [_tensor_row(n, f"ckptstore.load ({cache})", s[n]["ck_load"],
                         f"torch.load ({cache}, weights_only)", s[n]["pt_load"], TENSOR_SPEED_TARGET,
                         _load_note(s[n]["ck_load"], tensors_nbytes(n), ctx.cold)) for n in counts]
    rows += [_commit_row(n, records[n], s[n]["ck_save"]) for n in counts]
    rows += [_inspect_row(n, command, s[n][command]) for command in INSPECTIONS for n in counts]
    rows += [_tensor_row(n, "ckptstore.save to s3", s[n]["s3_ck_save"],
                         "torch.save to BytesIO + upload_fileobj", s[n]["s3_pt_save"],
                         note=_phase_note(s[n]["s3_pt_save"]).replace("fastest run", "baseline's fastest run"))
             for n in counts]
    rows += [_tensor_row(n, "ckptstore.load from s3", s[n]["s3_ck_load"],
                         "download_fileobj one GET + torch.load", s[n]["s3_pt_load"],
                         note="; ".join(x for x in (
                             _load_note(s[n]["s3_ck_load"], tensors_nbytes(n)),
                             _phase_note(s[n]["s3_pt_load"]).replace("fastest run", "baseline's fastest run"))
                             if x))
             for n in counts]
    return rows


# --- scaling: sizes and tensor counts ------------------------------------------------

SCALING_SIZES_MIB = (64, 256, 1024, 4096)  # the local sizes (--scaling-sizes-mib)
SCALING_S3_MAX_MIB = 1024                  # S3 measures the sizes up to this
SCALING_COUNT_MIB = 256                    # the fixed size the tensor counts split
SCALING_FLAT_TARGET = 1.20                 # slowest / fastest seconds per GiB across sizes
SCALING_PEER_TARGET = 1.0                  # ckptstore against the fastest peer at each point
# S3 peers at every size: (series, worker impl, row label). The ranged-read loaders are left out:
# on moto each ranged GET costs the whole object (see the s3 rows), which grows with the square of
# the size; the one-GET download is the fair baseline there.
SCALING_S3_SAVES = (("upload", "boto3_upload", "torch.save + boto3 upload_file"),
                    ("s3tc_save", "s3tc_checkpoint", "s3torchconnector S3Checkpoint writer + torch.save"))
SCALING_S3_LOADS = (("download_one", "boto3_download", "boto3 download_file one GET + torch.load"),)


def _mib(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


def bench_scaling(site: Site) -> list[Row]:
    """How the cost grows: seconds per GiB and extra RSS of ckptstore and its peers at each of
    ``--scaling-sizes-mib`` on the local disk (the peers of the local rows, dd and cat), at the
    sizes up to 1 GiB on S3 (moto), and at each of ``--tensor-counts`` splitting a fixed
    256 MiB on the local disk. Every point runs its baseline and every peer in the same rounds.
    The plot is ``scaling.png`` next to ``latest.png``.
    """
    ctx = site.ctx
    rows: list[Row] = []
    for mib in ctx.scaling_sizes_mib:
        size = mib * MIB
        pctx = replace(ctx, size_bytes=size, state_bytes=expected_nbytes(size))
        s = _directory_series(FILE_PEERS)
        where = site.scratch / f"size-{mib}"
        where.mkdir()
        _measure_directory(pctx, f"scaling: local {_mib(size)}", where, s, FILE_PEERS, into=True)
        remove(where)
        rows += _scaling_rows(pctx, "size", size, s, pctx.state_bytes)
    for n in ctx.tensor_counts:
        weights = n - n // 3
        tb = max(4, SCALING_COUNT_MIB * MIB // weights // 64 * 64)
        nbytes = tensors_nbytes(n, tb)
        pctx = replace(ctx, state_bytes=nbytes)
        s = _directory_series(FILE_PEERS)
        where = site.scratch / f"count-{n}"
        where.mkdir()
        _measure_directory(pctx, f"scaling: local {n:,} tensors", where, s, FILE_PEERS,
                           state={"tensors": n, "tensor_bytes": tb}, into=True)
        remove(where)
        rows += _scaling_rows(pctx, "tensors", n, s, nbytes)
    rows += _flat_rows(rows)

    s3_sizes = [m for m in ctx.scaling_sizes_mib if m <= ctx.scaling_s3_max_mib]
    s3 = {m: {k: Series() for k in ("ck_save", "ck_load", *(p[0] for p in (*SCALING_S3_SAVES, *SCALING_S3_LOADS)))}
          for m in s3_sizes}

    def measure(server: Any) -> None:
        for mib in s3_sizes:
            _scaling_s3(ctx, site, server, mib, s3[mib])

    site.serve(measure, {f"{m} {k}": v for m in s3_sizes for k, v in s3[m].items()}, None)
    s3_rows: list[Row] = []
    for mib in s3_sizes:
        s = s3[mib]
        n = expected_nbytes(mib * MIB)
        upload = s["upload"].phase("torch.save", "upload")
        saves = [("torch.save + boto3 upload_file", upload),
                 *((label, s[k]) for k, _, label in SCALING_S3_SAVES[1:])]
        loads = [(label, s[k]) for k, _, label in SCALING_S3_LOADS]
        s3_rows += _point_rows("s3", "size", mib * MIB, n, s["ck_save"], s["ck_load"], saves, loads, None, None)
    return rows + s3_rows + _flat_rows(s3_rows)


def _scaling_s3(ctx: Context, site: Site, server: Any, mib: int, s: dict[str, Series]) -> None:
    fs = server.filesystem()
    opts = server.options()
    size = mib * MIB
    n = expected_nbytes(size)
    prefix = f"scaling/{mib}"
    uri = site.uri(server, f"{prefix}/ckptstore")
    save = {"op": "save", "size_bytes": size, "nbytes": n}
    load = {"op": "load", "state_bytes": n, "cold": False}
    boto = {"storage_options": opts, "bucket": BUCKET, "key": f"{prefix}/boto3/state.pt"}
    tmp = {"tmp": str(site.scratch / "s3-staging.pt")}
    specs = {"upload": {**save, **boto, **tmp, "impl": "boto3_upload"},
             "s3tc_save": {**save, "impl": "s3tc_checkpoint", "uri": f"s3://{BUCKET}/{prefix}/s3tc/state.pt",
                           "storage_options": opts},
             "download_one": {**load, **boto, **tmp, "impl": "boto3_download", "single_get": True}}
    _rounds(ctx, f"scaling: s3 {_mib(size)}", s,
            saves=[("upload", "boto3 upload_file", lambda: _clear_prefix(fs, f"{BUCKET}/{prefix}/boto3"),
                    specs["upload"]),
                   ("ck_save", "ckptstore.save", lambda: _clear_prefix(fs, f"{BUCKET}/{prefix}/ckptstore"),
                    {**save, "impl": "ckptstore", "uri": uri}),
                   ("s3tc_save", "S3Checkpoint", lambda: _clear_prefix(fs, f"{BUCKET}/{prefix}/s3tc"),
                    specs["s3tc_save"])],
            loads=[("download_one", "upload", specs["download_one"]),
                   ("ck_load", "ck_save", {**load, "impl": "ckptstore", "uri": uri})])
    _clear_prefix(fs, f"{BUCKET}/{prefix}")


def _scaling_rows(ctx: Context, axis: str, x: int, s: dict[str, Series], nbytes: int) -> list[Row]:
    cache = "cold" if ctx.cold else "warm cache"
    saves = [("dd conv=fsync", s["dd"]), *((label, s[key]) for key, _, label, _ in FILE_PEERS.saves)]
    loads = [("cat", s["cat"]), *((label, s[key]) for key, _, label, _ in FILE_PEERS.loads)]
    return _point_rows("local", axis, x, nbytes, s["ck_save"], s["ck_load"], saves, loads,
                       "dd conv=fsync", "cat", cache, s["ck_into"])


def _point_rows(where: str, axis: str, x: int, nbytes: int, ck_save: Series, ck_load: Series,
                saves: list[tuple[str, Series]], loads: list[tuple[str, Series]],
                save_floor: str | None, load_floor: str | None, cache: str | None = None,
                ck_into: Series | None = None) -> list[Row]:
    """One point of a curve: ckptstore's save and load against the fastest peer there (target:
    ahead of it), and every peer and baseline as a row of its own, for the curves. ``*_floor``
    names the raw-I/O baseline among them (dd, cat), which is no peer."""
    at = _mib(x) if axis == "size" else f"{x:,} tensors"
    backend = f"scaling-{where}"
    rows = []
    ours_load = [("ckptstore", "ckptstore.load", ck_load)]
    if ck_into is not None and (ck_into.seconds or ck_into.error):
        ours_load.append(("ckptstore load(into=)", "ckptstore.load(into=)", ck_into))
    for what, ours_all, others, floor in (("save", [("ckptstore", "ckptstore.save", ck_save)], saves, save_floor),
                                          ("load", ours_load, loads, load_floor)):
        peers = [(label, p) for label, p in others if label != floor and p.seconds]
        best = min(peers, key=lambda lp: lp[1].best, default=None)
        for curve, op, ours in ours_all:
            op += f" ({cache})" if what == "load" and cache else ""
            row = compare(backend, f"{op}, {at}", ours, best[0] if best else "-", best[1] if best else Series(),
                          nbytes, SCALING_PEER_TARGET,
                          note="; ".join(x for x in (f"{ours.best * GIB / nbytes:.3f} s/GiB" if ours.best else "",
                                                      _peers_note(ours, peers)) if x))
            row.ratio_meaning = "fastest peer's time / time (higher is better)"
            row.curve, row.axis, row.x = f"{where} {what}: {curve}", axis, x
            rows.append(row)
        for label, p in others:
            peer = compare(backend, f"{label} ({what}), {at}", p, "-", Series(), nbytes,
                           note=f"{p.best * GIB / nbytes:.3f} s/GiB" if p.best else "")
            peer.curve, peer.axis, peer.x = f"{where} {what}: {label}", axis, x
            rows.append(peer)
    return rows


def _flat_rows(rows: list[Row]) -> list[Row]:
    """Per curve of ckptstore over sizes: slowest / fastest seconds per GiB (target <= 1.2);
    the same figure for every other curve goes into the note, dd's and cat's say what the
    storage itself does."""
    curves: dict[str, list[Row]] = {}
    for r in rows:
        if r.axis == "size" and r.curve:
            curves.setdefault(r.curve, []).append(r)

    def spread(rs: list[Row]) -> float | None:
        per = [r.seconds / r.nbytes * GIB for r in rs if r.seconds]
        return max(per) / min(per) if len(per) == len(rs) and len(per) > 1 else None

    out = []
    for curve, rs in curves.items():
        if not curve.split(": ", 1)[1].startswith("ckptstore"):
            continue
        where_what = curve.split(":")[0]
        others = [f"{c.split(': ', 1)[1]} {spread(v):.2f}" for c, v in curves.items()
                  if c.startswith(where_what + ":") and c != curve and spread(v) is not None]
        ratio = spread(rs)
        sizes = ", ".join(_mib(r.x) for r in rs)
        name = curve.split(": ", 1)[1]
        op = f"ckptstore.{where_what.split()[1]}" if name == "ckptstore" else name.replace("ckptstore ", "ckptstore.")
        row = Row(rs[0].backend, f"{op} seconds per GiB, {sizes}", None,
                  max(r.nbytes for r in rs), None, "-", None, ratio,
                  ratio_meaning="slowest / fastest seconds per GiB across sizes (lower is better)",
                  target=SCALING_FLAT_TARGET, target_is_max=True,
                  note=("the same spread for " + ", ".join(others)) if others else "",
                  error=None if ratio is not None else "a size has no figure")
        row.meets_target = None if ratio is None else ratio <= SCALING_FLAT_TARGET
        out.append(row)
    return out


# --- each backend's notes ---------------------------------------------------------

def _scaling_notes(ctx: Context) -> list[str]:
    return [
        f"scaling: at each point ckptstore is timed against the fastest peer there (target >= "
        f"{SCALING_PEER_TARGET:.2f}: ahead of every peer), and across sizes its seconds per GiB may "
        f"spread at most {SCALING_FLAT_TARGET:.1f}x (slowest / fastest); the notes give the same "
        "spread for the peers and for dd and cat, which is what the storage itself does. Sizes: "
        f"{', '.join(_mib(m * MIB) for m in ctx.scaling_sizes_mib)} of the GPT state on the local disk, "
        f"those up to {_mib(ctx.scaling_s3_max_mib * MIB)} on S3 (moto); tensor counts "
        f"{', '.join(f'{n:,}' for n in ctx.tensor_counts)} split {SCALING_COUNT_MIB} MiB on the local "
        "disk. Each point is its own rounds (baseline and every peer, best of --repeat). The "
        "curves are scaling.png."]


def _manager_notes(ctx: Context) -> list[str]:
    return [
        f"manager: ratios are against a clone of every tensor storage (stall rows; target: the "
        f"async stall <= {1 / STALL_TARGET:.1f}x the clone, ratio >= {STALL_TARGET:.2f}) and "
        f"against the same training steps with no save (training rows; ratio = steps/s with the "
        f"save / without, target >= {TRAIN_TARGET:.2f}). On {os.cpu_count()} CPUs the save's "
        "threads (writer: crc32c and writes; an fdatasync flusher; the read-back verify) compete "
        "with the training loop's intra-op threads for the same cores and memory bandwidth; "
        "with the default thread count torch's OpenMP workers wait on each other whenever the "
        "save holds a core. The set_num_threads(1) row leaves a core to the save in both runs "
        "(its baseline is the slower one-thread loop)."]


def _object_store_notes(ctx: Context) -> list[str]:
    """Shared by s3 and gcs (the driver lists a note once)."""
    return [
        f"the servers (moto, gcp-storage-emulator) run on this machine and share its "
        f"{os.cpu_count()} CPUs with the client, so a client that uses more CPU (parallel parts, "
        "checksums) slows the server it talks to; their loads are served from the server's "
        "memory or temp files, not a cold disk.",
        f"s3/gcs targets: ratio >= {REMOTE_SPEED_TARGET:.2f} against the boto3/gcsfs baseline and "
        f"extra peak RSS <= {REMOTE_RSS_TARGET:.2f}x; baseline saves are timed from the bytes on "
        "hand (a torch.save file for upload_file, torch.save bytes for pipe), baseline loads "
        "in full (download/cat + torch.load + reading every byte). Baselines' extra RSS covers "
        "all their steps."]


def _fuse_notes(ctx: Context) -> list[str]:
    return [
        "fuse: rclone mount --vfs-cache-mode writes --vfs-write-back 2s over a local directory; "
        "a save there returns once rclone's cache has the bytes (as on a Colab Drive mount), "
        "the upload that follows is waited for, untimed, before the next measurement."]


def _tensors_notes(ctx: Context) -> list[str]:
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


# --- the registry ---------------------------------------------------------------
# The order here is the table's order and the default --backends.

RESTORE_PEERS = (
    ("ckptstore_copy", "ckptstore.load + copy_"),
    ("torch_copy", "torch.load + copy_"),
    ("torch_mmap_copy", "torch.load(mmap=True) + copy_"),
    ("safetensors_copy", "safetensors load_file + copy_ (= load_model)"),
    ("dcp_inplace", "dcp.load in place (FileSystemReader)"),
)
RESTORE_RSS_TARGET = 0.05


EXPORT_SPEED_TARGET = 0.9
EXPORT_RSS_TARGET = 0.10
EXPORTS = ("export", "export_warm", "save_file", "load_save_file")


def _restore_model_bytes(ctx: Context) -> int:
    return ctx.size_bytes


def bench_restore(site: Site) -> list[Row]:
    """Restoring a model that already exists (resume): ``load(into=)`` against every way a user
    would do it instead, each from its own format of the same weights, cold cache; and exporting
    those weights as .safetensors.

    The model (the GPT state's weights, untied, about --size-gib) is allocated
    and written before the clock starts; extra RSS is the peak beyond it.
    Targets: extra RSS at most 5% of the model, and faster than every peer.
    export: ``ckptstore.export(select="model")`` from the checkpoint (cold
    cache, and warm as right after the save) against
    ``safetensors.torch.save_file`` of the same tensors already in memory
    (+ fsync; export is durable). Targets: at least 0.9x, extra RSS at most 10%.
    """
    ctx, root = site.ctx, site.scratch
    n = _restore_model_bytes(ctx)
    s = {k: Series() for k in ("ckptstore_into", *[p for p, _ in RESTORE_PEERS])}
    exp = {k: Series() for k in EXPORTS}
    root.mkdir(parents=True, exist_ok=True)
    setup = Series()
    setup.add(lambda: ctx.run({"op": "restore_setup", "model_bytes": n, "dir": str(root)}))
    if setup.error:
        for v in (*s.values(), *exp.values()):
            v.fail(f"setup failed: {setup.error}")
    else:
        n = setup.results[0]["nbytes"]
        for r in range(ctx.repeat):
            ctx.log(f"restore: round {r + 1}/{ctx.repeat}")
            for impl, series in s.items():
                out = series.add(lambda: ctx.run({"op": "restore", "impl": impl, "dir": str(root),
                                                  "model_bytes": _restore_model_bytes(ctx), "cold": ctx.cold}))
                if out is not None and not out.get("correct"):
                    series.fail(f"{impl} restored wrong values")
            for impl, series in exp.items():
                out = series.add(lambda: ctx.run({"op": "export", "impl": impl, "dir": str(root),
                                                  "cold": ctx.cold, "check": r == 0}))
                if out is not None and out.get("correct") is False:
                    series.fail(f"{impl} wrote a file that does not equal the checkpoint")
    cache = "cold" if ctx.cold else "warm cache"
    rows = []
    for impl, label in RESTORE_PEERS:
        rows.append(compare("restore", f"load(into=) existing model ({cache})", s["ckptstore_into"], label,
                            s[impl], n, target=1.0, rss_target=RESTORE_RSS_TARGET,
                            note=f"peer extra RSS +{max(s[impl].extra_rss) / n:.2f}x" if s[impl].extra_rss
                            else ""))
    peer = "safetensors save_file (tensors in memory) + fsync"
    rows += [
        compare("restore", f'export(select="model") to .safetensors ({cache})', exp["export"], peer,
                exp["save_file"], n, target=EXPORT_SPEED_TARGET, rss_target=EXPORT_RSS_TARGET,
                note="export reads the checkpoint and writes the file; the peer only writes"),
        compare("restore", 'export(select="model") to .safetensors (checkpoint in page cache)',
                exp["export_warm"], peer, exp["save_file"], n, target=EXPORT_SPEED_TARGET,
                rss_target=EXPORT_RSS_TARGET, note="as right after the save: the checkpoint's pages cached"),
        compare("restore", f'export(select="model") to .safetensors ({cache})', exp["export"],
                "load(select) + safetensors save_file + fsync", exp["load_save_file"], n,
                rss_target=EXPORT_RSS_TARGET, note="the same work: read the checkpoint, write the file"),
    ]
    return rows


SELECT_PEERS = (("safetensors_safe_open", "safetensors safe_open + get_tensor (model keys)"),
                ("ckptstore_full", "ckptstore.load of everything"))


def bench_select(site: Site) -> list[Row]:
    """Reading only the weights of a training checkpoint (weights + AdamW moments, --size-gib in
    all) on the local disk, cold cache: ``load(select="model")`` against safetensors ``safe_open``
    + ``get_tensor`` of the same tensors from a safetensors file of the whole state, and a full
    ``load``; the disk bytes each read are in the note (/proc/self/io).
    """
    ctx, root = site.ctx, site.scratch
    root.mkdir(parents=True, exist_ok=True)
    setup = Series()
    setup.add(lambda: ctx.run({"op": "select_setup", "size_bytes": ctx.size_bytes, "dir": str(root)}))
    sel = {k: Series() for k in ("ckptstore_select", *[p for p, _ in SELECT_PEERS])}
    model = _select_rounds(ctx, setup, sel, {"dir": str(root), "cold": ctx.cold}, "select")
    cache = "cold" if ctx.cold else "warm cache"
    return _select_rows("select", f'load(select="model") of a 3x checkpoint ({cache})', sel, model, "disk read")


def bench_select_s3(site: Site) -> list[Row]:
    """The select benchmark against S3 (moto, on this machine), --remote-size-gib in all: the bytes
    moved are those received on the loopback interface. safetensors' ``safe_open`` reads local files,
    so its row downloads the whole file first (boto3 ``download_file``), as a user would."""
    ctx, root = site.ctx, site.scratch
    root.mkdir(parents=True, exist_ok=True)
    sel = {k: Series() for k in ("ckptstore_select", *[p for p, _ in SELECT_PEERS])}
    got: dict = {}

    def measure(server: Any) -> None:
        spec = {"dir": str(root), "uri": site.uri(server, "select/ckpt"), "storage_options": server.options(),
                "bucket": BUCKET, "key": "select/state.safetensors"}
        setup = Series()
        setup.add(lambda: ctx.run({"op": "select_setup", "size_bytes": ctx.size_bytes, **spec}))
        got["model"] = _select_rounds(ctx, setup, sel, spec, "select-s3")

    site.serve(measure, sel, None)
    model = got.get("model") or ctx.state_bytes // 3
    return _select_rows("select-s3", 'load(select="model") of a 3x checkpoint (S3)', sel, model,
                        "received")


def _select_rounds(ctx: Context, setup: Series, sel: dict, spec: dict, what: str) -> int:
    """Run the select series after ``setup`` (already run); returns the model's bytes."""
    if setup.error:
        for v in sel.values():
            v.fail(f"setup failed: {setup.error}")
        return 0
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        for impl, series in sel.items():
            series.add(lambda: ctx.run({"op": "select", "impl": impl, **spec}))
    return setup.results[0]["model_bytes"]


def _select_rows(backend: str, operation: str, sel: dict, model: int, moved: str) -> list[Row]:
    def note(series: Series) -> str:
        return f"{moved} {min(r['disk_read'] for r in series.results) / model:.2f}x the model" \
            if series.results and model else ""
    return [compare(backend, operation, sel["ckptstore_select"], label, sel[impl], max(model, 1),
                    note=f"ckptstore {note(sel['ckptstore_select'])}; peer {note(sel[impl])}")
            for impl, label in SELECT_PEERS]


PREEMPT_TARGET = 1 / 1.2   # signal to commit at most 1.2x a blocking save


def _preempt_rounds(ctx: Context, uri: str, opts: dict | None, what: str, got: Series, base: Series) -> None:
    """Fill ``got`` (signal to commit) and ``base`` (the blocking save), one worker per round."""
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        out = got.add(lambda: ctx.run({"op": "preempt", "size_bytes": ctx.size_bytes, "uri": uri,
                                       "storage_options": opts, "round": r}))
        if out is None:
            base.fail(got.error or "the run failed")
            break
        base.add(lambda: {"seconds": out["blocking_seconds"]})


def _preempt_row(backend: str, got: Series, base: Series, n: int) -> Row:
    return compare(backend, "preemption: SIGTERM to committed checkpoint", got,
                   "a blocking CheckpointManager.save", base, n, target=PREEMPT_TARGET,
                   note="training loop with async_save=True; the signal lands mid-step")


def bench_preempt(site: Site) -> list[Row]:
    """From a SIGTERM sent mid-step to the committed checkpoint of that step (``preemption_signals``,
    ``async_save=True``, the loop shape of docs/resume.md), on the local disk, against a blocking
    ``CheckpointManager.save`` of the same state in the same process. Target: at most 1.2x."""
    ctx = site.ctx
    site.scratch.mkdir(parents=True, exist_ok=True)
    got, base = Series(), Series()
    _preempt_rounds(ctx, str(site.scratch / "runs"), None, "preempt", got, base)
    return [_preempt_row("preempt", got, base, ctx.state_bytes)]


def bench_preempt_s3(site: Site) -> list[Row]:
    """The preemption row on S3 (moto, --remote-size-gib)."""
    ctx = site.ctx
    got, base = Series(), Series()

    site.serve(lambda server: _preempt_rounds(ctx, site.uri(server, "preempt"), server.options(), "preempt-s3",
                                              got, base), {"got": got, "base": base}, None)
    return [_preempt_row("preempt-s3", got, base, ctx.state_bytes)]


INCREMENTAL_SECOND_TARGET = 1 / 0.15   # the frozen-base second save at most 0.15x a whole save
INCREMENTAL_SAME_TARGET = 0.95         # full change and restore: at least 0.95x the plain way
INCREMENTAL_TRAINED = 8 << 20          # the part that changes between steps


_INCREMENTAL_SERIES = ("second", "full", "full_inc", "full_plain", "restore_inc", "restore_plain")


def _incremental_rounds(ctx: Context, uri: str, opts: dict | None, what: str, size: int,
                        series: dict[str, Series]) -> None:
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        out = series["second"].add(lambda: ctx.run({"op": "incremental", "size_bytes": size, "uri": uri,
                                                    "trained_bytes": INCREMENTAL_TRAINED, "storage_options": opts,
                                                    "round": r, "cold": ctx.cold}))
        if out is None:
            for k, s in series.items():
                if k != "second":
                    s.fail(series["second"].error or "the run failed")
            break
        series["full"].add(lambda: {"seconds": out["plain_second_s"]})
        series["full_inc"].add(lambda: {"seconds": out["inc_full_change_s"]})
        series["full_plain"].add(lambda: {"seconds": out["plain_full_change_s"]})
        series["restore_inc"].add(lambda: {"seconds": out["inc_restore_s"]})
        series["restore_plain"].add(lambda: {"seconds": out["plain_restore_s"]})


def _incremental_rows(backend: str, series: dict[str, Series], size: int) -> list[Row]:
    res = series["second"].results
    wrote = max((r["inc_second_bytes"] for r in res), default=0)
    changed = INCREMENTAL_TRAINED
    total = size + INCREMENTAL_TRAINED
    return [
        compare(backend, "incremental: second save, frozen base", series["second"], "a whole save (plain run)",
                series["full"], total, target=INCREMENTAL_SECOND_TARGET,
                note=f"wrote {wrote} bytes, {wrote / changed:.3f}x the {changed} changed (target <= 1.1x)"),
        compare(backend, "incremental: save, every byte changed", series["full_inc"],
                "the same save with incremental=False", series["full_plain"], total,
                target=INCREMENTAL_SAME_TARGET, note=_medians(series["full_inc"], series["full_plain"])),
        compare(backend, "incremental: restore (cold load)", series["restore_inc"],
                "a load of the same step saved whole", series["restore_plain"], total,
                target=INCREMENTAL_SAME_TARGET, note=_medians(series["restore_inc"], series["restore_plain"])),
    ]


def _medians(ours: Series, base: Series) -> str:
    """The medians of two series measured in the same rounds, next to the best-of ratio: on a
    disk or server whose speed varies from round to round they say more than one lucky sample."""
    if not ours.seconds or not base.seconds:
        return ""
    a, b = statistics.median(ours.seconds), statistics.median(base.seconds)
    return f"medians {a:.3f} s against {b:.3f} s ({b / a:.2f}x)"


def bench_incremental(site: Site) -> list[Row]:
    """CheckpointManager(incremental=True) on the local disk: a frozen part of --size-gib and
    8 MiB that changes (see worker.op_incremental)."""
    ctx = site.ctx
    site.scratch.mkdir(parents=True, exist_ok=True)
    series = {k: Series() for k in _INCREMENTAL_SERIES}
    _incremental_rounds(ctx, str(site.scratch / "runs"), None, "incremental", ctx.size_bytes, series)
    return _incremental_rows("incremental", series, ctx.size_bytes)


def bench_incremental_s3(site: Site) -> list[Row]:
    """The incremental rows on S3 (moto, --remote-size-gib)."""
    ctx = site.ctx
    series = {k: Series() for k in _INCREMENTAL_SERIES}
    site.serve(lambda server: _incremental_rounds(ctx, site.uri(server, "incremental"), server.options(),
                                                  "incremental-s3", ctx.size_bytes, series), series, None)
    return _incremental_rows("incremental-s3", series, ctx.size_bytes)


def _incremental_notes(ctx: Context) -> list[str]:
    return ["incremental: a state of --size-gib (s3: --remote-size-gib) that does not change and 8 MiB that "
            "does; the second save's target is at most 0.15x a whole save (ratio >= 6.67) writing at most "
            "1.1x the changed bytes; a save where every byte changed and a cold restore at least 0.95x the "
            "plain way."]


def _preempt_notes(ctx: Context) -> list[str]:
    return [f"preempt: seconds from the SIGTERM (sent from another thread while a step computes) until "
            f"save() returned with that step committed; target at most {1 / PREEMPT_TARGET:.1f}x a blocking "
            "save of the same state (ratio >= 0.83)."]


def _select_notes(ctx: Context) -> list[str]:
    return ["select: the checkpoint is the GPT training state (weights plus AdamW moments, about 3x the "
            "weights); each way reads the weights only; local: cold cache, disk bytes read from "
            "/proc/self/io; select-s3: moto on this machine, bytes received on loopback (machine-wide)."]


def _restore_notes(ctx: Context) -> list[str]:
    return [f"restore: the model already exists (allocated and written) when the clock starts; each way "
            f"reads the same weights from its own format; extra RSS is the peak beyond the model; targets: "
            f"faster than each peer and extra RSS at most {RESTORE_RSS_TARGET:.0%} of the model. "
            f"export target: at least {EXPORT_SPEED_TARGET}x save_file, extra RSS at most "
            f"{EXPORT_RSS_TARGET:.0%} of the weights."]


REGISTRY: tuple[Backend, ...] = (
    Backend("local", bench_local, disk=6,
            baselines=("dd conv=fsync", "cat", "torch.save + fsync, torch.load, torch.load(mmap=True), "
                       "safetensors save_file + fsync, load_file, DCP FileSystemWriter / Reader "
                       "(peers, the same bytes)")),
    Backend("memory", bench_memory, uri=memory_uri, baselines=("tensor clone",)),
    Backend("manager", bench_manager, notes=_manager_notes, disk=2,
            baselines=("storage clone", "the same training steps with no save")),
    Backend("dcp", bench_dcp, baselines=("dcp.save/load with FileSystemWriter/Reader",)),
    Backend("fuse", bench_fuse, remote=True, launcher=rclone_mount, uri=mount_uri,
            notes=_fuse_notes, disk=8, baselines=("dd conv=fsync on the mount", "cat on the mount",
                                                  "torch.save / torch.load / safetensors on the mount (peers)")),
    Backend("s3", bench_s3, remote=True, launcher=moto_server, uri=s3_uri,
            notes=_object_store_notes, disk=4,
            baselines=("boto3 upload_file", "download_file + torch.load")),
    Backend("gcs", bench_gcs, remote=True, launcher=gcs_emulator, uri=gcs_uri,
            notes=_object_store_notes, disk=4,
            baselines=("gcsfs pipe", "gcsfs cat + torch.load", "DCP FsspecWriter / FsspecReader (peers)")),
    Backend("restore", bench_restore, notes=_restore_notes, disk=6, nbytes=_restore_model_bytes,
            baselines=tuple(label for _, label in RESTORE_PEERS) + ("safetensors save_file",
                                                                     "load + safetensors save_file")),
    Backend("select", bench_select, notes=_select_notes, disk=3,
            baselines=tuple(label for _, label in SELECT_PEERS)),
    Backend("select-s3", bench_select_s3, remote=True, launcher=moto_server, uri=s3_uri, disk=2,
            baselines=tuple(label for _, label in SELECT_PEERS)),
    Backend("preempt", bench_preempt, notes=_preempt_notes, disk=2.5,
            baselines=("a blocking CheckpointManager.save",)),
    Backend("preempt-s3", bench_preempt_s3, remote=True, launcher=moto_server, uri=s3_uri, disk=0.5,
            baselines=("a blocking CheckpointManager.save",)),
    Backend("incremental", bench_incremental, notes=_incremental_notes, disk=5,
            baselines=("a whole save (plain run)", "the same save with incremental=False",
                       "a load of the same step saved whole")),
    Backend("incremental-s3", bench_incremental_s3, remote=True, launcher=moto_server, uri=s3_uri, disk=0.5,
            baselines=("a whole save (plain run)", "the same save with incremental=False",
                       "a load of the same step saved whole")),
    Backend("scaling", bench_scaling, launcher=moto_server, uri=s3_uri, notes=_scaling_notes, disk=5,
            nbytes=lambda ctx: expected_nbytes(max(ctx.scaling_sizes_mib) * MIB),
            baselines=("the fastest peer at each size and tensor count (torch.save, safetensors, "
                       "torch.load plain and mmap, load_file; boto3 and S3Checkpoint on S3)",
                       "a 1.2x spread of seconds per GiB across sizes")),
    Backend("tensors", bench_tensors, launcher=moto_server, uri=s3_uri, notes=_tensors_notes, disk=4,
            nbytes=lambda ctx: tensors_nbytes(max(ctx.tensor_counts)),
            baselines=("torch.save + fsync", "torch.load", "torch.save to BytesIO + upload_fileobj",
                       "download_fileobj + torch.load", f"a {INSPECT_SECONDS_TARGET:g} s limit")),
)
BACKENDS: dict[str, Backend] = {b.key: b for b in REGISTRY}
ALL_BACKENDS = tuple(BACKENDS)


# --- report --------------------------------------------------------------------

COLUMNS = ["backend", "operation", "GiB", "seconds", "GB/s", "baseline", "baseline s",
           "ratio", "target", "extra peak RSS", "meets target"]
LEFT = {0, 1, 5, 10}  # text columns; numbers are right-aligned


def _cells(row: Row) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    size = f"{row.nbytes / GIB:.2f}"
    target = "-" if row.target is None else f"{'<=' if row.target_is_max else '>='}{row.target:.2f}"
    if row.error and row.seconds is None:
        meets = "error"
        return [row.backend, row.operation, size, "error", "-", row.baseline,
                num(row.baseline_seconds, ".3f"), "-", target, "-", meets]
    rss = "-" if row.extra_rss is None else f"{row.extra_rss:+.3f}x"
    if row.rss_target is not None:
        rss += f" (<={row.rss_target:.2f})"
    meets = {None: "-", True: "yes", False: "NO"}[row.meets_target]
    if row.target is not None and row.meets_target is None:
        meets = "error" if row.error else "-"  # e.g. the baseline failed: nothing to compare
    return [row.backend, row.operation, size, num(row.seconds, ".3f"), num(row.gb_per_s, ".2f"),
            row.baseline, num(row.baseline_seconds, ".3f"), num(row.ratio, ".2f"),
            target, rss, meets]


def text_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    # Text left-aligned, numbers right-aligned, as a reader scans them.
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in LEFT else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i in LEFT else "---:" for i in range(len(COLUMNS))) + "|"]
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
    backends = {r.backend for r in rows}
    remote = sorted(k for k in backends if k in BACKENDS and BACKENDS[k].remote)
    if remote:
        notes.append(
            f"{', '.join(remote)} rows use a {ctx.remote_state_bytes / GIB:.2f} GiB state "
            f"(--remote-size-gib), {_listed(GPT_LOCAL)} {ctx.state_bytes / GIB:.2f} GiB.")
    # Each backend's own notes, in the table's order; one shared by several once.
    for b in REGISTRY:
        if b.key in backends:
            notes += [n for n in b.notes(ctx) if n not in notes]
    # One line per distinct error of a backend, naming the rows it hit.
    errors: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.note:
            notes.append(f"{r.backend} {r.operation}: {r.note}")
        if r.error:
            errors.setdefault((r.backend, r.error), []).append(r.operation)
    for (backend, error), ops in errors.items():
        short = error if len(error) <= 400 else error[:400] + "..."
        notes.append(f"{backend} ERROR in {'; '.join(ops)}: {short}")
    return notes


def _listed(keys: tuple[str, ...]) -> str:
    """"a, b and c"."""
    return ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else "".join(keys)


# The backends that measure the GPT state of --size-gib, and of --remote-size-gib.
GPT_LOCAL = tuple(b.key for b in REGISTRY if not b.remote and b.nbytes is None)
GPT_REMOTE = tuple(b.key for b in REGISTRY if b.remote and b.nbytes is None)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(workdir: Path) -> dict[str, Any]:
    """Enough to compare runs; deliberately no hostname or user names."""
    def git_like(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip() or "\n"
        except (OSError, subprocess.SubprocessError):
            return "\n"

    def git(*args: str) -> str:
        return git_like(["git", *args]).strip()

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "ckptstore", "numpy", "fsspec", "crc32c",
                                              "s3fs", "gcsfs", "boto3", "moto",
                                              "gcp-storage-emulator", "matplotlib")},
        "rclone": git_like(["rclone", "version"]).splitlines()[0] if shutil.which("rclone") else None,
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


DEFAULT_OUT = REPO / "benchmarks" / "results"


def _tensor_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of tensor counts >= 1, got {text!r}")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    epilog = "backends and their baselines:\n" + "\n".join(
        f"  {b.key:<8} {'; '.join(b.baselines)}" for b in REGISTRY)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0,
                   help=f"state size in GiB for {_listed(GPT_LOCAL)} (default 1.0)")
    p.add_argument("--remote-size-gib", type=float, default=0.5,
                   help=f"state size in GiB for {_listed(GPT_REMOTE)}, which move ~50-300 MB/s "
                        "here (default 0.5)")
    p.add_argument("--tensor-counts", type=_tensor_counts, default=DEFAULT_TENSOR_COUNTS,
                   help="tensor counts for the tensors backend, comma-separated (default "
                        f"{','.join(map(str, DEFAULT_TENSOR_COUNTS))})")
    p.add_argument("--scaling-sizes-mib", type=_tensor_counts, default=SCALING_SIZES_MIB,
                   help="state sizes in MiB for the scaling backend, comma-separated (default "
                        f"{','.join(map(str, SCALING_SIZES_MIB))}); S3 measures those up to "
                        f"{SCALING_S3_MAX_MIB} MiB")
    p.add_argument("--repeat", type=int, default=3, help="repeats per figure; best is reported (default 3)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS),
                   help=f"comma-separated, from: {', '.join(BACKENDS)} (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where latest.json, latest.md and latest.png go (default benchmarks/results)")
    p.add_argument("--worker-timeout", type=float, default=WORKER_TIMEOUT_S,
                   help=f"seconds one measurement may take before it counts as hung "
                        f"(default {WORKER_TIMEOUT_S})")
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
    if args.repeat < 1 or args.size_gib <= 0 or args.remote_size_gib <= 0:
        p.error("--repeat must be >= 1, --size-gib and --remote-size-gib > 0")
    if args.worker_timeout <= 0:
        p.error("--worker-timeout must be > 0")
    return args


def _terminated(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so servers are stopped, mounts unmounted
    # and scratch files removed on the way out.
    raise KeyboardInterrupt(f"signal {signum}")


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve()).rstrip("/") + "/"
    return [p.mountpoint for p in psutil.disk_partitions(all=True) if p.mountpoint.startswith(root)]


def cleanup(workdir: Path) -> None:
    """Remove the scratch directory, unless a mount is still inside it: then
    rmtree would delete through the mount, so leave it and say so."""
    mounts = _mounts_under(workdir)
    if mounts:
        print(f"warning: {', '.join(mounts)} still mounted; leaving {workdir} in place "
              f"(unmount with fusermount3 -uz, then remove it)", file=sys.stderr)
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _backend_failed(name: str, ctx: Context, e: Exception) -> list[Row]:
    """A row saying a backend's benchmark itself broke (a bug in it, not a
    measured failure, which the backend records in its own rows)."""
    traceback.print_exc()
    ctx.log(f"{name}: benchmark failed: {type(e).__name__}: {e}")
    return [Row(name, "benchmark", None, ctx.state_bytes, None, "-", None, None,
                error=f"{type(e).__name__}: {e}")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size_bytes = int(args.size_gib * GIB)
    state_bytes = expected_nbytes(size_bytes)

    parent = args.workdir or pick_workdir_parent()
    parent.mkdir(parents=True, exist_ok=True)
    if fs_type(str(parent)) in ("tmpfs", "ramfs"):
        print(f"warning: {parent} is on tmpfs; save figures will not reflect a disk", file=sys.stderr)
    remote_size_bytes = int(args.remote_size_gib * GIB)
    remote_state_bytes = expected_nbytes(remote_size_bytes)
    ctx = Context(size_bytes, state_bytes, args.repeat, parent, False, remote_size_bytes,
                  remote_state_bytes, args.worker_timeout, args.tensor_counts, args.scaling_sizes_mib,
                  SCALING_S3_MAX_MIB)
    chosen = [BACKENDS[name] for name in args.backends]
    # Each backend's ``disk``: the local backend holds a checkpoint, a torch
    # file and a dd file at once, plus whatever a save writes before it
    # removes the previous one; the FUSE mount holds each of them twice
    # (rclone's cache and the remote directory); s3 stages a torch.save file
    # on local disk and moto spools objects there.
    need = max((b.disk * b.state_bytes(ctx) for b in chosen), default=0)
    if need and shutil.disk_usage(parent).free < need:
        print(f"error: {parent} has less than {need / GIB:.1f} GiB free", file=sys.stderr)
        return 2
    # Our own subdirectory, so cleaning up never touches anything else.
    workdir = Path(tempfile.mkdtemp(prefix="ckptstore-bench-", dir=parent))

    if args.warm:
        cold, cold_note = False, "page cache not dropped (--warm): load figures are warm-cache"
    else:
        cold, cold_note = drop_caches()
    ctx = replace(ctx, workdir=workdir, cold=cold)
    cfg = gpt_config(size_bytes)
    ctx.log(f"state: {state_bytes / GIB:.3f} GiB ({cfg}); workdir {workdir} "
            f"({fs_type(str(workdir))}); {'cold' if cold else 'WARM'} cache loads")
    remote_chosen = any(b.remote for b in chosen)
    if remote_chosen:
        ctx.log(f"{'/'.join(GPT_REMOTE)} state: {remote_state_bytes / GIB:.3f} GiB "
                f"({gpt_config(remote_size_bytes)})")

    rows: list[Row] = []
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for name in args.backends:
            try:
                rows += run_backend(BACKENDS[name], ctx)
            except Exception as e:  # one broken backend must not lose the others' figures
                rows += _backend_failed(name, ctx, e)
        info = machine_info(workdir)
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup(workdir)
    ctx.log(f"done in {time.perf_counter() - ctx.started:.0f}s")

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
        "config": {"size_gib": args.size_gib, "remote_size_gib": args.remote_size_gib,
                   "repeat": args.repeat, "backends": args.backends,
                   "cold_cache": cold, "speed_target": SPEED_TARGET, "rss_target": RSS_TARGET,
                   "remote_speed_target": REMOTE_SPEED_TARGET,
                   "remote_rss_target": REMOTE_RSS_TARGET,
                   "worker_timeout_s": args.worker_timeout,
                   "tensor_counts": list(args.tensor_counts)},
        "state": {"bytes": state_bytes, "gpt": cfg},
        "remote_state": {"bytes": remote_state_bytes, "gpt": gpt_config(remote_size_bytes)},
        "rows": [asdict(r) for r in rows],
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - ctx.started, 1),
    }
    write_atomic(args.out / "latest.json", json.dumps(result, indent=2) + "\n")
    versions = info["versions"]
    remote = ""
    if remote_chosen:
        rcfg = gpt_config(remote_size_bytes)
        remote = (f" · {'/'.join(GPT_REMOTE)} state {remote_state_bytes / GIB:.2f} GiB (GPT d={rcfg['d_model']}, "
                  f"{rcfg['n_layer']} layers, vocab {rcfg['vocab']})")
    title = (f"ckptstore benchmark · {info['date'][:10]} · {info['cpu_count']} CPUs · "
             f"best of {args.repeat}")
    plot_path = args.out / "latest.png"
    plotted, plot_msg = write_plot([asdict(r) for r in rows], plot_path, title)
    ctx.log(plot_msg)
    scaled = False
    if any(r.curve for r in rows):
        scaled, scale_msg = write_scaling_plot([asdict(r) for r in rows], args.out / "scaling.png",
                                               title.replace("benchmark", "scaling"))
        ctx.log(scale_msg)
    md = [
        "# ckptstore benchmark: latest run",
        "",
        f"{info['date']} · {info['cpu_count']} CPUs, {info['memory_bytes'] / GIB:.0f} GiB RAM · "
        f"{info['platform']} · Python {info['python']}, torch {versions['torch']} · "
        f"workdir on {info['workdir_fs']} · state {state_bytes / GIB:.2f} GiB "
        f"(GPT d={cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, AdamW){remote} · "
        f"best of {args.repeat} · {'cold' if cold else 'warm'} cache loads · "
        f"{result['wall_seconds']:.0f} s in all",
        "",
        markdown_table(rows),
        "",
        *[f"- {n}" for n in notes],
        "",
        *([f"![ratios and extra memory]({plot_path.name})", ""] if plotted else []),
        *(["![seconds per GiB and extra memory by size and tensor count](scaling.png)", ""] if scaled else []),
        "Reproduce: `python -m benchmarks.bench "
        f"--size-gib {args.size_gib:g} --remote-size-gib {args.remote_size_gib:g} "
        f"--repeat {args.repeat} --backends {','.join(args.backends)}"
        + (f" --tensor-counts {','.join(map(str, args.tensor_counts))}"
           if args.tensor_counts != DEFAULT_TENSOR_COUNTS else "")
        + (f" --scaling-sizes-mib {','.join(map(str, args.scaling_sizes_mib))}"
           if args.scaling_sizes_mib != SCALING_SIZES_MIB else "")
        + "`",
        "",
    ]
    write_atomic(args.out / "latest.md", "\n".join(md))
    ctx.log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    if args.out.resolve() == DEFAULT_OUT.resolve() and set(args.backends) == set(ALL_BACKENDS):
        from . import readme
        if readme.update(REPO / "docs" / "benchmarks.md", result):
            ctx.log("updated the benchmark table in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
