"""The one place a URL becomes a store.

``open_store(uri, storage_options)`` parses the URL, picks the backend (local
directories through os calls, everything else through fsspec), and the commit
strategy that is atomic on it. Backend packages are imported only here and
only when a URL needs them, so ``import ckptstore`` stays free of boto and
google libraries.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ..errors import StorageError
from ..url import Location, parse, scrub
from .options import OptionError, check as check_options
from .base import Store

# protocol -> the extra that installs its fsspec implementation
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}

def _fsspec_filesystem(location: Location):
    import fsspec
    from fsspec.registry import known_implementations

    try:
        return fsspec.filesystem(location.protocol, **location.options)
    except ImportError:
        extra = EXTRAS.get(location.protocol)
        hint = (f"pip install 'ckptstore[{extra}]'" if extra else
                known_implementations.get(location.protocol, {}).get("err") or f"install the fsspec backend for {location.protocol}://")
        raise StorageError(f"{location.display}: the {location.protocol}:// backend is not installed: {hint}",
                           location.display) from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise StorageError(f"{location.display}: unknown protocol {location.protocol!r}", location.display) from None
        raise StorageError(f"{location.display}: bad storage options: {type(e).__name__}", location.display) from None
    except TypeError as e:
        # Unknown keyword: name it, never its value.
        raise StorageError(f"{location.display}: bad storage options for {location.protocol}://: "
                           f"{scrub(str(e).split('(')[0], location.secrets)}", location.display) from None
    except Exception as e:  # noqa: BLE001 - a client that cannot be set up, whatever its library raises
        raise StorageError(f"{location.display}: cannot set up the {location.protocol}:// client: "
                           f"{_setup_hint(location, e)}", location.display) from None


def _setup_hint(location: Location, e: BaseException) -> str:
    detail = scrub(f"{type(e).__name__}: {e}", location.secrets)
    token = location.options.get("token")
    if location.protocol in ("gs", "gcs") and isinstance(token, str) and not os.path.exists(token) \
            and token not in ("anon", "google_default", "cache", "cloud", "browser"):
        return ("token= names no file here, so it was taken as a raw OAuth access token, and checking "
                f"it failed ({detail.split('(', 1)[0].strip()}); pass the path of a credentials file, "
                "'google_default', or 'anon'")
    return detail


def open_location(location: Location) -> Store:
    try:
        check_options(location)
    except OptionError as e:
        raise StorageError(f"{location.display}: {e}", location.display) from None
    if location.protocol == "file":
        from .local import LocalStore
        return LocalStore(location)
    if location.protocol in ("s3", "s3a", "gs", "gcs"):
        from .object import GCSStore, S3Store
        cls = S3Store if location.protocol.startswith("s3") else GCSStore
        location = dataclasses.replace(location, options=cls.defaults(location.options))
        store = cls(location, _fsspec_filesystem(location))
        store.open()
        return store
    from .fsspec_store import FsspecStore
    return FsspecStore(location, _fsspec_filesystem(location))


def open_store(uri: Any, storage_options: Mapping[str, Any] | None = None) -> Store:
    """A store for ``uri``; a malformed URL raises StorageError naming it (redacted)."""
    try:
        location = parse(uri, storage_options)
    except ValueError as e:
        from ..url import redact
        shown = redact(str(uri)) if isinstance(uri, (str, os.PathLike)) else repr(type(uri))
        raise StorageError(f"bad checkpoint URL {shown}: {e}", shown) from None
    return open_location(location)
