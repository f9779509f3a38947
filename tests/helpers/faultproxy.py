"""A fault-injecting TCP proxy for HTTP on loopback (an S3 endpoint in tests).

    with FaultProxy("127.0.0.1", moto_port, seed=1, drop_rate=0.2) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint, ...)
        ...
        proxy.set_rates(drop_rate=0.0)   # let a final check through
        assert proxy.stats["drop"] > 0

The proxy listens on 127.0.0.1 on a free port and forwards bytes both ways
to the target, one pair of threads per connection (bulk ``recv_into`` of
1 MiB and ``sendall``; no per-byte Python work, so bodies of hundreds of MB
pass at loopback speed).

On the client->server direction it parses just enough HTTP/1.1 to find
request boundaries (request line and headers; the body by Content-Length or
chunked framing), so faults are decided **per request**, also on keep-alive
connections that carry many requests. For each request one uniform draw
picks at most one fault, checked in this order:

- ``drop``: the request is cut after a random number of its bytes (head
  included), drawn from ``drop_after = (lo, hi)`` and always short of the
  request's last byte, so the server never sees a complete request; then
  both connections are reset (SO_LINGER 0 + close -> RST). The client sees
  a connection reset mid-request (mid-upload for a PUT).
- ``slowdown``: the proxy answers itself ``503 Slow Down`` with an S3 XML
  ``SlowDown`` error and ``Connection: close``; the request is not forwarded.
- ``error500``: likewise ``500 Internal Server Error`` with ``InternalError``.
- ``conflict``: likewise ``409 Conflict`` with ``ConditionalRequestConflict``,
  for the next ``conflicts`` requests that carry ``If-None-Match`` (S3's
  answer to a conditional write that races another); not drawn at random.
- ``blackhole``: the request is not forwarded and never answered; the proxy
  keeps reading (and discarding) whatever the client sends until it gives
  up. ``blackhole_rate=1.0`` is a blackhole endpoint: it accepts, reads, and
  never replies (checks read timeouts, not only refused connections).

For the answered faults the proxy by default first reads and discards
the rest of the request body and then answers (what a server does; every
client copes). With ``respond_early=True`` it answers as soon as the
headers are in and discards the body afterwards (what S3 sometimes does).

Decisions are deterministic given ``seed``: request number k (counted over
the proxy's life, in order of arrival) draws from ``Random(f"{seed}:{k}")``.
So the same sequence of requests meets the same faults; with a client that
sends requests concurrently the arrival order, and so the outcome, can vary.

Rates, ``drop_after`` and ``respond_early`` are plain attributes and may be
changed at any time (``set_rates(...)``); they apply from the next request.
``stats`` counts connections, requests, forwarded requests, each fault, and
``bytes_down``, every byte the server sent back (headers included);
``events`` lists ``(k, method, target, fault)`` for every request seen.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from typing import Optional

BUFSIZE = 1 << 20
_MAX_HEAD = 1 << 20  # a request head larger than this is not HTTP we understand

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
                 b"<RequestId>FAULTPROXY</RequestId></Error>")
ERROR500_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>InternalError</Code><Message>We encountered an internal error. "
                 b"Please try again.</Message><RequestId>FAULTPROXY</RequestId></Error>")

CONFLICT_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>ConditionalRequestConflict</Code><Message>A conflicting conditional "
                 b"operation is currently in progress against this resource. Please try again.</Message>"
                 b"<RequestId>FAULTPROXY</RequestId></Error>")

FAULTS = ("drop", "slowdown", "error500", "blackhole", "conflict")
ANSWERED = ("slowdown", "error500", "conflict")


def _response(status: str, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: FAULTPROXY\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


SLOWDOWN_RESPONSE = _response("503 Slow Down", SLOWDOWN_BODY)
ERROR500_RESPONSE = _response("500 Internal Server Error", ERROR500_BODY)
CONFLICT_RESPONSE = _response("409 Conflict", CONFLICT_BODY)
_RESPONSES = {"slowdown": SLOWDOWN_RESPONSE, "error500": ERROR500_RESPONSE, "conflict": CONFLICT_RESPONSE}


def _reset(sock: Optional[socket.socket]) -> None:
    """Close with RST (SO_LINGER on, timeout 0).

    SHUT_RD first wakes a thread blocked in recv on this socket (it returns 0)
    without sending anything; otherwise the close would wait for that recv.
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _shutdown(sock, socket.SHUT_RD)
    try:
        sock.close()
    except OSError:
        pass


