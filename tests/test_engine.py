"""The generation transaction, once: claim, space check, discard, retire, and removal order.

`save`, `cp`, the manager and the DCP writer all drive `ckptstore.writer.Generation`;
these tests check its guarantees directly, on a real local directory and a
real moto S3 server, and then that `cp` (which once skipped the claim and the
space check) gets them too.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

import ckptstore
from ckptstore.cli import main as cli
from ckptstore.datafiles import blob_table, plan, write_files
from ckptstore.errors import CheckpointExistsError, InsufficientSpaceError, StorageError
from ckptstore.format import tree
from ckptstore.format.manifest import FileName, Manifest
from ckptstore.stores import open_store
from ckptstore.writer import Generation, remove_files


def state(v: float = 1.0, n: int = 1000) -> dict:
    return {"w": torch.full((n,), v), "step": int(v)}


def names_in(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def generation_of(path) -> set[str]:
    return {FileName.parse(n).gen for n in names_in(path) if FileName.parse(n)}


def write_generation(gen: Generation, obj) -> Manifest:
    """What a save does between begin and commit: encode, write the data files."""
    nodes, blobs = tree.encode(obj)
    p = plan(blobs, gen.store.part_bytes)
    files, crcs = write_files(gen.store, [gen.data_name(k) for k in range(len(p.sizes))], p, verify=True,
                              written=gen.written)
    return Manifest(generation=gen.id, files=files, blobs=blob_table(blobs, crcs), nodes=nodes)


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(uri, store) of a fresh checkpoint location on a real backend."""
    if request.param == "local":
        uri = str(tmp_path / "ckpt")
    else:
        uri = request.getfixturevalue("s3_store").uri("ckpt")
    return uri, open_store(uri)


def test_commit_publishes_and_retires_the_previous_generation(target):
    uri, store = target
    ckptstore.save(state(1), uri)
    old = set(store.list())
    gen = Generation.begin(store)
    gen.commit(write_generation(gen, state(2)))
    assert ckptstore.load(uri)["step"] == 2
    assert not old & set(store.list()), "the superseded generation was not retired"
    assert {FileName.parse(n).gen for n in store.list()} == {gen.id}


def test_discard_removes_exactly_what_the_generation_wrote(target):
    uri, store = target
    ckptstore.save(state(1), uri)
    before = dict(store.list())
    gen = Generation.begin(store)
    write_generation(gen, state(2))
    assert set(store.list()) > set(before)
    gen.discard()
    assert set(store.list()) == set(before)
    assert ckptstore.load(uri)["step"] == 1


def test_a_failed_publish_discards_and_keeps_the_previous_checkpoint(target, monkeypatch):
    uri, store = target
    ckptstore.save(state(1), uri)
    before = set(store.list())
    gen = Generation.begin(store)
    m = write_generation(gen, state(2))

    def refuse(*a, **k):
        raise StorageError("the backend refused the record")
    monkeypatch.setattr(gen.strategy, "publish", refuse)
    with pytest.raises(StorageError):
        gen.commit(m)
    assert set(store.list()) == before
    assert ckptstore.load(uri)["step"] == 1


def test_a_failing_retire_after_the_commit_is_harmless(target, monkeypatch):
    uri, store = target
    ckptstore.save(state(1), uri)
    gen = Generation.begin(store)
    m = write_generation(gen, state(2))
    real = type(store).remove

    def remove(self, names):
        if any(FileName.parse(n) and FileName.parse(n).gen < gen.id for n in names):
            raise StorageError("cannot remove right now")
        return real(self, names)
    monkeypatch.setattr(type(store), "remove", remove)
    gen.commit(m)                      # does not raise
    assert gen.committed
    monkeypatch.setattr(type(store), "remove", real)
    assert ckptstore.load(uri)["step"] == 2
    assert ckptstore.verify(uri, deep=True).ok
    # What was not retired is garbage gc finds.
    from ckptstore.gc import leftovers_in
    assert {g.reason for g in leftovers_in(open_store(uri))} == {"superseded by a newer commit"}


def test_overwrite_false_refuses_at_begin_when_a_checkpoint_is_committed(target):
    uri, store = target
    ckptstore.save(state(1), uri)
    with pytest.raises(CheckpointExistsError):
        Generation.begin(store, overwrite=False)


def test_of_two_create_only_generations_begun_together_only_the_first_commits(target):
    uri, store = target
    first = Generation.begin(store, overwrite=False)
    second = Generation.begin(open_store(uri), overwrite=False)
    m1, m2 = write_generation(first, state(1)), write_generation(second, state(2))
    first.commit(m1)
    with pytest.raises(CheckpointExistsError, match="another writer"):
        second.commit(m2)
    assert ckptstore.load(uri)["step"] == 1
    assert {FileName.parse(n).gen for n in store.list() if FileName.parse(n)} == {first.id}
    assert "create.claim" not in store.list()


