"""Errors say what happened, name the URI, and never leak a secret.

Specification: API.md "Errors" table and guarantee 6 ("misses, full disks,
denied permissions ... each raise a clear error naming the URI, with any
secret (keys, tokens, passwords in URLs or options) redacted"). Full and
read-only disks are real tmpfs mounts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import traceback
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import ckptstore
from conftest import BUCKET
from helpers.compare import assert_state_equal

ERROR_BASES = {
    "CheckpointError": (Exception,),
    "CheckpointNotFoundError": (FileNotFoundError,),
    "CorruptCheckpointError": (),
    "UnsafeCheckpointError": (),
    "UnsupportedObjectError": (TypeError,),
    "CheckpointExistsError": (FileExistsError,),
    "InsufficientSpaceError": (OSError,),
    "StorageError": (OSError,),
}


@pytest.mark.parametrize("name", sorted(ERROR_BASES))
def test_error_class_is_exported_with_its_documented_bases(name):
    cls = getattr(ckptstore, name)
    assert isinstance(cls, type) and issubclass(cls, Exception)
    assert issubclass(cls, ckptstore.CheckpointError)
    for base in ERROR_BASES[name]:
        assert issubclass(cls, base), f"{name} is not a {base.__name__}"


def test_distinct_errors_are_not_each_other():
    assert not issubclass(ckptstore.CorruptCheckpointError, ckptstore.CheckpointNotFoundError)
    assert not issubclass(ckptstore.CheckpointNotFoundError, ckptstore.CorruptCheckpointError)
    assert not issubclass(ckptstore.UnsafeCheckpointError, ckptstore.CorruptCheckpointError)
    assert not issubclass(ckptstore.UnsupportedObjectError, ckptstore.UnsafeCheckpointError)


# --- redaction -------------------------------------------------------------------------


@pytest.fixture
def bucket():
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    yield name
    fs = fsspec.filesystem("memory")
    for key in [k for k in list(fs.store) if name in k]:
        del fs.store[key]
    for d in [d for d in list(fs.pseudo_dirs) if name in d]:
        fs.pseudo_dirs.remove(d)


# Secrets where a user puts them: in the URL's authority, its query, or the
# storage options. Options only reach backends that take them, so the query
# and option cases run on S3 (moto takes any key/secret/session token).
SECRET_CASES = {
    "password-in-url": (lambda b, s3: f"memory://user:hunter2@{b}/x", None, ["hunter2"]),
    "secrets-in-query": (
        lambda b, s3: f"s3://{BUCKET}/{b}/x?endpoint_url={s3.endpoint}&token=SECRET123&key=SECRETKEY7"
                      f"&secret=SECRETSEC8",
        None,
        ["SECRET123", "SECRETKEY7", "SECRETSEC8"],
    ),
    "secrets-in-storage-options": (
        lambda b, s3: f"s3://{BUCKET}/{b}/x",
        lambda s3: {"endpoint_url": s3.endpoint, "secret": "SECRET789", "token": "SECRETTOK0",
                    "key": "SECRETKEY1"},
        ["SECRET789", "SECRETTOK0", "SECRETKEY1"],
    ),
}


@pytest.fixture
def secret_case(request, bucket):
    """(uri, storage options, secrets) of a SECRET_CASES entry, its server started if it needs one."""
    def make(case):
        make_uri, options, secrets = SECRET_CASES[case]
        s3 = request.getfixturevalue("moto_server") if case != "password-in-url" else None
        return make_uri(bucket, s3), (options(s3) if options else None), secrets
    return make


# botocore logs every request's headers at DEBUG (the session token among them):
# that is its own choice, documented in docs/guarantees.md; ours are checked.
_CLIENT_LOGGERS = ("botocore", "aiobotocore", "urllib3")


def _ours(record) -> bool:
    return not record.name.split(".")[0] in _CLIENT_LOGGERS


def provoke(operation: str, uri: str, options):
    """Run `operation` so that it fails; return the exception."""
    if operation == "load-missing":
        with pytest.raises(ckptstore.CheckpointNotFoundError) as excinfo:
            ckptstore.load(uri, storage_options=options)
    elif operation == "verify-missing":
        with pytest.raises(ckptstore.CheckpointNotFoundError) as excinfo:
            ckptstore.verify(uri, storage_options=options)
    else:  # "save-existing"
        ckptstore.save({"a": torch.ones(2)}, uri, storage_options=options)
        with pytest.raises(ckptstore.CheckpointExistsError) as excinfo:
            ckptstore.save({"a": torch.ones(2)}, uri, storage_options=options, overwrite=False)
    return excinfo.value


OPERATIONS = ["load-missing", "verify-missing", "save-existing"]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_error_names_the_uri_without_its_secrets(bucket, secret_case, caplog, case, operation):
    uri, options, secrets = secret_case(case)
    caplog.set_level(logging.DEBUG)
    err = provoke(operation, uri, options)
    assert f"{bucket}/x" in str(err), f"error does not name the URI: {str(err)!r}"
    for secret in secrets:
        assert secret not in str(err), f"str(err) leaks {secret}: {str(err)!r}"
        assert secret not in repr(err), f"repr(err) leaks {secret}: {repr(err)!r}"
        for record in filter(_ours, caplog.records):
            text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
            assert secret not in text, f"log record from {record.name} leaks {secret}: {text!r}"


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_traceback_of_an_error_does_not_leak_secrets(secret_case, case, operation):
    """What a user pastes into an issue is the whole traceback, chained causes included."""
    uri, options, secrets = secret_case(case)
    err = provoke(operation, uri, options)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    for secret in secrets:
        assert secret not in text, f"traceback leaks {secret}:\n{text}"


@pytest.mark.parametrize("case", sorted(SECRET_CASES))
def test_successful_save_load_and_verify_log_no_secrets(secret_case, caplog, case):
    uri, options, secrets = secret_case(case)
    caplog.set_level(logging.DEBUG)
    info = ckptstore.save({"w": torch.ones(3)}, uri, storage_options=options)
    ckptstore.load(uri, storage_options=options)
    ckptstore.verify(uri, storage_options=options, deep=True)
    for secret in secrets:
        assert secret not in repr(info), f"CheckpointInfo leaks {secret}: {info!r}"
        for record in filter(_ours, caplog.records):
            text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
            assert secret not in text, f"log record from {record.name} leaks {secret}: {text!r}"


def test_error_args_do_not_carry_secrets(secret_case):
    uri, options, _ = secret_case("secrets-in-query")
    err = provoke("load-missing", uri, options)
    assert "SECRET123" not in repr(err.args)
    assert all("SECRET123" not in str(v) for v in vars(err).values())


def test_unknown_protocol_raises_a_checkpoint_error_naming_the_uri():
    uri = "nosuchprotocol-xyz://user:pw-SECRET42@host/run/ckpt"
    with pytest.raises(ckptstore.CheckpointError) as excinfo:
        ckptstore.load(uri)
    assert "host/run/ckpt" in str(excinfo.value)
    assert "SECRET42" not in str(excinfo.value) and "SECRET42" not in repr(excinfo.value)


# --- a full disk ----------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    out = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(root, name)
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


SMALL = {"w": torch.arange(250_000, dtype=torch.int32), "step": 1}  # ~1 MB
BIG = {"w": torch.ones(8 * 2**20, dtype=torch.float32), "step": 2}  # 32 MB


@pytest.fixture
def small_disk(mount_tmpfs):
    disk = mount_tmpfs("small-disk", "size=8m")
    uri = str(disk / "ckpt")
    ckptstore.save(SMALL, uri)
    return disk, uri


def test_full_disk_raises_insufficient_space_naming_the_uri(small_disk):
    disk, uri = small_disk
    with pytest.raises(ckptstore.InsufficientSpaceError) as excinfo:
        ckptstore.save(BIG, uri)
    err = excinfo.value
    assert isinstance(err, OSError) and isinstance(err, ckptstore.CheckpointError)
    assert uri in str(err)


def test_full_disk_leaves_the_previous_checkpoint_loadable(small_disk):
    disk, uri = small_disk
    with pytest.raises(ckptstore.InsufficientSpaceError):
        ckptstore.save(BIG, uri)
    assert ckptstore.exists(uri)
    assert_state_equal(ckptstore.load(uri), SMALL)
    assert ckptstore.verify(uri, deep=True).ok


def test_full_disk_leaves_nothing_of_the_failed_save(small_disk):
    disk, uri = small_disk
    before = snapshot(disk)
    with pytest.raises(ckptstore.InsufficientSpaceError):
        ckptstore.save(BIG, uri)
    after = snapshot(disk)
    assert sorted(p for p in after if p.endswith(".bin")) == sorted(p for p in before if p.endswith(".bin"))
    assert after == before


def test_disk_filling_up_part_way_through_a_save_raises_insufficient_space(small_disk):
    disk, uri = small_disk
    ckptstore.save({"filler": torch.zeros(3 * 2**20, dtype=torch.uint8)}, str(disk / "filler"))
    before = snapshot(disk)
    # ~4.5 MB: smaller than the disk, larger than what is left on it.
    with pytest.raises(ckptstore.InsufficientSpaceError):
        ckptstore.save({"w": torch.ones(1_200_000, dtype=torch.float32)}, str(disk / "new"))
    assert snapshot(disk) == before
    assert ckptstore.exists(str(disk / "new")) is False
    assert_state_equal(ckptstore.load(uri), SMALL)


def test_new_checkpoint_fits_after_a_failed_save_freed_its_space(small_disk):
    disk, uri = small_disk
    with pytest.raises(ckptstore.InsufficientSpaceError):
        ckptstore.save(BIG, uri)
    medium = {"w": torch.full((1_000_000,), 3.0)}  # 4 MB: fits only if the failed save cleaned up
    ckptstore.save(medium, str(disk / "medium"))
    assert_state_equal(ckptstore.load(str(disk / "medium")), medium)


# --- a read-only filesystem ------------------------------------------------------------------


def test_read_only_filesystem_raises_a_storage_error_naming_the_uri(mount_tmpfs):
    disk = mount_tmpfs("read-only", "ro")
    uri = str(disk / "ckpt")
    with pytest.raises(ckptstore.CheckpointError) as excinfo:
        ckptstore.save({"a": torch.ones(3)}, uri)
    err = excinfo.value
    assert isinstance(err, OSError), f"{type(err).__name__} is not an OSError"
    assert isinstance(err, (ckptstore.StorageError, PermissionError)), type(err).__mro__
    assert not isinstance(err, ckptstore.InsufficientSpaceError)
    assert uri in str(err)


def test_checkpoint_on_a_read_only_filesystem_loads_and_verifies(mount_tmpfs):
    disk = mount_tmpfs("remounted", "size=16m")
    uri = str(disk / "ckpt")
    state = {"w": torch.randn(1000), "step": 5}
    ckptstore.save(state, uri)
    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    assert remount.returncode == 0, remount.stderr
    assert ckptstore.exists(uri)
    assert_state_equal(ckptstore.load(uri), state)
    assert ckptstore.verify(uri, deep=True).ok
