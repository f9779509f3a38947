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
import io
import os
import socket
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
    u = urlsplit(target)
    if not u.hostname:
        return
    scheme = u.scheme or "http"
    host, port = u.hostname, u.port or (443 if scheme == "https" else 80)
    if (scheme, host, port) in _reachable:
        return
    if getproxies().get(scheme) and not proxy_bypass(host):
        return
    import http.client
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=PROBE_TIMEOUT)
    shown = f"{scheme}://{host}:{port}"
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, (socket.timeout, TimeoutError)):
            why = f"no answer within {PROBE_TIMEOUT:g} s"
        else:
            why = f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        raise StorageError(
            f"{location.display}: cannot reach {shown} ({why}); check the endpoint URL and that "
            "the service is up and reachable from here", location.display) from None
    finally:
        conn.close()
    with _reach_lock:
        _reachable.add((scheme, host, port))


class ViewFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview: uploads a tensor's memory
    without copying it (HTTP clients take bytes or files, not memoryviews)."""

    def __init__(self, view):
        super().__init__()
        self.view = memoryview(view).cast("B")
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.view) - self.pos)
        if n <= 0:
            return 0
        memoryview(b).cast("B")[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos:end])
        self.pos = max(self.pos, end)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return len(self.view)


def as_body(data):
    """bytes stay bytes; a memoryview becomes a file over the same memory."""
    return data if isinstance(data, (bytes, bytearray)) else ViewFile(data)


class ObjectStore(FsspecStore):
    immutable_files = True

    def makedirs(self) -> None:
        pass  # prefixes need no creating; a missing bucket is an error, never created

    def _path(self, name: str) -> str:
        return self.join(name)

    def not_found_hint(self) -> str:
        return " (the bucket does not exist)" if self._bucket_missing() else ""

    def _bucket_missing(self) -> bool:
        bucket = self.location.path.split("/", 1)[0]
        try:
            return not self.fs.exists(bucket)
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

    @staticmethod
    def defaults(options: dict) -> dict:
        """s3fs options with timeouts and bounded retries, the caller's own taking precedence."""
        out = dict(options)
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        config.setdefault("read_timeout", 60)
        # botocore's standard mode retries throttling (503 SlowDown), 5xx and
        # dropped connections with exponential backoff and jitter.
        config.setdefault("retries", {"max_attempts": 5, "mode": "standard"})
        # We send a CRC-32C with every object; no second checksum is needed.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        out["config_kwargs"] = config
        return out

    def open(self) -> None:
        # s3fs retries on top of botocore; botocore's standard mode is enough,
        # and the product of both would hold a dead endpoint for minutes.
        if getattr(self.fs, "retries", 1) > 2:
            self.fs.retries = 2
        check_reachable(self.location, self.location.options.get("endpoint_url")
                        or (self.location.options.get("client_kwargs") or {}).get("endpoint_url")
                        or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"), None)

    def _bucket_key(self, name: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self._path(name))
        return bucket, key

    def _put(self, name: str, data, crc: int, **kw) -> dict:
        import crc32c
        if crc is None:
            crc = crc32c.crc32c(data)
        # chunksize past the size: always one PUT, whatever the part size.
        return self.fs.pipe_file(self._path(name), as_body(data), chunksize=len(data) + 1,
                                 ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc_to_b64(crc), **kw) or {}

    def put_part(self, name: str, data, crc: int) -> int | None:
        with self.errors("write", name):
            out = self._put(name, data, crc)
        return crc_from_b64(out.get("ChecksumCRC32C")) if isinstance(out, dict) else None

    def put(self, name: str, data: bytes) -> None:
        with self.errors("write", name):
            self._put(name, data, None)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        try:
            with self.errors("create", name):
                try:
                    self._put(name, data, None, mode="create")
                except Exception as e:  # noqa: BLE001 - sorted below
                    if any(isinstance(x, FileExistsError) or _s3_code(x) in ("PreconditionFailed", "412")
                           for x in _chain(e)):
                        return False
                    raise
        except StorageError:
            raise
        return True

    def reported_crc32c(self, name: str) -> int | None:
        bucket, key = self._bucket_key(name)
        with self.errors("stat", name):
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
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
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                        "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError"):
                return StorageError(
                    f"{action} {where}: the S3 endpoint did not answer ({name}); check the endpoint URL "
                    "and the network", self.uri)
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


class GCSStore(ObjectStore):
    """gs:// through gcsfs."""

    @staticmethod
    def defaults(options: dict) -> dict:
        out = dict(options)
        # gRPC bucket probing (zonal buckets) waits a minute against anything
        # but the real service; plain JSON API is all we need.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # A request that hangs is abandoned (and retried) after this many seconds.
        out.setdefault("requests_timeout", 120)
        return out

    def open(self) -> None:
        endpoint = self.location.options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        check_reachable(self.location, endpoint, "https://storage.googleapis.com")

    def put_part(self, name: str, data, crc: int) -> int | None:
        # A resumable upload sends the bytes as they are, in one request after
        # the one that opens it. (The one-request multipart upload wraps them
        # in a MIME body, which the GCS emulator parses line by line, eating a
        # final carriage return; the checksum check caught exactly that.)
        with self.errors("write", name):
            self.fs.pipe_file(self._path(name), data, chunksize=max(len(data), 1))
        return self.reported_crc32c(name)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        with self.errors("create", name):
            try:
                self.fs.pipe_file(self._path(name), data, mode="create")
            except FileExistsError:
                return False
        return True

    def reported_crc32c(self, name: str) -> int | None:
        with self.errors("stat", name):
            info = self.fs.info(self._path(name))
        return crc_from_b64(info.get("crc32c"))

    def explain(self, e: BaseException, action: str, where: str) -> StorageError | None:
        missing = self.missing_bucket_error(e, action, where)
        if missing is not None:
            return missing
        for x in _chain(e):
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
