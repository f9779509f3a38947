"""Start the ranks of one torch.distributed job as real processes on loopback.

    with RankJob(WORKER, ["scenario", str(directory)], world_size=4) as job:
        job.wait_for(1, "SAVING")          # a line rank 1 printed
        job.kill(1)                        # SIGKILL rank 1 there
        ranks = job.finish(timeout=60)     # every rank's exit code and output

Each rank gets the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free
port>), one intra-op thread (the ranks share the machine's few cores) and
unbuffered output. Its stdout and stderr are read by threads as they come,
so a test can wait for a line while the job runs. A job that outlives its
timeout is killed whole, and a rank dies with the test process that started
it (PR_SET_PDEATHSIG), so a failing test never leaves ranks behind.

A worker reports what it saw as lines ``RESULT {json}`` on stdout;
``RankResult.results`` parses them. Generalises what test_dcp.py does for
its two ranks.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .backends import free_port

TESTS_DIR = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort; the job's own timeout still kills it
        pass


@dataclass
class RankResult:
    """What one rank did: its exit status (negative: killed by that signal) and its output."""

    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def results(self) -> list[dict[str, Any]]:
        """Every ``RESULT {json}`` line the rank printed, in order."""
        out = []
        for line in self.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                out.append(json.loads(line[len(RESULT_PREFIX):]))
        return out

    def result(self, kind: str) -> dict[str, Any]:
        """The last result of ``kind`` (the ``"kind"`` field); AssertionError with the output if none."""
        found = [r for r in self.results if r.get("kind") == kind]
        assert found, f"rank {self.rank} printed no {kind!r} result:\n{self.describe()}"
        return found[-1]

    def describe(self, limit: int = 4000) -> str:
        state = "timed out (killed)" if self.timed_out else f"exit {self.returncode}"
        return (f"--- rank {self.rank}: {state}\n--- stdout:\n{self.stdout[-limit:]}"
                f"\n--- stderr:\n{self.stderr[-limit:]}")


def describe(ranks: Sequence[RankResult]) -> str:
    """Every rank's exit status and the tail of its output, for an assertion message."""
    return "\n".join(r.describe() for r in ranks)


class RankJob:
    """``world_size`` processes of ``script`` forming one gloo job."""

    def __init__(self, script: str | Path, args: Sequence[str] = (), *, world_size: int,
                 env: dict[str, str] | None = None, rank_env: Callable[[int], dict[str, str]] | None = None,
                 python: str = sys.executable):
        self.script, self.args, self.world_size = str(script), [str(a) for a in args], world_size
        self.env, self.rank_env, self.python = dict(env or {}), rank_env, python
        self.port: int | None = None
        self.procs: list[subprocess.Popen] = []
        self._out: list[list[str]] = []
        self._err: list[list[str]] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.started_at: float | None = None

    # -- starting

    def start(self) -> "RankJob":
        self.port = free_port()
        pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        for rank in range(self.world_size):
            env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.world_size),
                       LOCAL_WORLD_SIZE=str(self.world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(self.port), **self.env)
            if self.rank_env is not None:
                env.update(self.rank_env(rank))
            proc = subprocess.Popen(
                [self.python, self.script, *self.args], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            self.procs.append(proc)
            self._out.append([])
            self._err.append([])
            for stream, sink in ((proc.stdout, self._out[rank]), (proc.stderr, self._err[rank])):
                t = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                t.start()
                self._readers.append(t)
        self.started_at = time.monotonic()
        return self

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line)
        stream.close()

    def __enter__(self) -> "RankJob":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    # -- watching

    def lines(self, rank: int) -> list[str]:
        """What ``rank`` has printed on stdout so far, line by line."""
        with self._lock:
            return [line.rstrip("\n") for line in self._out[rank]]

    def output(self, rank: int) -> tuple[str, str]:
        with self._lock:
            return "".join(self._out[rank]), "".join(self._err[rank])

    def wait_for(self, rank: int, prefix: str, timeout: float = 60.0) -> str:
        """The first stdout line of ``rank`` starting with ``prefix``, waiting for it.

        AssertionError (with every rank's output) if the rank exits or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines(rank):
                if line.startswith(prefix):
                    return line
            if self.procs[rank].poll() is not None or time.monotonic() > deadline:
                for line in self.lines(rank):  # it may have printed it just before exiting
                    if line.startswith(prefix):
                        return line
                why = "exited" if self.procs[rank].poll() is not None else f"was silent for {timeout:.0f} s"
                raise AssertionError(f"rank {rank} {why} before printing {prefix!r}:\n"
                                     f"{describe(self.snapshot())}")
            time.sleep(0.005)

    def snapshot(self) -> list[RankResult]:
        """Every rank's state and output so far (the job may still run)."""
        out = []
        for rank, proc in enumerate(self.procs):
            stdout, stderr = self.output(rank)
            out.append(RankResult(rank, proc.poll(), stdout, stderr))
        return out

    # -- signalling

    def send_signal(self, rank: int, sig: int) -> None:
        """Deliver ``sig`` to one rank (nothing if it already exited)."""
        proc = self.procs[rank]
        if proc.poll() is None:
            proc.send_signal(sig)

    def kill(self, rank: int) -> None:
        """SIGKILL one rank: it dies at that instant, with no cleanup of its own."""
        self.send_signal(rank, signal.SIGKILL)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    # -- ending

    def finish(self, timeout: float = 120.0) -> list[RankResult]:
        """Wait for every rank to exit (at most ``timeout`` seconds from now, then kill the
        rest: they are marked ``timed_out``); each rank's exit status and whole output."""
        deadline = time.monotonic() + timeout
        timed_out = set()
        for rank, proc in enumerate(self.procs):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out.add(rank)
        if timed_out:
            self.kill_all()
        for t in self._readers:
            t.join(10)
        out = []
        for rank, proc in enumerate(self.procs):
            stdout, stderr = self.output(rank)
            out.append(RankResult(rank, proc.returncode, stdout, stderr, rank in timed_out))
        return out

    def exited_at(self, ranks: Sequence[int], timeout: float) -> float | None:
        """Wait until every rank in ``ranks`` has exited; the monotonic time when the last one
        was seen gone, or None if ``timeout`` passed first (the ranks are left running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.procs[r].poll() is not None for r in ranks):
                return time.monotonic()
            time.sleep(0.02)
        return None


def run_ranks(script: str | Path, args: Sequence[str] = (), *, world_size: int, timeout: float = 120.0,
              env: dict[str, str] | None = None) -> list[RankResult]:
    """Run one job to its end: every rank's RankResult (a job past ``timeout`` is killed)."""
    with RankJob(script, args, world_size=world_size, env=env) as job:
        return job.finish(timeout)


def check_all_succeeded(ranks: Sequence[RankResult], what: str = "the job") -> None:
    """AssertionError with every rank's output unless every rank exited 0."""
    bad = [r.rank for r in ranks if r.returncode != 0]
    assert not bad, f"ranks {bad} of {what} failed:\n{describe(ranks)}"
