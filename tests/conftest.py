"""Shared fixtures: a checkpoint store per backend, and real tmpfs mounts.

Every test that can run on more than one backend takes the `store` fixture,
which is parametrized over local disk (a pytest tmp_path), fsspec's in-memory
filesystem, S3 (a moto server), GCS (gcp-storage-emulator) and a Drive-like
FUSE mount (rclone with a write-back cache). The servers and the mount are
real processes on loopback, started once per session and only when a test
needs them (helpers/backends.py). Each test gets its own prefix, removed
afterwards, so tests cannot see each other's checkpoints.

A backend that cannot start fails the tests that need it; nothing is skipped.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # make `helpers` importable from every test module
    sys.path.insert(0, str(TESTS_DIR))

# Imported before anything imports gcsfs: it sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
from helpers.backends import DEFAULT_BUCKET, FakeGcsServer, GcsEmulator, MotoServer, RcloneMount  # noqa: E402

BUCKET = DEFAULT_BUCKET  # "ckptstore-tests", on both moto and the GCS emulator

# Hypothesis keeps its example database and caches in ./.hypothesis by default: the suite
# writes nothing into the directory it runs from.
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ckptstore-hypothesis")


@dataclass
class Store:
    """One backend and this test's private prefix on it."""

    kind: str  # "local", "memory", "s3", "gcs" or "fuse"
    fs: fsspec.AbstractFileSystem
    root: str  # filesystem path of the test's prefix ("ckptstore-tests/<uuid>" on s3/gcs: no leading slash)
    uri_root: str  # URI of the same prefix
    query: str = ""  # storage options as a URL query ("?endpoint_url=...&key=...") for s3/gcs
    backend: Any = None  # the MotoServer, GcsEmulator or RcloneMount behind it, if any

    def uri(self, name: str = "ckpt") -> str:
        return f"{self.uri_root}/{name}{self.query}"

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
        """The part of the URI an error message must show (scheme spelling may vary; no query)."""
        return f"{self.uri_root}/{name}".split("://", 1)[-1].lstrip("/")


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


def _s3_store(server: MotoServer) -> Store:
    prefix = f"{BUCKET}/{uuid.uuid4().hex}"
    return Store("s3", server.fs, prefix, f"s3://{prefix}", server.query(), server)


def _gcs_store(emulator: GcsEmulator) -> Store:
    prefix = f"{BUCKET}/{uuid.uuid4().hex}"
    return Store("gcs", emulator.fs, prefix, f"gs://{prefix}", emulator.query(), emulator)


def _fuse_store(mount: RcloneMount) -> Store:
    root = mount.mountpoint / uuid.uuid4().hex
    root.mkdir()
    return Store("fuse", fsspec.filesystem("file"), str(root), str(root), backend=mount)


def _remove_prefix(store: Store) -> None:
    """Delete the test's prefix; errors are ignored (the backend may be gone already)."""
    try:
        if store.kind == "memory":
            _clear_memory(store)
        elif store.kind == "fuse":
            shutil.rmtree(store.root, ignore_errors=True)
        elif store.kind in ("s3", "gcs"):
            if store.fs.exists(store.root):
                store.fs.rm(store.root, recursive=True)
    except Exception:  # noqa: BLE001
        pass


def _make_store(kind: str, request, tmp_path: Path) -> Store:
    if kind == "local":
        return _local_store(tmp_path)
    if kind == "memory":
        return _memory_store()
    if kind == "s3":
        return _s3_store(request.getfixturevalue("moto_server"))
    if kind == "gcs":
        return _gcs_store(request.getfixturevalue("gcs_emulator"))
    if kind == "fuse":
        return _fuse_store(request.getfixturevalue("rclone_mount"))
    raise ValueError(kind)


BACKENDS = ["local", "memory", "s3", "gcs", "fuse"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    """A private prefix on one backend; every test taking it runs once per backend.

    local: a pytest tmp_path; memory: memory://; s3: a moto server; gcs:
    gcp-storage-emulator; fuse: a directory on an rclone mount with a 2 s
    write-back cache (the Colab Drive shape). The servers and the mount start
    once per session, the first time a test needs them.
    """
    s = _make_store(request.param, request, tmp_path)
    try:
        yield s
    finally:
        _remove_prefix(s)


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


@pytest.fixture
def s3_store(moto_server):
    s = _s3_store(moto_server)
    try:
        yield s
    finally:
        _remove_prefix(s)


@pytest.fixture
def gcs_store(gcs_emulator):
    s = _gcs_store(gcs_emulator)
    try:
        yield s
    finally:
        _remove_prefix(s)


@pytest.fixture
def fakegcs_store(fake_gcs_server):
    """A GCS store on fake-gcs-server, the second GCS implementation (it enforces exclusive creates)."""
    s = _gcs_store(fake_gcs_server)
    try:
        yield s
    finally:
        _remove_prefix(s)


@pytest.fixture
def fuse_store(rclone_mount):
    s = _fuse_store(rclone_mount)
    try:
        yield s
    finally:
        _remove_prefix(s)


# --- the servers and the mount behind them (one per session) ----------------------------


@pytest.fixture(scope="session")
def moto_server():
    """A running MotoServer (S3 over HTTP on 127.0.0.1) with bucket BUCKET."""
    with MotoServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_emulator():
    """A running GcsEmulator (GCS JSON API on 127.0.0.1, in memory) with bucket BUCKET."""
    with GcsEmulator(default_bucket=BUCKET) as emulator:
        emulator.create_bucket(BUCKET)
        yield emulator


@pytest.fixture(scope="session")
def fake_gcs_server():
    """A running FakeGcsServer (fake-gcs-server, in memory) with bucket BUCKET."""
    with FakeGcsServer(default_bucket=BUCKET) as server:
        yield server


@pytest.fixture(scope="session")
def rclone_mount(tmp_path_factory):
    """A running RcloneMount: remote, mountpoint and cache in a session tmp dir, 2 s write-back.

    Shared by the whole session: do not kill_vm() it (use `rclone_vm`). Teardown
    is a clean stop(), which fails if anything written never reached the remote.
    Missing rclone/fusermount3 fails loudly (`.ci/run` installs them).
    """
    base = tmp_path_factory.mktemp("rclone")
    mount = RcloneMount(base / "remote", base / "mnt", base / "cache", write_back="2s")
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()


@pytest.fixture
def rclone_vm(tmp_path):
    """A private RcloneMount for this test alone (2 s write-back), free to kill_vm()/remount().

    Torn down with kill_vm(): what it held is discarded with tmp_path.
    """
    mount = RcloneMount(tmp_path / "remote", tmp_path / "mnt", tmp_path / "cache", write_back="2s")
    mount.start()
    try:
        yield mount
    finally:
        mount.kill_vm()


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
