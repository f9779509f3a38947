"""Any fsspec filesystem: memory://, and the base for object stores.

Nothing here assumes a rename is atomic or that a close is durable beyond
what the backend itself promises; the marker commit strategy is what makes
a checkpoint on such a backend safe.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .base import Entry, Reader, Store, Writer


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created", "last_modified"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=_dt.timezone.utc)
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class _FsspecWriter(Writer):
    def __init__(self, store: "FsspecStore", name: str):
        self.store, self.name = store, name
        self.path = store.join(name)
        with store.errors("create", name):
            self.f = store.fs.open(self.path, "wb")

    def write(self, data: memoryview) -> None:
        with self.store.errors("write", self.name):
            self.f.write(data)

    def close(self) -> None:
        with self.store.errors("write", self.name):
            self.f.close()

    def abort(self) -> None:
        try:
            discard = getattr(self.f, "discard", None)
            if discard is not None:
                discard()  # an object-store upload that was never completed
            else:
                self.f.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.store.remove([self.name])


class _FsspecReader(Reader):
    def __init__(self, store: "FsspecStore", name: str | None):
        self.store, self.name = store, name
        self.path = store.join(name) if name else store.location.path

    def readinto(self, offset: int, buf: memoryview) -> int:
        view = memoryview(buf).cast("B")
        with self.store.errors("read", self.name):
            try:
                data = self.store.attempt(self.store.fs.cat_file, self.path, start=offset, end=offset + len(view))
            except OSError as e:
                # Object stores answer a range that starts at or past the end
                # with an error (HTTP 416) rather than no bytes.
                if isinstance(e, FileNotFoundError) or \
                        offset < int(self.store.attempt(self.store.fs.size, self.path) or 0):
                    raise
                return 0
        n = len(data)
        view[:n] = data
        return n


class FsspecStore(Store):
    atomic_rename = False
    # Data is cut into files of this size and moved several at a time; small
    # enough that part size x concurrency stays a small share of memory.
    part_bytes = 16 << 20
    concurrency = 8

    def __init__(self, location, fs=None):
        super().__init__(location)
        self.fs = fs
        protocol = getattr(fs, "protocol", "")
        # memory:// and file:// through fsspec: nothing to upload
        self.compression_pays = not set([protocol] if isinstance(protocol, str) else protocol) & {
            "memory", "file", "local"}

    def _child_kwargs(self) -> dict:
        return {"fs": self.fs}

    def join(self, name: str) -> str:
        return self.location.path.rstrip("/") + "/" + name

    def _fresh(self) -> None:
        """Drop the filesystem's cached listings: another process may have written since."""
        try:
            self.fs.invalidate_cache(self.location.path)
        except Exception:  # noqa: BLE001 - a cache that cannot be dropped is not an error
            pass

    def list(self):
        self._fresh()
        with self.errors("list"):
            try:
                infos = self.attempt(self.fs.ls, self.location.path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if len(infos) == 1 and infos[0].get("type") == "file" and \
                    infos[0]["name"].rstrip("/") == self.location.path.rstrip("/"):
                return None  # the location is a file, not a directory
            out = {}
            for info in infos:
                if info.get("type") == "file":
                    name = _basename(info["name"])
                    out[name] = Entry(name, int(info.get("size") or 0), _mtime(info))
            return out

    def tree(self):
        # One (paginated) listing of everything below, not one per directory.
        self._fresh()
        base = self.location.path.strip("/") + "/"
        with self.errors("list"):
            try:
                infos = self.attempt(self.fs.find, self.location.path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
        out: dict = {}
        for path, info in infos.items():
            path = path.lstrip("/")
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            if len(parts) != 2 or info.get("type") == "directory":
                continue
            out.setdefault(parts[0], {})[parts[1]] = Entry(parts[1], int(info.get("size") or 0), _mtime(info))
        return out

    def is_file(self) -> bool:
        with self.errors("stat"):
            try:
                return self.attempt(self.fs.isfile, self.location.path)
            except FileNotFoundError:
                return False

    def subdirs(self) -> list[str]:
        self._fresh()
        with self.errors("list"):
            try:
                infos = self.attempt(self.fs.ls, self.location.path, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(_basename(i["name"]) for i in infos if i.get("type") == "directory")

    def makedirs(self) -> None:
        with self.errors("create directory"):
            self.fs.makedirs(self.location.path, exist_ok=True)

    def open_writer(self, name: str, size: int | None = None) -> Writer:
        return _FsspecWriter(self, name)

    def put(self, name: str, data: bytes) -> None:
        with self.errors("write", name):
            self.attempt(self.fs.pipe_file, self.join(name), data)

    def remove(self, names: list[str]) -> None:
        if not names:
            return
        with self.errors("remove"):
            for n in names:
                try:
                    self.attempt(self.fs.rm_file, self.join(n))
                except FileNotFoundError:
                    pass

    def open_reader(self, name: str) -> Reader:
        return _FsspecReader(self, name)

    def get(self, name: str) -> bytes:
        with self.errors("read", name):
            return self.attempt(self.fs.cat_file, self.join(name))

    def open_file(self):
        with self.errors("open"):
            return self.fs.open(self.location.path, "rb")

    def file_reader(self) -> Reader:
        return _FsspecReader(self, None)

    def file_size(self) -> int:
        with self.errors("stat"):
            return int(self.attempt(self.fs.size, self.location.path) or 0)
