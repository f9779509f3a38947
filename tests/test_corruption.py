"""A damaged checkpoint is never returned as data.

Specification: API.md guarantee 3 ("Every byte checksummed, the commit marker
included ... load with verify=True never returns data that differs from what
was saved: it raises CorruptCheckpointError") and `verify` ("never raises for a
corrupt checkpoint"; shallow checks sizes and the commit, deep re-reads every
byte). The checkpoint directory is treated as a black box: every file in it is
damaged in turn, one change at a time, and restored before the next.
"""
from __future__ import annotations

import random

import fsspec
import numpy as np
import pytest
import torch

import ckptstore


def small_state():
    g = torch.Generator().manual_seed(3)
    return {
        "weights": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).half()},
        "ids": torch.arange(500, dtype=torch.int64),
        "mask": torch.rand(100, generator=g) > 0.5,
        "np": np.linspace(0, 1, 50),
        "step": 1234,
        "name": "corruption-test",
        "lr": 3e-4,
        "blob": b"\x00\x01\x02" * 10,
    }


@pytest.fixture
def saved(store):
    """A freshly committed checkpoint on `store`: (store, uri, state)."""
    state = small_state()
    uri = store.uri()
    ckptstore.save(state, uri)
    assert store.files(), "save wrote no files"
    return store, uri, state


