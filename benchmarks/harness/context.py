"""What a scenario's ``measure`` gets: the run's context, a site of its own, the worker.

Every save and load runs in a fresh process (``benchmarks.worker``): ``Context.run`` starts
it with a JSON spec and returns its result, printing one progress line per measurement.
With ``--list`` (``dry``) nothing is started: every measurement fails at once with
"not measured", so each scenario still builds every row it would produce.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from benchmarks.harness.registry import Scenario
    from benchmarks.harness.series import Series

REPO = Path(__file__).resolve().parent.parent.parent
GIB = 1 << 30
MIB = 1 << 20
RESULT_PREFIX = "BENCH_RESULT "
WORKER_TIMEOUT_S = 600  # a worker that takes longer has hung (or the disk is failing)
DEFAULT_TENSOR_COUNTS = (10, 1_000, 100_000)
SCALING_SIZES_MIB = (64, 256, 1024, 4096)
NOT_MEASURED = "not measured (--list)"

T = TypeVar("T")


class WorkerError(RuntimeError):
    pass


_stage = ""  # what the last log line said was under way, for the progress lines


@dataclass
class Context:
    """What every scenario gets."""

    size_bytes: int  # requested size, passed to gpt_state
    state_bytes: int  # tensor bytes gpt_state actually produces
    repeat: int
    workdir: Path
    cold: bool  # page cache can be dropped before loads
    remote_size_bytes: int = 0  # the same two for the remote scenarios (--remote-size)
    remote_state_bytes: int = 0
    worker_timeout: float = WORKER_TIMEOUT_S
    tensor_counts: tuple[int, ...] = DEFAULT_TENSOR_COUNTS  # for the tensors and scaling scenarios
    scaling_sizes_mib: tuple[int, ...] = SCALING_SIZES_MIB  # the scaling scenario's local sizes
    scaling_s3_max_mib: int = 1024  # ... and the largest it also measures on S3
    quick: bool = False  # the quick run: each scenario's quick peers and rows only
    dry: bool = False  # --list: no worker, no server; every measurement fails as "not measured"
    started: float = field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        global _stage
        _stage = msg
        if not self.dry:
            print(f"[{time.perf_counter() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def run(self, spec: dict) -> dict:
        if self.dry:
            raise WorkerError(NOT_MEASURED)
        what = " ".join(str(x) for x in (spec.get("impl") or spec.get("command"), spec["op"]) if x)
        try:
            out = run_worker(spec, self.worker_timeout)
        except WorkerError as e:
            print(f"[{time.perf_counter() - self.started:6.1f}s]   {what}: error: {e}", file=sys.stderr, flush=True)
            raise
        took = f" {out['seconds']:.2f} s" if isinstance(out.get("seconds"), (int, float)) else " done"
        print(f"[{time.perf_counter() - self.started:6.1f}s]   {_stage.split(':')[0]}: {what}{took}",
              file=sys.stderr, flush=True)
        return out

    def remote(self) -> "Context":
        """This context with the remote scenarios' state size."""
        return replace(self, size_bytes=self.remote_size_bytes, state_bytes=self.remote_state_bytes)

    @property
    def cache(self) -> str:
        """How the load rows call their page cache."""
        return "cold" if self.cold else "warm cache"


def run_worker(spec: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Run one measurement in a fresh interpreter and return its result dict."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        what = " ".join(x for x in (spec.get("impl"), spec["op"]) if x)
        raise WorkerError(f"{what} timed out after {timeout:.0f}s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    # The last stderr line of a traceback is the exception itself.
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    raise WorkerError(lines[-1] if lines else f"worker exited with status {proc.returncode}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or tree, then sync so the freed blocks (and the discards ext4 issues
    for them) are not written back during the next timed operation."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def fail_unfinished(ctx: Context, key: str, series: dict[str, "Series"], e: BaseException | str) -> None:
    """Mark every series that did not get all its runs with what stopped it."""
    msg = e if isinstance(e, str) else f"{type(e).__name__}: {e}".strip()
    ctx.log(f"{key}: {msg}")
    for s in series.values():
        if len(s.seconds) < ctx.repeat:
            s.fail(msg)


@dataclass
class Site:
    """What a scenario's ``measure`` gets: its entry, the context (with the state size it
    measures) and a scratch directory of its own, which the driver creates before and
    removes after."""

    scenario: "Scenario"
    ctx: Context

    @property
    def key(self) -> str:
        return self.scenario.key

    @property
    def scratch(self) -> Path:
        return self.ctx.workdir / self.key

    def uri(self, handle: Any, name: str) -> str:
        assert self.scenario.backend is not None, f"{self.key} has no backend"
        return self.scenario.backend.uri(handle, name)

    def serve(self, measure: Callable[[Any], T], series: dict[str, "Series"], default: T) -> T:
        """``measure(handle)`` with the backend's launcher running. A launcher that will not
        start, a server that dies or a cleanup that fails marks every series in ``series``
        that did not get all its runs with the error, and returns ``default``: the rows
        still come, saying why."""
        backend = self.scenario.backend
        assert backend is not None and backend.launcher is not None, f"{self.key} has no launcher"
        if self.ctx.dry:
            fail_unfinished(self.ctx, self.key, series, NOT_MEASURED)
            return default
        try:
            with backend.launcher(self) as handle:
                return measure(handle)
        except Exception as e:
            fail_unfinished(self.ctx, self.key, series, e)
            return default