def _shutdown(sock: Optional[socket.socket], how: int) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(how)
    except OSError:
        pass


class _Abort(Exception):
    """The connection pair has been reset or closed; stop pumping."""


class _Conn:
    """One client connection, its upstream connection and their two pump threads."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, number: int):
        self.proxy = proxy
        self.client = client
        self.number = number
        self.upstream: Optional[socket.socket] = None
        self.lock = threading.Lock()
        self.closed = False
        self.s2c_thread: Optional[threading.Thread] = None
        # client->server parser state
        self.mode = "head"      # head | body | chunk_size | chunk_data | trailers | discard | blackhole | raw
        self.pending = bytearray()   # head / chunk-size line / trailers being gathered
        self.remaining = 0      # body or chunk bytes left
        self.fault: Optional[str] = None   # fault of the current request
        self.sent = 0           # bytes of the current request forwarded
        self.cut_at: Optional[int] = None  # drop: forward at most this many bytes of the request
        self._answered = False  # a slowdown / error500 answer was sent
        self.method = ""

    # -- lifetime
    def run(self) -> None:
        try:
            self._pump_c2s()
        except (_Abort, OSError):
            pass
        finally:
            self._finish_c2s()

    def _finish_c2s(self) -> None:
        # The client closed its side (or we gave up on it); let the upstream
        # see EOF and wait for its answer to drain before closing.
        t = self.s2c_thread
        if t is not None and not self.closed:
            _shutdown(self.upstream, socket.SHUT_WR)
            t.join()
        self.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.upstream):
            if s is not None:
                _shutdown(s, socket.SHUT_RDWR)
                try:
                    s.close()
                except OSError:
                    pass
        self.proxy._forget(self)

    def reset(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._forget(self)

    # -- server -> client: plain bytes
    def _pump_s2c(self) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        up, cl = self.upstream, self.client
        try:
            while True:
                n = up.recv_into(buf)
                if n == 0:
                    break
                with self.proxy._lock:
                    self.proxy.stats["bytes_down"] += n
                cl.sendall(view[:n])
        except OSError:
            pass
        # The server is done talking: pass the EOF on.
        if not self.closed:
            _shutdown(cl, socket.SHUT_WR)
            _shutdown(up, socket.SHUT_RD)

    def _connect_upstream(self) -> None:
        if self.upstream is not None:
            return
        p = self.proxy
        try:
            up = socket.create_connection((p.target_host, p.target_port), timeout=10)
        except OSError:
            self.reset()
            raise _Abort()
        up.settimeout(None)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = up
        if self.closed:
            _reset(up)
            raise _Abort()
        self.s2c_thread = threading.Thread(target=self._pump_s2c, name=f"faultproxy-s2c-{self.number}",
                                           daemon=True)
        self.s2c_thread.start()

    # -- client -> server: parse request boundaries, decide faults
    def _pump_c2s(self) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        cl = self.client
        while True:
            n = cl.recv_into(buf)
            if n == 0:
                return
            if self.mode in ("blackhole", "discard"):
                continue
            self._feed(view[:n])

    def _feed(self, mv: memoryview) -> None:
        while len(mv):
            mode = self.mode
            if mode == "head":
                self.pending += mv
                end = self.pending.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.pending) > _MAX_HEAD:
                        self._go_raw()
                    return
                head = bytes(self.pending[:end + 4])
                rest = bytes(self.pending[end + 4:])
                self.pending.clear()
                self._start_request(head)
                mv = memoryview(rest)
            elif mode in ("body", "chunk_data", "discard_body"):
                k = min(self.remaining, len(mv))
                self.remaining -= k
                if mode == "chunk_data":
                    self._out(mv[:k], False)
                    if self.remaining == 0:
                        self.mode = "chunk_size"
                else:
                    last = self.remaining == 0
                    if mode == "body":
                        self._out(mv[:k], last)
                    if last:
                        self._end_request()
                mv = mv[k:]
            elif mode in ("chunk_size", "trailers"):
                # Small framing lines: gather them whole, a few bytes at a time.
                i = bytes(mv[:4096]).find(b"\n")
                if i < 0:
                    self.pending += mv
                    if len(self.pending) > 4096:  # no chunk line is that long: not HTTP we follow
                        self._go_raw()
                        return
                    mv = mv[len(mv):]
                    continue
                self.pending += mv[:i + 1]
                mv = mv[i + 1:]
                line = bytes(self.pending)
                self.pending.clear()
                if mode == "chunk_size":
                    try:
                        size = int(line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        self._go_raw()
                        self._out(memoryview(line), False)
                        continue
                    self._out(memoryview(line), False)
                    if size == 0:
                        self.mode = "trailers"
                    else:
                        self.remaining = size + 2  # data and its CRLF
                        self.mode = "chunk_data"
                else:  # trailers: end at the empty line
                    last = line in (b"\r\n", b"\n")
                    self._out(memoryview(line), last)
                    if last:
                        self._end_request()
            elif mode == "discard":
                return  # answered and closing: drop whatever else comes
            elif mode == "blackhole":
                return
            else:  # raw: not HTTP we follow, forward as is
                self._out(mv, False)
                return

    def _go_raw(self) -> None:
        data = bytes(self.pending)
        self.pending.clear()
        if self.fault in ANSWERED:
            self._answer_and_close()
            return
        self.mode = "raw"
        self.fault = None
        self.cut_at = None
        if data:
            self._connect_upstream()
            self._send_up(memoryview(data))

    def _start_request(self, head: bytes) -> None:
        p = self.proxy
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        method = parts[0].decode("latin-1", "replace")
        target = parts[1].decode("latin-1", "replace") if len(parts) > 1 else ""
        length = 0
        chunked = False
        expect100 = False
        conditional = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    length = 0
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"expect" and b"100-continue" in value.lower():
                expect100 = True
            elif name == b"if-none-match":
                conditional = True
        fault, cut = p._decide(method, target, self.number, conditional)
        self.method = method
        self.fault = fault
        self.sent = 0
        self.cut_at = None
        total = len(head) + (0 if chunked else length)
        body_next = "chunk_size" if chunked else ("body" if length else None)
        self.remaining = 0 if chunked else length

        if fault is None or fault == "drop":
            if fault == "drop":
                self.cut_at = cut if chunked else min(cut, total - 1)
            self._connect_upstream()
            if body_next is None:
                self._out(memoryview(head), True)
                self._end_request()
            else:
                self._out(memoryview(head), False)
                self.mode = body_next
            return
        if fault == "blackhole":
            self.mode = "blackhole"
            return
        # slowdown / error500: answered here, never forwarded. A client that
        # sent "Expect: 100-continue" waits for our answer before the body,
        # so it gets the final status at once (as a server would send it).
        if body_next is None or expect100:
            self._answer_and_close()
            return
        if p.respond_early:
            self._answer()
        # Read and discard the body (following chunk framing if chunked),
        # then answer (unless already done) and close.
        self.mode = "chunk_size" if chunked else "discard_body"

    def _answer(self) -> None:
        if self._answered:
            return
        self._answered = True
        data = _RESPONSES[self.fault]
        if self.method == "HEAD":  # an answer to HEAD has no body
            data = data[:data.index(b"\r\n\r\n") + 4]
        try:
            self.client.sendall(data)
        except OSError:
            raise _Abort()

    def _answer_and_close(self) -> None:
        # Graceful close: the answer, then FIN. Whatever the client still
        # sends is read and dropped until it closes, so no RST can overtake
        # the answer.
        self._answer()
        _shutdown(self.client, socket.SHUT_WR)
        self.mode = "discard"

    def _end_request(self) -> None:
        if self.fault in ANSWERED:
            self._answer_and_close()
            return
        self.fault = None
        self.cut_at = None
        self.mode = "head"

    def _out(self, mv: memoryview, last: bool) -> None:
        """Forward part of the current request (or nothing, for an answered fault)."""
        if self.fault in ANSWERED:
            return  # being discarded
        if self.cut_at is not None:
            allowed = self.cut_at - self.sent
            if last:
                allowed = min(allowed, len(mv) - 1)
            if allowed < len(mv):
                if allowed > 0:
                    self._send_up(mv[:allowed])
                self.reset()
                raise _Abort()
        self._send_up(mv)
        self.sent += len(mv)

    def _send_up(self, mv: memoryview) -> None:
        try:
            self.upstream.sendall(mv)
        except (OSError, AttributeError):
            self.reset()
            raise _Abort()


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` that injects HTTP faults per request."""

    def __init__(self, target_host: str, target_port: int, *, seed: int, drop_rate: float = 0.0,
                 slowdown_rate: float = 0.0, error500_rate: float = 0.0, blackhole_rate: float = 0.0,
                 drop_after: tuple[int, int] = (0, 4 << 20), respond_early: bool = False,
                 conflicts: int = 0):
        self.target_host = target_host
        self.target_port = int(target_port)
        self.seed = seed
        self.drop_rate = drop_rate
        self.slowdown_rate = slowdown_rate
        self.error500_rate = error500_rate
        self.blackhole_rate = blackhole_rate
        self.drop_after = drop_after
        self.respond_early = respond_early
        # The next this-many requests that carry If-None-Match are answered
        # 409 ConditionalRequestConflict, as S3 answers racing conditional writes.
        self.conflicts = conflicts
        self.stats: dict[str, int] = {"connections": 0, "requests": 0, "forwarded": 0, "bytes_down": 0,
                                      **{f: 0 for f in FAULTS}}
        self.events: list[tuple[int, str, str, Optional[str]]] = []
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []
        self._sock: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.port: Optional[int] = None

    # -- configuration
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self.port}"

    def set_rates(self, **rates) -> None:
        """Change ``drop_rate``, ``slowdown_rate``, ``error500_rate``, ``blackhole_rate``,
        ``drop_after`` or ``respond_early``; applies from the next request."""
        allowed = {"drop_rate", "slowdown_rate", "error500_rate", "blackhole_rate", "drop_after",
                   "respond_early", "conflicts"}
        for k, v in rates.items():
            if k not in allowed:
                raise TypeError(f"unknown FaultProxy setting {k!r}")
            setattr(self, k, v)

    def faults_off(self) -> None:
        self.set_rates(drop_rate=0.0, slowdown_rate=0.0, error500_rate=0.0, blackhole_rate=0.0)

    def injected(self) -> int:
        """Faults injected so far, of every kind."""
        return sum(self.stats[f] for f in FAULTS)

    def _decide(self, method: str, target: str, conn: int, conditional: bool = False) -> tuple[Optional[str], int]:
        with self._lock:
            k = self.stats["requests"]
            self.stats["requests"] += 1
            rng = random.Random(f"{self.seed}:{k}")
            u = rng.random()
            fault = None
            if conditional and self.conflicts > 0:
                # S3 answers a conditional write racing another one with 409.
                self.conflicts -= 1
                u, fault = 1.0, "conflict"
            edge = 0.0
            for name, rate in (("drop", self.drop_rate), ("slowdown", self.slowdown_rate),
                               ("error500", self.error500_rate), ("blackhole", self.blackhole_rate)):
                edge += rate
                if u < edge:
                    fault = name
                    break
            lo, hi = self.drop_after
            cut = rng.randint(int(lo), int(hi))
            self.stats[fault or "forwarded"] += 1
            self.events.append((k, method, target, fault))
            return fault, cut

    # -- lifetime
    def start(self) -> "FaultProxy":
        if self._sock is not None:
            return self
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        s.settimeout(0.2)
        self._sock = s
        self.port = s.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accept_thread.start()
        return self

    def _accept_loop(self) -> None:
        sock = self._sock
        while not self._stopping.is_set():
            try:
                client, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():
                    _reset(client)
                    break
                number = self.stats["connections"]
                self.stats["connections"] += 1
                conn = _Conn(self, client, number)
                self._conns.add(conn)
                t = threading.Thread(target=conn.run, name=f"faultproxy-c2s-{number}", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        """Stop accepting, reset every open connection and wait for the threads."""
        if self._sock is None:
            return
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        try:
            self._sock.close()
        except OSError:
            pass
        self._sock = None
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            c.reset()
        for t in threads:
            t.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint if self.port else "not started"
        return (f"FaultProxy({where} -> {self.target_host}:{self.target_port}, seed={self.seed}, "
                f"drop={self.drop_rate}, slowdown={self.slowdown_rate}, error500={self.error500_rate}, "
                f"blackhole={self.blackhole_rate}, stats={self.stats})")