def positions(size: int, rng: random.Random, samples: int = 20) -> list[int]:
    """Start, end, middle and `samples` random offsets of a file of `size` bytes."""
    if size == 0:
        return []
    picked = {0, size - 1, size // 2}
    picked.update(rng.randrange(size) for _ in range(samples))
    return sorted(picked)


def outcome_of_damage(uri: str, shallow_too: bool) -> list[str]:
    """What is wrong with how load/verify handled a damaged checkpoint (empty when right)."""
    wrong = []
    try:
        ckptstore.load(uri)
    except ckptstore.CorruptCheckpointError:
        pass
    except Exception as exc:  # noqa: BLE001 - any other outcome is the failure we report
        wrong.append(f"load raised {type(exc).__name__}: {exc}")
    else:
        wrong.append("load returned data")
    checks = [True, False] if shallow_too else [True]
    for deep in checks:
        try:
            report = ckptstore.verify(uri, deep=deep)
        except Exception as exc:  # noqa: BLE001
            wrong.append(f"verify(deep={deep}) raised {type(exc).__name__}: {exc}")
            continue
        if report.ok:
            wrong.append(f"verify(deep={deep}) reported ok")
        elif not report.problems or not all(isinstance(p, str) and p for p in report.problems):
            wrong.append(f"verify(deep={deep}) gave no problem description: {report.problems!r}")
    return wrong


def damage_each_file(store, uri, change, shallow_too_for=lambda path: False):
    """Apply `change(data) -> [(label, damaged_data)]` to every file, one at a time."""
    failures = []
    files = store.files()
    for path in files:
        original = store.read(path)
        for label, damaged in change(path, original):
            store.write(path, damaged)
            try:
                for problem in outcome_of_damage(uri, shallow_too_for(path)):
                    failures.append(f"{path} {label}: {problem}")
            finally:
                store.write(path, original)
    # The checkpoint is intact again once every change is undone.
    ckptstore.load(uri)
    return failures


def is_commit_record(path: str) -> bool:
    return path.endswith(".commit")


def is_data_file(path: str) -> bool:
    return path.endswith(".bin")


# --- intact checkpoints ---------------------------------------------------------------


def test_intact_checkpoint_verifies_shallow_and_reports_its_size(saved):
    store, uri, state = saved
    report = ckptstore.verify(uri)
    assert isinstance(report, ckptstore.VerifyReport)
    assert report.ok is True
    assert report.problems == []
    tensor_bytes = sum(t.numel() * t.element_size() for t in (state["weights"]["w"], state["weights"]["b"], state["ids"], state["mask"]))
    assert report.nbytes >= tensor_bytes


def test_intact_checkpoint_verifies_deep(saved):
    _, uri, _ = saved
    report = ckptstore.verify(uri, deep=True)
    assert report.ok is True and report.problems == []


def test_checkpoint_has_a_commit_record_and_data_files(saved):
    store, _, _ = saved
    files = store.files()
    assert any(is_commit_record(p) for p in files), files
    assert any(is_data_file(p) for p in files), files


# --- damaged checkpoints ----------------------------------------------------------------


def byte_flips(seed: int):
    rng = random.Random(seed)
    masks = [0x01, 0x80, 0xFF, 0x10]

    def flips(path, data):
        # Commit records are small and every byte of them matters: sample them densely.
        for pos in positions(len(data), rng, samples=80 if is_commit_record(path) else 20):
            mask = rng.choice(masks)
            damaged = bytearray(data)
            damaged[pos] ^= mask
            yield f"byte {pos} ^ {mask:#04x}", bytes(damaged)

    return flips


def test_single_byte_flip_anywhere_in_any_file_is_detected(saved):
    store, uri, _ = saved
    failures = damage_each_file(store, uri, byte_flips(seed=1))
    assert not failures, "\n".join(failures)


def test_single_byte_flip_in_a_marker_committed_local_checkpoint_is_detected(local_store):
    uri = local_store.uri() + "?commit=marker"
    ckptstore.save(small_state(), uri)
    failures = damage_each_file(local_store, uri, byte_flips(seed=11))
    assert not failures, "\n".join(failures)


def test_byte_flip_in_commit_record_fails_shallow_verify_too(saved):
    store, uri, _ = saved
    rng = random.Random(2)

    def flips(path, data):
        if not is_commit_record(path):
            return
        for pos in positions(len(data), rng, samples=10):
            damaged = bytearray(data)
            damaged[pos] ^= 0x01
            yield f"byte {pos} ^ 0x01", bytes(damaged)

    failures = damage_each_file(store, uri, flips, shallow_too_for=lambda p: True)
    assert not failures, "\n".join(failures)


def test_truncating_any_file_is_detected_by_load_and_shallow_verify(saved):
    store, uri, _ = saved

    def truncations(path, data):
        if len(data) == 0:
            return
        yield "truncated by 1 byte", data[:-1]
        if len(data) > 2:
            yield "truncated to half", data[: len(data) // 2]
        yield "truncated to 0 bytes", b""

    failures = damage_each_file(store, uri, truncations, shallow_too_for=lambda p: True)
    assert not failures, "\n".join(failures)


def test_appending_a_byte_to_any_file_is_detected_by_load_and_shallow_verify(saved):
    store, uri, _ = saved

    def appended(path, data):
        yield "one byte 0x00 appended", data + b"\x00"
        if not is_commit_record(path):  # a trailing newline may be insignificant in a text record
            yield "one byte 0x0a appended", data + b"\n"

    failures = damage_each_file(store, uri, appended, shallow_too_for=lambda p: True)
    assert not failures, "\n".join(failures)


def test_missing_data_file_is_detected_by_load_and_shallow_verify(saved):
    store, uri, _ = saved
    data_files = [p for p in store.files() if is_data_file(p)]
    assert data_files
    failures = []
    for path in data_files:
        original = store.read(path)
        store.fs.rm_file(path)
        try:
            failures += [f"{path} removed: {w}" for w in outcome_of_damage(uri, shallow_too=True)]
        finally:
            store.write(path, original)
    ckptstore.load(uri)
    assert not failures, "\n".join(failures)


def test_corrupt_checkpoint_error_names_the_uri(saved):
    store, uri, _ = saved
    path = max((p for p in store.files() if is_data_file(p)), key=store.fs.size)
    data = bytearray(store.read(path))
    data[len(data) // 2] ^= 0xFF
    store.write(path, bytes(data))
    with pytest.raises(ckptstore.CorruptCheckpointError) as excinfo:
        ckptstore.load(uri)
    assert isinstance(excinfo.value, ckptstore.CheckpointError)
    assert store.uri_text() in str(excinfo.value)


def test_load_with_verify_false_still_reads_an_intact_checkpoint(saved):
    _, uri, state = saved
    loaded = ckptstore.load(uri, verify=False)
    assert torch.equal(loaded["ids"], state["ids"])


# --- nothing there -------------------------------------------------------------------------


def test_exists_is_false_before_and_true_after_save(store):
    uri = store.uri()
    assert ckptstore.exists(uri) is False
    ckptstore.save({"a": 1}, uri)
    assert ckptstore.exists(uri) is True


def test_load_of_missing_checkpoint_raises_not_found(store):
    with pytest.raises(ckptstore.CheckpointNotFoundError) as excinfo:
        ckptstore.load(store.uri("missing"))
    assert isinstance(excinfo.value, FileNotFoundError)
    assert isinstance(excinfo.value, ckptstore.CheckpointError)
    assert store.uri_text("missing") in str(excinfo.value)


def test_verify_of_missing_checkpoint_raises_not_found(store):
    with pytest.raises(ckptstore.CheckpointNotFoundError) as excinfo:
        ckptstore.verify(store.uri("missing"))
    assert store.uri_text("missing") in str(excinfo.value)


def test_deep_verify_of_missing_checkpoint_raises_not_found(store):
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ckptstore.verify(store.uri("missing"), deep=True)


def test_directory_of_unrelated_files_is_not_a_checkpoint(store):
    store.write(store.path("ckpt") + "/notes.txt", b"hello")
    store.write(store.path("ckpt") + "/data.bin", b"\x00" * 64)
    uri = store.uri()
    assert ckptstore.exists(uri) is False
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ckptstore.load(uri)
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ckptstore.verify(uri)


# --- storage that corrupts what it is given -------------------------------------------------


@pytest.fixture
def bitrot():
    """(filesystem, uri) on the bit-rotting backend; see helpers/bitrot.py."""
    import uuid

    from helpers.bitrot import BitRotFileSystem

    fs = fsspec.filesystem("bitrot")
    prefix = f"/rot-{uuid.uuid4().hex}"
    try:
        yield fs, f"bitrot://{prefix.lstrip('/')}/ckpt"
    finally:
        BitRotFileSystem.rot = False
        fs.clear(prefix)


def test_save_detects_storage_that_corrupted_the_data_and_commits_nothing(bitrot):
    fs, uri = bitrot
    type(fs).rot = True
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.save(small_state(), uri)
    type(fs).rot = False
    assert ckptstore.exists(uri) is False


def test_save_detecting_corrupted_storage_keeps_the_previous_checkpoint(bitrot):
    fs, uri = bitrot
    old = small_state()
    ckptstore.save(old, uri)
    type(fs).rot = True
    new = dict(small_state(), step=9999)
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.save(new, uri)
    type(fs).rot = False
    loaded = ckptstore.load(uri)
    assert loaded["step"] == 1234 and torch.equal(loaded["ids"], old["ids"])
    assert ckptstore.verify(uri, deep=True).ok


def test_load_detects_data_corrupted_by_storage_when_save_did_not_verify(bitrot):
    fs, uri = bitrot
    type(fs).rot = True
    ckptstore.save(small_state(), uri, verify=False)
    type(fs).rot = False
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(uri)
    assert ckptstore.verify(uri, deep=True).ok is False
