"""Drive save_loop.py writers and kill them with SIGKILL at chosen instants."""
from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAVE_LOOP = Path(__file__).resolve().parent / "save_loop.py"


def bytes_under(directory: Path) -> int:
    """Total size of the files under `directory`, tolerant of files vanishing mid-walk."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class WriterServer:
    """A warm save_loop.py --serve process that forks writers on demand."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(SAVE_LOOP), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
        )
        self.live: set[int] = set()  # writers started and not yet reaped
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pending: list[str] = []
        self.expect("ready", timeout=60)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<eof>")

    def _next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"writer server silent for {timeout}s: {self._stderr()}") from None
        if line == "<eof>":
            raise AssertionError(f"writer server died: {self._stderr()}")
        return line

    def expect(self, prefix: str, timeout: float = 30) -> str:
        """Wait for a line starting with `prefix`; lines seen on the way are kept."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line
            self.pending.append(line)

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def start_writer(self, uri: str, first_version: int, megabytes: float) -> int:
        self._send(f"run {uri} {first_version} {megabytes}")
        pid = int(self.expect("started ").split()[1])
        self.live.add(pid)
        return pid

    def kill_writer(self, pid: int) -> list[int]:
        """SIGKILL the writer and return the versions it reported committed, in order."""
        os.kill(pid, signal.SIGKILL)
        self._send(f"reap {pid}")
        self.expect(f"reaped {pid} ")
        self.live.discard(pid)
        committed, errors, rest = [], [], []
        for line in self.pending:
            words = line.split(maxsplit=2)
            if words[:2] == ["committed", str(pid)]:
                committed.append(int(words[2]))
            elif words[:2] == ["error", str(pid)]:
                errors.append(words[2])
            else:
                rest.append(line)
        self.pending = rest
        assert not errors, f"writer {pid} failed on its own: {errors[0]}"
        return committed

    def committed_so_far(self, pid: int) -> list[int]:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            self.pending.append(line)
        return [int(line.split()[2]) for line in self.pending if line.startswith(f"committed {pid} ")]

    def close(self) -> None:
        for pid in list(self.live):  # a test failed between starting and killing a writer
            try:
                self.kill_writer(pid)
            except Exception:  # noqa: BLE001
                pass
        try:
            self._send("quit")
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def interrupt_a_save(server: WriterServer, uri: str, directory: Path, first_version: int,
                     megabytes: float, kill_above_bytes: int, timeout: float = 20.0) -> list[int]:
    """Start a writer and SIGKILL it as soon as more than `kill_above_bytes` lie under
    `directory`, i.e. while it is part-way through writing its data.

    Returns the versions it reported committed (normally none).
    """
    pid = server.start_writer(uri, first_version, megabytes)
    deadline = time.monotonic() + timeout
    try:
        while bytes_under(directory) <= kill_above_bytes:
            if time.monotonic() > deadline:
                raise AssertionError(f"writer never wrote more than {kill_above_bytes} bytes under {directory}")
            time.sleep(0.0005)
    finally:
        committed = server.kill_writer(pid)
    return committed


def kill_at_random_instants(server: WriterServer, uri: str, *, rounds: int, seed: str, megabytes: float,
                            start_version: int, calibrate_commits: int = 4, window_periods: float = 3.0,
                            after_commit_every: int = 0) -> tuple[int, int, int]:
    """SIGKILL ``rounds`` writers overwriting ``uri`` at seeded random instants.

    The first round times the writer's commit cadence; later kills are spread
    over ``window_periods`` commit periods from the writer's start, and every
    ``after_commit_every``-th round kills right after a commit is reported.
    After each kill, what a reader finds must be exactly one written version:
    the last one committed or the one after it (or, with none committed, the
    one before or the writer's first). Returns (the version the checkpoint
    holds at the end, rounds with a commit, rounds without).
    """
    import ckptstore
    from helpers.save_loop import check_state

    rng = random.Random(seed)
    current, window = start_version, None
    with_commit = without_commit = 0
    for r in range(rounds):
        first = (r + 1) * 100  # rounds write a handful of versions each; int16 tensors hold them
        pid = server.start_writer(uri, first, megabytes)
        started = time.monotonic()
        if window is None:
            commit_times: list[float] = []
            while len(commit_times) < calibrate_commits:
                if len(server.committed_so_far(pid)) > len(commit_times):
                    commit_times.append(time.monotonic())
                assert time.monotonic() - started < 120, "writer too slow to calibrate"
                time.sleep(0.0005)
            window = window_periods * min(b - a for a, b in zip(commit_times, commit_times[1:]))
        elif after_commit_every and r % after_commit_every == after_commit_every - 1:
            # The next save (and any cleanup of the one just committed) is at its very start.
            while not server.committed_so_far(pid):
                assert time.monotonic() - started < 60, "writer never committed"
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, window))
        committed = server.kill_writer(pid)

        assert ckptstore.exists(uri), f"round {r}: no checkpoint after the kill (committed {committed})"
        version = check_state(ckptstore.load(uri))
        allowed = {committed[-1], committed[-1] + 1} if committed else {current, first}
        assert version in allowed, f"round {r}: loaded version {version}, expected one of {sorted(allowed)}"
        assert ckptstore.verify(uri, deep=True).ok
        current = version
        if committed:
            with_commit += 1
        else:
            without_commit += 1
    return current, with_commit, without_commit
