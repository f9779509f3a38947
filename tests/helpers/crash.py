"""Drive save_loop.py writers and kill them with SIGKILL at chosen instants."""
from __future__ import annotations

import os
import queue
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
