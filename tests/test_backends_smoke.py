"""The real-backend fixtures themselves work (helpers/backends.py, conftest.py).

If these fail, every s3/gcs/fuse parameter of the other tests is suspect:
the servers answer, `store.fs` round-trips bytes, `store.uri()` carries the
server's options, and the rclone mount really reproduces the Colab failure
"checkpoint visible in the VM, never reached Drive".
"""
from __future__ import annotations

import os
import time
import urllib.request
from urllib.parse import parse_qsl

import fsspec
import pytest

from helpers.backends import fuse_mounts

REAL = ["s3", "gcs", "fuse"]


@pytest.fixture
def backend_store(kind, request):
    return request.getfixturevalue(f"{kind}_store")


@pytest.mark.parametrize("kind", REAL)
def test_backend_is_reachable(kind, backend_store):
    if kind == "fuse":
        assert fuse_mounts().get(str(backend_store.backend.mountpoint)) == "fuse.rclone"
        assert backend_store.backend.running
    else:
        with urllib.request.urlopen(backend_store.backend.endpoint + "/", timeout=5) as resp:
            assert resp.status == 200
        assert backend_store.fs.exists("ckptstore-tests")  # the session's bucket


@pytest.mark.parametrize("kind", REAL)
def test_store_helpers_round_trip(kind, backend_store):
    s = backend_store
    assert s.kind == kind
    assert s.files() == []
    data = os.urandom(300_000)
    path = s.path("dir/sub/blob.bin")
    s.write(path, data)
    s.write(s.path("other"), b"x")
    assert s.read(path) == data
    assert s.files() == sorted([path, s.path("other")])  # same form read/write accept
    assert all(s.read(p) for p in s.files())
    assert s.size_of_everything() == len(data) + 1
    with s.fs.open(s.path("streamed"), "wb") as f:
        f.write(b"a" * 1000)
    with s.fs.open(s.path("streamed"), "rb") as f:
        assert f.read() == b"a" * 1000


@pytest.mark.parametrize("kind", REAL)
def test_uri_carries_the_backend_options(kind, backend_store):
    s = backend_store
    uri = s.uri("thing")
    assert "?" not in s.uri_text("thing")
    assert s.uri_text("thing").endswith("/thing")
    if kind == "fuse":
        assert uri == s.path("thing") and s.query == ""
        return
    assert uri.startswith({"s3": "s3://", "gcs": "gs://"}[kind])
    assert s.backend.endpoint in uri
    # The URI alone (what ckptstore is given) reaches the same object: its query
    # holds every option the client needs (fsspec itself does not read queries).
    s.write(s.path("thing"), b"via store.fs")
    base, _, query = uri.partition("?")
    options = dict(parse_qsl(query))
    with fsspec.open(base, "rb", skip_instance_cache=True, **options) as f:
        assert f.read() == b"via store.fs"


# --- the rclone mount behaves like Colab's Drive --------------------------------------------


def test_write_reaches_the_remote_only_after_write_back(rclone_vm):
    mnt, remote = rclone_vm.mountpoint, rclone_vm.remote_dir
    (mnt / "run").mkdir()
    written = time.monotonic()
    (mnt / "run" / "model.bin").write_bytes(b"w" * 1_000_000)
    assert (mnt / "run" / "model.bin").stat().st_size == 1_000_000  # visible in the VM at once
    assert not (remote / "run" / "model.bin").exists()  # but not in "Drive"
    assert rclone_vm.not_uploaded() == ["run/model.bin"]
    rclone_vm.wait_uploaded(timeout=15)
    assert time.monotonic() - written >= 1.5  # the 2 s write-back, not an immediate upload
    assert (remote / "run" / "model.bin").read_bytes() == b"w" * 1_000_000
    assert rclone_vm.not_uploaded() == [] and rclone_vm.dirty_files() == []


def test_kill_vm_loses_what_had_not_been_uploaded(rclone_vm):
    mnt, remote = rclone_vm.mountpoint, rclone_vm.remote_dir
    (mnt / "old.bin").write_bytes(b"old")
    rclone_vm.wait_uploaded(timeout=15)
    (mnt / "new.bin").write_bytes(b"new")  # within the write-back delay ...
    with open(mnt / "new.bin", "rb+") as f:
        os.fsync(f.fileno())  # ... and fsync does not upload
    assert (mnt / "new.bin").read_bytes() == b"new"
    rclone_vm.kill_vm()
    assert not rclone_vm.running and not rclone_vm.is_mounted()
    assert not (remote / "new.bin").exists()
    rclone_vm.remount()
    assert rclone_vm.is_mounted()
    assert sorted(os.listdir(mnt)) == ["old.bin"]  # the new VM sees only what reached the remote
    assert (mnt / "old.bin").read_bytes() == b"old"


def test_clean_stop_uploads_everything_first(rclone_vm):
    mnt, remote = rclone_vm.mountpoint, rclone_vm.remote_dir
    (mnt / "a").mkdir()
    (mnt / "a" / "late.bin").write_bytes(b"l" * 12345)
    rclone_vm.stop()  # rclone itself would exit leaving this in its cache
    assert not rclone_vm.is_mounted()
    assert (remote / "a" / "late.bin").read_bytes() == b"l" * 12345
