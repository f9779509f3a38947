"""Parsing checkpoint URLs and keeping their secrets out of every message.

A URL carries three things: the fsspec location, backend options in its query
string (``?endpoint_url=...``), and options ckptstore reads itself
(``commit=rename|marker``). They are separated here, once, so no other module
ever sees a raw URL with credentials in it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

# Query keys ckptstore consumes; everything else goes to the filesystem.
#   commit=rename|marker   force the commit strategy
#   part_size=16MiB        size of one data file of a parallel upload
#   concurrency=8          transfers in flight at once
OWN_KEYS = frozenset({"commit", "part_size", "concurrency"})
COMMIT_CHOICES = ("rename", "marker")
MIN_PART = 1 << 20

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(value: Any) -> int:
    """``16MiB``, ``64MB``, ``1048576`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (write e.g. 16MiB or 16777216)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])

_SECRET_WORDS = (
    "secret", "token", "password", "passwd", "pwd", "key", "credential",
    "signature", "sig", "auth", "sas", "session", "private", "cookie",
)
# Keys that contain a secret word but are not secrets themselves.
_NOT_SECRET = frozenset({"key_prefix", "keyfile_name", "sse_kms_key_id_public"})
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    k = key.lower()
    if k in _NOT_SECRET:
        return False
    return any(w in k for w in _SECRET_WORDS)


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@]*)@")


def redact(uri: str) -> str:
    """``uri`` with passwords in the authority and secret query values hidden."""
    if not isinstance(uri, str):
        uri = os.fspath(uri)
    m = _USERINFO.match(uri)
    if m:
        user = m.group("user")
        name = user.split(":", 1)[0]
        shown = f"{name}:{REDACTED}" if ":" in user else REDACTED
        uri = m.group("scheme") + shown + "@" + uri[m.end():]
    if "?" in uri:
        base, _, query = uri.partition("?")
        parts = []
        for item in query.split("&"):
            k, eq, v = item.partition("=")
            parts.append(f"{k}={REDACTED}" if eq and is_secret_key(k) else item)
        uri = base + "?" + "&".join(parts)
    return uri


def scrub(text: str, secrets: list[str]) -> str:
    """Remove every known secret value from a free-form message."""
    for s in secrets:
        if s and len(s) >= 3:
            text = text.replace(s, REDACTED)
    return text


def _collect_secrets(options: Mapping[str, Any] | None, out: list[str]) -> list[str]:
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            _collect_secrets(v, out)
        elif is_secret_key(str(k)) and isinstance(v, (str, bytes)):
            out.append(v.decode() if isinstance(v, bytes) else v)
    return out


def _coerce(value: str) -> Any:
    """Query values are strings; fsspec options are often bools or numbers."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


@dataclass
class Location:
    """A checkpoint URL taken apart."""

    protocol: str                 # "file", "memory", "s3", ...
    path: str                     # path as the filesystem wants it (no protocol)
    uri: str                      # the URL without query, as the user spelled it
    options: dict = field(default_factory=dict)   # storage options for fsspec
    commit: str | None = None     # forced commit strategy, if any
    secrets: list = field(default_factory=list)
    part_size: int | None = None  # part_size=, if given
    concurrency: int | None = None  # concurrency=, if given

    @property
    def display(self) -> str:
        """The URI safe to print."""
        return scrub(redact(self.uri), self.secrets)

    def parent(self) -> "Location":
        """The directory (or prefix) this one is in: an incremental step's run."""
        path, uri = self.path.rstrip("/"), self.uri.rstrip("/")
        if "/" not in path.lstrip("/") or "/" not in uri.split("://", 1)[-1]:
            raise ValueError(f"{self.display} has no parent directory")
        return Location(self.protocol, path.rsplit("/", 1)[0] or "/", uri.rsplit("/", 1)[0], self.options,
                        self.commit, self.secrets, self.part_size, self.concurrency)

    def child(self, name: str) -> "Location":
        sep = "" if self.path.endswith("/") else "/"
        uri_sep = "" if self.uri.endswith("/") else "/"
        return Location(self.protocol, self.path + sep + name, self.uri + uri_sep + name,
                        self.options, self.commit, self.secrets, self.part_size, self.concurrency)


_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs"})


def parse(uri: Any, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Split ``uri`` into protocol, path, storage options and ckptstore's own options.

    Query parameters merge with ``storage_options``; explicit ``storage_options``
    win on a clash. Raises ``ValueError`` with a redacted message for a bad URL.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"checkpoint URI must be a non-empty string or path, got {type(uri).__name__}")
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ValueError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    options = dict(storage_options or {})
    secrets = _collect_secrets(options, [])
    m = _USERINFO.match(uri)
    if m and ":" in m.group("user"):
        secrets.append(m.group("user").split(":", 1)[1])

    if "://" not in uri:
        # A plain local path. A '?' is a legal character in file names, so
        # only a path without a scheme that exists as typed is left alone.
        protocol = "file"
        base, query = uri, ""
        if "?" in uri and not os.path.exists(uri):
            base, _, query = uri.partition("?")
        path = os.path.abspath(os.path.expanduser(base))
        shown = base
    else:
        split = urlsplit(uri)
        protocol = split.scheme.lower()
        query = split.query
        if not protocol:
            raise ValueError("the URL has no scheme before '://'")
        # urlunsplit drops the '//' of an empty authority ('memory://' -> 'memory:')
        shown = f"{split.scheme}://{split.netloc}{split.path}"
        if protocol in _BUCKETED and not split.netloc:
            raise ValueError(f"a {protocol}:// URL names a bucket first: {protocol}://BUCKET/PATH")
        if protocol in ("file", "local"):
            protocol = "file"
            path = os.path.abspath(os.path.expanduser(split.netloc + split.path))
        else:
            path = None  # resolved by fsspec below

    own: dict = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if is_secret_key(k):
            secrets.append(v)
        if k in OWN_KEYS:
            own[k] = v
        else:
            options.setdefault(k, _coerce(v))

    # ckptstore's own keys may come in storage_options too; explicit options win.
    for k in OWN_KEYS:
        if k in options:
            own[k] = str(options.pop(k))
    commit = own.get("commit")
    if commit is not None and commit not in COMMIT_CHOICES:
        raise ValueError(f"commit= must be one of {', '.join(COMMIT_CHOICES)}, got {commit!r}")
    part_size = concurrency = None
    if "part_size" in own:
        try:
            part_size = parse_size(own["part_size"])
        except ValueError as e:
            raise ValueError(f"part_size= {e}") from None
        if part_size < MIN_PART:
            raise ValueError(f"part_size= must be at least 1MiB, got {own['part_size']!r}")
    if "concurrency" in own:
        try:
            concurrency = int(own["concurrency"])
        except ValueError:
            raise ValueError(f"concurrency= must be a whole number, got {own['concurrency']!r}") from None
        if not 1 <= concurrency <= 256:
            raise ValueError(f"concurrency= must be between 1 and 256, got {concurrency}")

    if path is None:
        # Credentials in the authority are never part of the path (fsspec
        # logs paths); backends that take them from the URL get them as options.
        bare = _USERINFO.sub(lambda m: m.group("scheme"), shown)
        path = bare.split("://", 1)[1]
        try:
            from fsspec.registry import get_filesystem_class
            cls = get_filesystem_class(protocol)
            path = cls._strip_protocol(bare)
            for k, v in cls._get_kwargs_from_urls(shown).items():
                options.setdefault(k, v)
        except (ImportError, ValueError):
            pass  # reported, with an install hint, when the store opens
        if protocol == "memory" and not path.startswith("/"):
            path = "/" + path
    path = path.rstrip("/") or "/"
    return Location(protocol, path, shown, options, commit, secrets, part_size, concurrency)
