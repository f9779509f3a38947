"""Storage options checked before any backend library sees them.

A misspelt option (``endpoint_ur``) is silently dropped by some clients and
a wrong type (``key=5``, ``config_kwargs=5``) fails deep inside them with a
message about ``.copy`` or ``.split``. Both are caught here, naming the
option and what it must be, never its value (it may be a secret).

Names are checked for the backends whose options we know: local paths take
none, ``memory://`` takes fsspec's generic ones, ``s3://`` and ``gs://`` the
parameters of the installed s3fs/gcsfs constructors (read from their
signatures, so a newer client's new options are accepted) and what they
forward. Types are checked for the options whose wrong type would otherwise
fail obscurely. Other fsspec protocols are passed through unchecked.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import re
from collections.abc import Mapping
from typing import Any, Callable

from ..url import Location

# Options AbstractFileSystem and its instance cache take from any backend.
_FSSPEC_BASE = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache",
                          "asynchronous", "loop", "batch_size"})
# s3fs hands options it does not name to aiobotocore's AioSession.
_AIOSESSION = frozenset({"session_vars", "event_hooks", "include_builtin_handlers", "profile"})

_URL = re.compile(r"https?://[^\s/?#@]+(:\d+)?(/[^\s]*)?", re.IGNORECASE)


class OptionError(ValueError):
    """A storage option that cannot work; the message names it, never its value."""


# ---------------------------------------------------------------- checks of one value

def _text(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, str):
        raise OptionError(f"{name}= must be a string, got {type(v).__name__}")


def _flag(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, bool):
        raise OptionError(f"{name}= must be true or false, got {_shown(v)}")


def _mapping(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, Mapping):
        raise OptionError(f"{name}= must be a dict, got {type(v).__name__}")
    for k in (v or {}):
        if not isinstance(k, str):
            raise OptionError(f"{name}= must have string keys, got a {type(k).__name__} key")


def _count(name: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise OptionError(f"{name}= must be a positive whole number, got {_shown(v)}")


def _seconds(name: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0):
        raise OptionError(f"{name}= must be a number of seconds, got {_shown(v)}")


def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if v is not None and v not in allowed:
            raise OptionError(f"{name}= must be one of {', '.join(allowed)}, got {_shown(v)}")
    return check


def endpoint(name: str, v: Any) -> None:
    if v is None:
        return
    if not isinstance(v, str):
        raise OptionError(f"{name}= must be a URL string like http://host:port, got {type(v).__name__}")
    if not _URL.fullmatch(v.strip()) or v != v.strip():
        raise OptionError(f"{name}= must be an http:// or https:// URL with a host, like "
                          f"http://127.0.0.1:9000, got {v!r}")


def _shown(v: Any) -> str:
    """A value safe to show: non-secret options only, and short."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------- per backend

