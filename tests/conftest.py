"""Shared fixtures: a checkpoint store per backend, and real tmpfs mounts.

Every test that can run on more than one backend takes the `store` fixture,
which is parametrized over local disk (a pytest tmp_path) and fsspec's
in-memory filesystem. Each test gets its own prefix; the memory prefix is
removed afterwards so tests cannot see each other's checkpoints.
"""
from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # make `helpers` importable from every test module
    sys.path.insert(0, str(TESTS_DIR))


@dataclass
class Store:
    """One backend and this test's private prefix on it."""

    kind: str  # "local" or "memory"
    fs: fsspec.AbstractFileSystem
    root: str  # filesystem path of the test's prefix
    uri_root: str  # URI of the same prefix

    def uri(self, name: str = "ckpt") -> str:
        return f"{self.uri_root}/{name}"

    def path(self, name: str = "ckpt") -> str:
        return f"{self.root}/{name}"

    def files(self) -> list[str]:
        """Every file under the test's prefix (the checkpoint and anything beside it)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(self.fs.find(self.root))

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def size_of_everything(self) -> int:
        return sum(self.fs.size(p) for p in self.files())

    def uri_text(self, name: str = "ckpt") -> str:
        """The part of the URI an error message must show (scheme spelling may vary)."""
        return self.uri(name).split("://", 1)[-1].lstrip("/")


def _local_store(tmp_path: Path) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    return Store("local", fsspec.filesystem("file"), str(root), str(root))


def _memory_store():
    prefix = f"ckptstore-tests/{uuid.uuid4().hex}"
    return Store("memory", fsspec.filesystem("memory"), f"/{prefix}", f"memory://{prefix}")


def _clear_memory(store: Store) -> None:
    fs = store.fs
    for key in [k for k in list(fs.store) if k.startswith(store.root + "/") or k == store.root]:
        del fs.store[key]
    for d in [d for d in list(fs.pseudo_dirs) if d.startswith(store.root.lstrip("/")) or d.startswith(store.root)]:
        fs.pseudo_dirs.remove(d)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    """A private prefix on local disk or on memory://, one test run per backend."""
    if request.param == "local":
        yield _local_store(tmp_path)
    else:
        s = _memory_store()
        try:
            yield s
        finally:
            _clear_memory(s)


@pytest.fixture
def local_store(tmp_path):
    return _local_store(tmp_path)


@pytest.fixture
def memory_store():
    s = _memory_store()
    try:
        yield s
    finally:
        _clear_memory(s)


@pytest.fixture(scope="module")
def writers():
    """A warm fork server of crash-test writer processes (helpers/save_loop.py)."""
    from helpers.crash import WriterServer

    server = WriterServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, *options) -> Path of a fresh tmpfs; unmounted afterwards.

    A failing mount fails the test: these behaviours must be checked, not skipped.
    """
    mounted: list[Path] = []

    def mount(name: str, *options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        cmd = ["mount", "-t", "tmpfs"]
        if options:
            cmd += ["-o", ",".join(options)]
        cmd += ["tmpfs", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"could not mount tmpfs at {target}: {done.stderr.strip()}"
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