def test_create_only_generations_racing_in_threads_commit_exactly_once(tmp_path):
    uri = str(tmp_path / "race")
    results: list = []
    barrier = threading.Barrier(4)

    def one(v: int) -> None:
        barrier.wait()
        try:
            ckptstore.save(state(v), uri, overwrite=False)
            results.append(v)
        except CheckpointExistsError:
            results.append(None)
    threads = [threading.Thread(target=one, args=(v,)) for v in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert ckptstore.load(uri)["step"] == winners[0]


def test_the_space_check_refuses_before_anything_is_written(tmp_path):
    store = open_store(str(tmp_path / "ckpt"))
    free = store.free_bytes()
    with pytest.raises(InsufficientSpaceError, match="needs"):
        Generation.begin(store, nbytes=free + (1 << 40))
    assert not (tmp_path / "ckpt").exists()


def test_remove_files_takes_commit_records_before_data(tmp_path, monkeypatch):
    uri = str(tmp_path / "ckpt")
    ckptstore.save(state(1), uri)
    store = open_store(uri)
    calls: list[list[str]] = []
    real = type(store).remove
    monkeypatch.setattr(type(store), "remove", lambda self, names: (calls.append(list(names)), real(self, names)))
    names = list(store.list()) + ["unrelated.txt"]
    (tmp_path / "ckpt" / "unrelated.txt").write_text("x")
    remove_files(store, names)
    assert [all(FileName.parse(n) and FileName.parse(n).is_record for n in c) for c in calls] == [True, False]
    assert names_in(tmp_path / "ckpt") == []


# ---------------------------------------------------------------- cp goes through the transaction

def test_cp_refuses_to_replace_a_committed_checkpoint_with_no_overwrite(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    ckptstore.save(state(1), src)
    ckptstore.save(state(2), dst)
    assert cli(["cp", src, dst, "--no-overwrite"]) == 1
    assert ckptstore.load(dst)["step"] == 2
    assert cli(["cp", src, dst]) == 0
    assert ckptstore.load(dst)["step"] == 1


def test_cp_checks_the_destinations_free_space_before_writing(tmp_path, mount_tmpfs):
    src = str(tmp_path / "src")
    ckptstore.save(state(1, n=4 << 20), src)          # 16 MiB
    small = mount_tmpfs("small", "size=8m")
    dst = str(small / "dst")
    from ckptstore.copy import copy_checkpoint
    with pytest.raises(InsufficientSpaceError):
        copy_checkpoint(open_store(src), open_store(dst))
    assert names_in(small / "dst") == []


def test_cp_retires_the_destinations_older_generation(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    ckptstore.save(state(1), src)
    ckptstore.save(state(2), dst)
    old = generation_of(tmp_path / "dst")
    assert cli(["cp", src, dst]) == 0
    new = generation_of(tmp_path / "dst")
    assert len(new) == 1 and not new & old


# ---------------------------------------------------------------- the local writer's read-back

def test_the_local_read_back_sees_the_disk_not_the_memory_written(tmp_path):
    """save(verify=True) on a local disk checks what the kernel holds for the file while later
    bytes are still being written: a byte changed on disk behind the writer changes the CRC
    read back, and bytes another process added make the close fail."""
    import crc32c

    store = open_store(str(tmp_path / "ck"))
    store.makedirs()
    data = os.urandom(3 << 20)
    w = store.open_writer("a.bin", len(data))
    assert w.reads_back
    w.write(memoryview(data))
    assert w.stored_crc(0, len(data), 0) == crc32c.crc32c(data)
    with open(tmp_path / "ck" / "a.bin", "r+b") as other:
        other.seek(1 << 20)
        other.write(bytes([data[1 << 20] ^ 1]))
    assert w.stored_crc(0, len(data), 0) != crc32c.crc32c(data)
    assert w.stored_crc(0, 1 << 20, 0) == crc32c.crc32c(data[:1 << 20])   # the bytes before it agree
    with pytest.raises(ValueError):
        w.stored_crc(0, len(data) + 1, 0)                                   # never past what was written
    with open(tmp_path / "ck" / "a.bin", "ab") as other:
        other.write(b"x")
    with pytest.raises(StorageError):
        w.close()



@pytest.mark.parametrize("where", ["local", "fuse"])
def test_a_save_cut_into_files_checks_each_as_stored_and_loads(where, tmp_path, request):
    """On a mount the data goes into files of part_size (64 MiB by default) written one after
    another, each read back through a fresh open while the next is written; on a local disk
    each is read back as it is written. Either way the record lists every file with its CRC,
    the load is equal and a deep verify passes; a flipped byte fails both."""
    from ckptstore.reader import open_commit

    if where == "fuse":
        s = request.getfixturevalue("fuse_store")
        uri, path = s.uri("ck") + "?part_size=1MiB", s.path("ck")
        assert open_store(s.uri("ck")).part_bytes == 64 << 20 and not open_store(uri).parallel_parts
    else:
        uri, path = str(tmp_path / "ck") + "?part_size=1MiB", str(tmp_path / "ck")
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(700_000, generator=g), "b": [torch.randn(5, generator=g), 7]}   # 2.7 MiB
    ckptstore.save(state, uri)
    m, _ = open_commit(open_store(uri))
    assert len(m.files) == 3 and [f.nbytes for f in m.files][:2] == [1 << 20, 1 << 20]
    got = ckptstore.load(uri)
    assert torch.equal(got["a"], state["a"]) and torch.equal(got["b"][0], state["b"][0]) and got["b"][1] == 7
    assert ckptstore.verify(uri, deep=True).ok
    second = os.path.join(path, m.files[1].name)
    with open(second, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    assert not ckptstore.verify(uri, deep=True).ok
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(uri)


def test_crc32c_combine_equals_the_crc_of_the_concatenation():
    import random

    import crc32c

    from ckptstore.ranges import crc32c_combine

    rng = random.Random(11)
    for _ in range(200):
        a = rng.randbytes(rng.randint(0, 3000))
        b = rng.randbytes(rng.choice([0, 1, 3, 64, rng.randint(0, 200_000)]))
        assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)
