"""Object stores: S3 (s3fs) and GCS (gcsfs).

What they add to the generic fsspec store:

- every data file is one object written by one PUT, so the parts of a save
  go up in parallel and each carries its own checksum (S3: the CRC-32C is
  sent with the object and the service checks it on receipt; GCS computes
  the object's CRC-32C itself). The checksum the service reports for what it
  stored is what the save's verifier compares, instead of downloading it;
- an exclusive create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``);
- no "directories" to create: a missing bucket is reported, never created;
- timeouts and retry limits that turn an unreachable endpoint into an error
  in seconds, and errors that say what is wrong (no credentials, access
  denied, no such bucket) and what to do about it.
"""

from __future__ import annotations

import base64
import bisect
import io
import json
import os
import random
import socket
import time
import threading
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from ..errors import StorageError
from ..url import Location
from .fsspec_store import FsspecStore

# Seconds to wait for a TCP connection before calling an endpoint unreachable.
CONNECT_TIMEOUT = 5
# Seconds a first request may go unanswered before the endpoint is called unreachable.
PROBE_TIMEOUT = 10


def crc_from_b64(value) -> int | None:
    """A CRC-32C as S3 and GCS report it (base64 of 4 big-endian bytes)."""
    if not value or not isinstance(value, (str, bytes)):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


