"""A bandwidth-limited TCP proxy, in a process of its own: a slow link on loopback.

    python -m benchmarks.throttle --target 127.0.0.1:PORT --mib-per-s 50

rclone limits a mount's bandwidth itself (``--bwlimit``); an S3 server on loopback has no
such switch, so ``benchmarks/space.py`` puts this proxy between ckptstore and the moto
server. It listens on a free port of 127.0.0.1 (printed as ``port N`` on stdout once it
accepts), forwards every connection to ``--target``, and passes the bytes of each
direction through one token bucket shared by all connections: like a link of that rate
each way, whatever the number of parallel requests. Rates are MiB/s, as rclone's
``--bwlimit 50M`` is.

It is a separate process so its pumping never competes for the client's GIL; at tens of
MiB/s it costs a few percent of one core. ``Throttle`` starts and stops it.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

CHUNK = 64 << 10


class Bucket:
    """A token bucket of ``rate`` bytes/s: ``take(n)`` returns once n bytes may pass.

    Takers go into debt and sleep it off, so concurrent connections share the rate in
    the order they asked; ``burst`` bytes may pass at once after a quiet spell.
    """

    def __init__(self, rate: float, burst: int):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate) - n
            self.last = now
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def _pump(src: socket.socket, dst: socket.socket, bucket: Bucket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if n == 0:
                break
            bucket.take(n)
            dst.sendall(view[:n])
    except OSError:
        pass
    for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
        try:
            s.shutdown(how)
        except OSError:
            pass


def _serve_pair(client: socket.socket, target: tuple[str, int], up: Bucket, down: Bucket) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(upstream, client, down), daemon=True)
    t.start()
    _pump(client, upstream, up)
    t.join()
    client.close()
    upstream.close()


def serve(target: tuple[str, int], mib_per_s: float, port: int = 0) -> None:
    """Accept and forward forever (until killed)."""
    rate = mib_per_s * (1 << 20)
    burst = max(CHUNK * 4, int(rate / 100))      # at most 10 ms of the rate at once
    up, down = Bucket(rate, burst), Bucket(rate, burst)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(256)
    print(f"port {srv.getsockname()[1]}", flush=True)
    while True:
        client, _ = srv.accept()
        threading.Thread(target=_serve_pair, args=(client, target, up, down), daemon=True).start()


def _die_with_parent() -> None:  # in the child, between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; stop() still ends it
        pass


class Throttle:
    """``with Throttle("127.0.0.1", port, 50) as t: ... t.endpoint ...``: the proxy's process."""

    def __init__(self, host: str, port: int, mib_per_s: float):
        self.target = f"{host}:{port}"
        self.mib_per_s = mib_per_s
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Throttle":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.throttle", "--target", self.target, "--mib-per-s",
             str(self.mib_per_s)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"the throttling proxy did not start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Throttle":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--mib-per-s", type=float, required=True, help="rate of each direction, MiB/s")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        serve((host, int(port)), args.mib_per_s, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