def _s3_client_kwargs(name: str, v: Any) -> None:
    _mapping(name, v)
    for k in ("endpoint_url",):
        if k in (v or {}):
            endpoint(f"{name}['{k}']", v[k])
    for k in ("region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        if k in (v or {}):
            _text(f"{name}['{k}']", v[k])


def _s3_config_kwargs(name: str, v: Any) -> None:
    _mapping(name, v)
    if not v:
        return
    if v.get("retries") is not None:
        _mapping(f"{name}['retries']", v["retries"])
    try:
        from botocore.config import Config
        Config(**v)
    except ImportError:
        return
    except (TypeError, ValueError, AttributeError) as e:
        raise OptionError(f"{name}= is not a valid botocore Config: {e}") from None


def _s3_session(name: str, v: Any) -> None:
    if v is not None and not callable(getattr(v, "create_client", None)):
        raise OptionError(f"{name}= must be an aiobotocore AioSession, got {type(v).__name__}")


def _gcs_session_kwargs(name: str, v: Any) -> None:
    _mapping(name, v)
    timeout = (v or {}).get("timeout")
    if timeout is not None:
        try:
            from aiohttp import ClientTimeout
        except ImportError:
            return
        if not isinstance(timeout, ClientTimeout):
            raise OptionError(f"{name}['timeout']= must be an aiohttp.ClientTimeout, got {type(timeout).__name__}")


S3_TYPES: dict[str, Callable[[str, Any], None]] = {
    "key": _text, "secret": _text, "token": _text, "username": _text, "password": _text, "profile": _text,
    "endpoint_url": endpoint,
    "anon": _flag, "use_ssl": _flag, "version_aware": _flag, "requester_pays": _flag, "cache_regions": _flag,
    "fixed_upload_size": _flag, "default_fill_cache": _flag, "use_listings_cache": _flag,
    "skip_instance_cache": _flag,
    "client_kwargs": _s3_client_kwargs, "config_kwargs": _s3_config_kwargs, "s3_additional_kwargs": _mapping,
    "default_block_size": _count, "max_concurrency": _count, "listings_expiry_time": _seconds,
    "default_cache_type": _text, "session": _s3_session,
}


_TOKEN_METHODS = ("anon", "google_default", "cache", "cloud", "browser")


def gcs_token(name: str, v: Any) -> None:
    """gcsfs's ``token``: None, a method name, a file path, a raw access token, a dict or a Credentials."""
    if v is None or isinstance(v, str):
        return
    if isinstance(v, (bool, numbers.Number, list, tuple, bytes)):
        raise OptionError(f"{name}= must be a file path, one of {', '.join(_TOKEN_METHODS)}, a credentials "
                          f"dict or a google.auth Credentials object, got {type(v).__name__}")
    if isinstance(v, Mapping):
        if v.get("type") == "service_account":
            need = ("private_key", "client_email", "token_uri")
            kind = "a service-account"
        else:
            need = ("refresh_token", "client_id", "client_secret")
            kind = "an authorized-user"
        missing = [k for k in need if not isinstance(v.get(k), str) or not v.get(k)]
        if missing:
            raise OptionError(
                f"{name}= dict is not {kind} credential: it lacks {', '.join(repr(m) for m in missing)} "
                "(a service-account key file's contents, or application-default credentials, are what "
                "gcsfs accepts)")


GCS_TYPES: dict[str, Callable[[str, Any], None]] = {
    "token": gcs_token, "project": _text, "endpoint_url": endpoint, "default_location": _text,
    "access": _choice("read_only", "read_write", "full_control"),
    "consistency": _choice("none", "size", "md5", "crc32c"),
    "session_kwargs": _gcs_session_kwargs, "requests_timeout": _seconds, "cache_timeout": _seconds, "timeout": _seconds,
    "block_size": _count, "version_aware": _flag, "secure_serialize": _flag, "check_connection": _flag,
    "use_listings_cache": _flag, "skip_instance_cache": _flag, "listings_expiry_time": _seconds,
}


def _constructor_names(protocol: str) -> frozenset:
    """The keyword parameters of the fsspec class for ``protocol`` and its bases."""
    from fsspec.registry import get_filesystem_class
    names: set = set()
    for klass in get_filesystem_class(protocol).__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names.discard("self")
    return frozenset(names)


def check(location: Location) -> None:
    """Raise OptionError for an option ``location``'s backend cannot use."""
    options = location.options
    protocol = location.protocol
    if protocol == "file":
        if options:
            raise OptionError(f"local paths take no storage options, got {_names(options)}")
        return
    if protocol in ("s3", "s3a", "gs", "gcs"):
        known = _known(protocol)
        if known is None:
            return      # the backend is missing: reported, with an install hint, when the store opens
        s3 = protocol.startswith("s3")
        known |= _FSSPEC_BASE | (_AIOSESSION if s3 else frozenset())
        types = S3_TYPES if s3 else GCS_TYPES
    elif protocol == "memory":
        known, types = _FSSPEC_BASE, {}
    else:
        return
    for name in options:
        if not isinstance(name, str):
            raise OptionError(f"storage option names must be strings, got a {type(name).__name__}")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"unknown storage option {name!r} for {protocol}://{hint}")
        if name in types:
            types[name](name, options[name])


def _known(protocol: str) -> frozenset | None:
    try:
        return _constructor_names(protocol)
    except (ImportError, ValueError):
        return None


def _names(options: Mapping) -> str:
    return ", ".join(repr(k) for k in options)