def crc_to_b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _chain(e: BaseException):
    """``e`` and the exceptions it was raised from."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_reachable: set = set()
_reach_lock = threading.Lock()


def check_reachable(location: Location, endpoint: str | None, default: str | None) -> None:
    """Fail within seconds, naming the URI, when the endpoint does not answer HTTP.

    The clients would otherwise retry a refused or silent endpoint with
    backoff for minutes. One HEAD request, answered with any status, proves
    the endpoint alive; checked once per endpoint and process, and skipped
    when a proxy stands between us and the endpoint.
    """
    target = endpoint or default or ""
    if target and "://" not in target:
        target = "http://" + target     # STORAGE_EMULATOR_HOST may be host:port
    try:
        u = urlsplit(target)
        given_port = u.port
    except ValueError as e:
        raise StorageError(f"{location.display}: the endpoint URL is malformed ({e})", location.display) from None
    if not u.hostname:
        return
    scheme = u.scheme or "http"
    host, port = u.hostname, given_port or (443 if scheme == "https" else 80)
    if (scheme, host, port) in _reachable:
        return
    if getproxies().get(scheme) and not proxy_bypass(host):
        return
    import http.client
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    shown = f"{scheme}://{host}:{port}"
    conn = None
    try:
        conn = cls(host, port, timeout=PROBE_TIMEOUT)
        conn.request("HEAD", "/")
        conn.getresponse().read()
    except (OSError, ValueError, http.client.HTTPException) as e:
        if isinstance(e, (socket.timeout, TimeoutError)):
            why = f"no answer within {PROBE_TIMEOUT:g} s"
        else:
            why = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        raise StorageError(
            f"{location.display}: cannot reach {shown} ({why}); check the endpoint URL and that "
            "the service is up and reachable from here", location.display) from None
    finally:
        if conn is not None:
            conn.close()
    with _reach_lock:
        _reachable.add((scheme, host, port))


class PiecesFile(io.RawIOBase):
    """A read-only, seekable file over a list of buffers, read in place.

    HTTP clients take bytes or files, not memoryviews, and a bytes body is
    copied again on its way to the socket. This uploads tensor memory
    without any copy, and rewinds for a retry.
    """

    def __init__(self, pieces):
        super().__init__()
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.starts = []
        pos = 0
        for p in self.pieces:
            self.starts.append(pos)
            pos += len(p)
        self.size = pos
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        done = 0
        while done < len(out) and self.pos < self.size:
            i = bisect.bisect_right(self.starts, self.pos) - 1
            piece = self.pieces[i]
            off = self.pos - self.starts[i]
            n = min(len(out) - done, len(piece) - off)
            out[done:done + n] = piece[off:off + n]
            done += n
            self.pos += n
        return done

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return self.size


def _slices_payload(pieces, size: int):
    """An aiohttp body that writes ``pieces`` in slices of at most 1 MiB, each
    drained before the next.

    A whole-buffer body makes the event loop's transport copy what the
    socket cannot take at once: a second copy of every part in flight.
    Each (re)send starts from the beginning, so retries work.
    """
    from aiohttp.payload import Payload

    class SlicedPayload(Payload):
        @property
        def size(self) -> int:
            return size

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            raise TypeError("binary upload body")

        async def write(self, writer) -> None:
            for piece in self._value:
                view = memoryview(piece).cast("B")
                for o in range(0, len(view), 1 << 20):
                    await writer.write(view[o:o + (1 << 20)])

        async def write_with_length(self, writer, content_length) -> None:
            await self.write(writer)

    return SlicedPayload(list(pieces))


class ObjectStore(FsspecStore):
    immutable_files = True
    concurrency = 4
    #: retries on top of the client library's own, for failures transient() accepts
    RETRIES = 0
    # An HTTP client holds a range answer twice on its way into tensor memory
    # (the body as read, then joined): 4 MiB x 4 in flight stays near 32 MiB.
    read_bytes = 4 << 20

    def makedirs(self) -> None:
        pass  # prefixes need no creating; a missing bucket is an error, never created

    def remove(self, names: list[str]) -> None:
        # One batch request per 1000 names; deleting a missing key is no error.
        if not names:
            return
        with self.errors("remove"):
            self.attempt(self.fs.rm, [self.join(n) for n in names])

    def transient(self, e: BaseException) -> bool:
        return False

    def attempt(self, fn, *args, **kwargs):
        for i in range(self.RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised unless transient
                if i == self.RETRIES or not self.transient(e):
                    raise
                time.sleep(min(4.0, 0.5 * 2 ** i) * (0.5 + random.random()))

    def not_found_hint(self) -> str:
        return " (the bucket does not exist)" if self._bucket_missing() else ""

    def _bucket_missing(self) -> bool:
        bucket = self.location.path.split("/", 1)[0]
        try:
            return not self.attempt(self.fs.exists, bucket)
        except Exception:  # noqa: BLE001 - only used to explain another error
            return False

    def missing_bucket_error(self, e: BaseException, action: str, where: str) -> StorageError | None:
        """A write that finds nothing where the bucket should be: say so."""
        if action in ("write", "create") and any(isinstance(x, FileNotFoundError) for x in _chain(e)) \
                and self._bucket_missing():
            return StorageError(
                f"{action} {where}: the bucket does not exist; create it first or fix the URL "
                "(ckptstore never creates buckets)", self.uri)
        return None


class S3Store(ObjectStore):
    """s3:// through s3fs."""

    RETRIES = 2

    def transient(self, e: BaseException) -> bool:
        """Throttling, 5xx and dropped connections; not timeouts (a silent
        endpoint must fail fast) and not answers that will not change."""
        for x in _chain(e):
            name = type(x).__name__
            if name in ("ReadTimeoutError", "ConnectTimeoutError", "TimeoutError", "NoCredentialsError"):
                return False
            if name in ("EndpointConnectionError", "ConnectionClosedError", "ServerDisconnectedError",
                        "ClientOSError", "ClientPayloadError", "ResponseStreamingError", "IncompleteRead"):
                return True
            code = _s3_code(x)
            if code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                        "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"):
                return True
        return False

    @staticmethod
    def defaults(options: dict) -> dict:
        """s3fs options with timeouts and bounded retries, the caller's own taking precedence."""
        out = dict(options)
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        # Seconds without a byte of the answer once a request is sent (an
        # upload in progress does not count): a silent endpoint fails in
        # max_attempts x this, not minutes.
        config.setdefault("read_timeout", 4)
        # botocore's standard mode retries throttling (503 SlowDown), 5xx,
        # timeouts and dropped connections with exponential backoff and jitter;
        # transient() below adds two more tries for all but timeouts.
        config.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
        # We send a CRC-32C with every object; no second checksum is needed.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        out["config_kwargs"] = config
        return out

    def open(self) -> None:
        # s3fs retries on top of botocore; the product of both would hold a
        # dead endpoint for minutes. attempt() retries what is worth it.
        self.fs.retries = 1
        check_reachable(self.location, self.location.options.get("endpoint_url")
                        or (self.location.options.get("client_kwargs") or {}).get("endpoint_url")
                        or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), None)

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.join(name))
        return bucket, key

    def _put(self, name: str, pieces: list, crc: int | None, **kw) -> dict:
        import crc32c
        if crc is None:
            crc = 0
            for piece in pieces:
                crc = crc32c.crc32c(piece, crc)
        body = PiecesFile(pieces)
        # chunksize past the size: always one PUT, whatever the part size.
        return self.fs.pipe_file(self.join(name), body, chunksize=len(body) + 1,
                                 ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc_to_b64(crc), **kw) or {}

    def put_part(self, name: str, pieces: list, crc: int) -> int | None:
        with self.errors("write", name):
            out = self.attempt(self._put, name, pieces, crc)
        return crc_from_b64(out.get("ChecksumCRC32C")) if isinstance(out, dict) else None

    def put(self, name: str, data: bytes) -> None:
        with self.errors("write", name):
            self.attempt(self._put, name, [data], None)

    #: tries of a conditional PUT that S3 answers 409 ConditionalRequestConflict
    CONFLICT_TRIES = 6

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """One PUT with ``If-None-Match: *``: True if it created ``name``, False if it exists.

        S3 answers 412 when the object exists, and 409 ConditionalRequestConflict
        when another conditional write to the same key is in flight; AWS's
        advice for the latter is to retry, and the retry meets 412 (the other
        writer won) or succeeds (it gave up). A conflict that outlasts the
        retries is a loss too: someone else is creating the object.
        """
        with self.errors("create", name):
            for i in range(self.CONFLICT_TRIES):
                try:
                    self._put(name, [data], None, mode="create")
                    return True
                except Exception as e:  # noqa: BLE001 - sorted below
                    codes = [_s3_code(x) for x in _chain(e)]
                    if any(isinstance(x, FileExistsError) for x in _chain(e)) or \
                            "PreconditionFailed" in codes or "412" in codes:
                        return False
                    if "ConditionalRequestConflict" not in codes and "409" not in codes:
                        raise
                if i < self.CONFLICT_TRIES - 1:
                    time.sleep(0.05 * 2 ** i * (0.5 + random.random()))
            return False

    def is_file(self) -> bool:
        # s3fs's isfile() answers False for any failure, a timeout included.
        bucket, _, key = self.location.path.partition("/")
        if not key:
            return False
        with self.errors("stat"):
            try:
                self.attempt(self.fs.call_s3, "head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return False
            except PermissionError:
                # An answer to HEAD has no body, so a 403 cannot say whether the
                # key was refused or lacks permission; the listing that follows
                # gets an answer that does.
                return False
        return True

    def reported_crc32c(self, name: str) -> int | None:
        bucket, key = self._bucket_key(name)
        with self.errors("stat", name):
            head = self.attempt(self.fs.call_s3, "head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        value = head.get("ChecksumCRC32C")
        if not value or "-" in str(value):   # a multipart object's checksum is of its parts
            return None
        return crc_from_b64(value)

    def explain(self, e: BaseException, action: str, where: str) -> StorageError | None:
        for x in _chain(e):
            name = type(x).__name__
            code = _s3_code(x)
            if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                return StorageError(
                    f"{action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), pass storage_options={'key': ..., "
                    "'secret': ...}, or anon=True for a public bucket", self.uri)
            if code == "NoSuchBucket":
                return StorageError(
                    f"{action} {where}: the bucket does not exist; create it first or fix the URL "
                    "(ckptstore never creates buckets)", self.uri)
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "TokenRefreshRequired"):
                return StorageError(
                    f"{action} {where}: the AWS credentials were refused ({code}); check the access "
                    "key, secret and session token", self.uri)
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return StorageError(
                    f"{action} {where}: access denied (403); the credentials in use lack permission "
                    "for this bucket or prefix (s3:GetObject, s3:PutObject, s3:ListBucket, "
                    "s3:DeleteObject are needed)", self.uri, errno=13)
            if name in ("ConnectTimeoutError", "ReadTimeoutError"):
                return StorageError(
                    f"{action} {where}: the S3 endpoint did not answer in time ({name}), retries "
                    "included; check the endpoint URL and the network", self.uri)
            if name in ("EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError",
                        "ServerDisconnectedError", "ClientOSError"):
                return StorageError(
                    f"{action} {where}: the connection to the S3 endpoint kept failing ({name}), "
                    "retries included; check the endpoint URL and the network", self.uri)
        return None


def _s3_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = err.get("Code")
        if code:
            return str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return str(status) if status else None
    return None


class EndpointSilent(TimeoutError):
    """An operation outlived its deadline, the client's own retries included."""


def _moved(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes a filesystem call sends or receives, as far as its arguments tell."""
    if name == "pipe_file" and len(args) > 1:
        try:
            return len(args[1])
        except TypeError:
            return 0
    if name == "cat_file":
        start, end = kwargs.get("start"), kwargs.get("end")
        if isinstance(start, int) and isinstance(end, int):
            return max(0, end - start)
    return 0


class GCSStore(ObjectStore):
    """gs:// through gcsfs.

    gcsfs retries a request that times out six times with backoff (fixed
    when its class is defined): a silent endpoint would hold a call for about
    90 s. Every call here instead runs under its own deadline, DEADLINE_S
    plus one second per DEADLINE_RATE bytes it moves, retries included.
    """

    DEADLINE_S = 20.0
    DEADLINE_RATE = 1 << 20      # bytes per second a transfer is allowed to take at the slowest

    @staticmethod
    def defaults(options: dict) -> dict:
        out = dict(options)
        # gRPC bucket probing (zonal buckets) waits a minute against anything
        # but the real service; plain JSON API is all we need.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # A request whose answer stops coming is abandoned (and retried by
        # gcsfs) after this many seconds without a byte; uploads in progress
        # do not count.
        import aiohttp
        session = dict(out.get("session_kwargs") or {})
        session.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=10))
        out["session_kwargs"] = session
        return out

    def open(self) -> None:
        endpoint = self.location.options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        check_reachable(self.location, endpoint, "https://storage.googleapis.com")

    def attempt(self, fn, *args, **kwargs):
        # fs.ls and the like are sync wrappers fsspec made of the coroutines fs._ls, ...
        name = getattr(fn, "__name__", "").lstrip("_")
        run = getattr(self.fs, "_" + name, None) if name and getattr(self.fs, name, None) == fn else None
        if run is None:
            return super().attempt(fn, *args, **kwargs)
        return self.within_deadline(lambda: run(*args, **kwargs), _moved(name, args, kwargs))

    def within_deadline(self, make, nbytes: int = 0):
        """Run the coroutine ``make()`` on gcsfs's loop, cancelled once past its deadline."""
        import asyncio
        from fsspec.asyn import sync
        limit = self.DEADLINE_S + nbytes / self.DEADLINE_RATE
        t0 = time.monotonic()

        async def bounded():
            return await asyncio.wait_for(make(), limit)

        try:
            return sync(self.fs.loop, bounded)
        except TimeoutError:
            if time.monotonic() - t0 < limit:
                raise               # a timeout of the request itself, before the deadline
            raise EndpointSilent(f"no answer within {limit:.0f} s, retries included") from None

    def put_part(self, name: str, pieces: list, crc: int) -> int | None:
        """One resumable upload: a request that opens it, one with the raw bytes.

        The bytes go out in 1 MiB slices, so the HTTP stack never buffers
        more than that per part, and straight from tensor memory. (The
        one-request multipart form wraps the bytes in a MIME body, which the
        GCS emulator parses line by line and eats a final carriage return of;
        the checksum check caught exactly that.) GCS answers with its CRC-32C
        of the object it stored.
        """
        n = sum(len(p) for p in pieces)
        if n == 0:
            with self.errors("write", name):
                self.attempt(self.fs.pipe_file, self.join(name), b"")
            return self.reported_crc32c(name)
        from gcsfs.core import initiate_upload

        bucket, key, _ = self.fs.split_path(self.join(name))
        payload = _slices_payload(pieces, n)

        async def upload():
            location = await initiate_upload(self.fs, bucket, key, "application/octet-stream")
            head = {"Content-Range": f"bytes 0-{n - 1}/{n}", "Content-Type": "application/octet-stream",
                    "Content-Length": str(n)}
            _, text = await self.fs._call("POST", location, headers=head, data=payload)
            return text

        with self.errors("write", name):
            text = self.within_deadline(upload, n)
        try:
            return crc_from_b64(json.loads(text).get("crc32c")) if text else self.reported_crc32c(name)
        except ValueError:
            return self.reported_crc32c(name)

    def is_file(self) -> bool:
        # fsspec's own _isfile() (before 2026.1) has a bare except that also
        # swallows the cancellation of the deadline: a silent endpoint would
        # answer False after one deadline and the caller would wait out another.
        path = self.location.path

        async def isfile():
            try:
                return (await self.fs._info(path))["type"] == "file"
            except Exception:  # noqa: BLE001 - fsspec's isfile(): any failure is "not a file"
                return False

        with self.errors("stat"):
            return self.within_deadline(isfile)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        with self.errors("create", name):
            try:
                self.attempt(self.fs.pipe_file, self.join(name), data, mode="create")
            except FileExistsError:
                return False
        return True

    def reported_crc32c(self, name: str) -> int | None:
        with self.errors("stat", name):
            info = self.attempt(self.fs.info, self.join(name))
        return crc_from_b64(info.get("crc32c"))

    def explain(self, e: BaseException, action: str, where: str) -> StorageError | None:
        missing = self.missing_bucket_error(e, action, where)
        if missing is not None:
            return missing
        for x in _chain(e):
            if isinstance(x, EndpointSilent):
                return StorageError(
                    f"{action} {where}: the GCS endpoint stopped answering ({x}); check the endpoint "
                    "URL and the network", self.uri)
            text = str(x)
            code = getattr(x, "code", None)
            name = type(x).__name__
            if name in ("DefaultCredentialsError", "RefreshError") or code == 401:
                return StorageError(
                    f"{action} {where}: no usable Google Cloud credentials; run `gcloud auth "
                    "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or pass "
                    "storage_options={'token': ...} (token='anon' for public buckets)", self.uri)
            if text.startswith("Forbidden") or code == 403:
                return StorageError(
                    f"{action} {where}: access denied (403); the credentials in use lack permission for "
                    "this bucket (storage.objects.create/get/list/delete are needed)", self.uri, errno=13)
            if code == 404 and "bucket" in text.lower():
                return StorageError(
                    f"{action} {where}: the bucket does not exist; create it first or fix the URL "
                    "(ckptstore never creates buckets)", self.uri)
            if name in ("ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError",
                        "TimeoutError"):
                return StorageError(
                    f"{action} {where}: the GCS endpoint did not answer ({name}); check the endpoint "
                    "URL and the network", self.uri)
        return None
