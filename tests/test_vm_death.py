"""The Colab/Drive case: the VM dies while the mount still has uploads pending.

Specification: API.md guarantee 1 on FUSE mounts ("data first, commit marker
last ... a reader sees a complete checkpoint or none"), the remote-backends
issue's VM-death test, and docs/colab.md. An rclone mount with a 2 s
write-back cache stands in for the Drive mount: files show on the mount at
once and reach the remote directory later, concurrently and in any order.
Killing rclone with -9 and deleting its cache is the VM dying: the remote
directory then holds what survived. A reader of the remounted directory must
find, for every checkpoint, either one that verifies bit for bit and equals
a version that was saved, or nothing: never a torn one.
"""
from __future__ import annotations

import random
import time

import pytest
import torch

import ckptstore

RUNS = 3          # checkpoint directories written before each VM death
VERSIONS = 3      # saves per directory (each overwrites the one before)
MEGABYTES = 6


def state_for(run: int, version: int):
    n = MEGABYTES * 2**20 // 4 // 3
    g = torch.Generator().manual_seed(run * 1000 + version)
    return {
        "model": {f"layer{i}": torch.randn(n, generator=g) for i in range(3)},
        "run": run,
        "version": version,
    }


def same(a, b) -> bool:
    return a["run"] == b["run"] and a["version"] == b["version"] and all(
        torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def what_a_reader_finds(uri: str):
    """('none', why) or ('checkpoint', state) — and fails the test on a torn one."""
    if not ckptstore.exists(uri):
        with pytest.raises((ckptstore.CheckpointNotFoundError, ckptstore.CorruptCheckpointError)):
            ckptstore.load(uri)
        return "none", None
    state = ckptstore.load(uri)           # verify=True: every byte against its checksum
    report = ckptstore.verify(uri, deep=True)
    assert report.ok, f"{uri}: exists() but verify finds {report.problems}"
    return "checkpoint", state


def test_after_the_vm_dies_a_reader_finds_a_verified_checkpoint_or_nothing(rclone_vm):
    rng = random.Random("ckptstore-vm-death")
    mnt = rclone_vm.mountpoint
    outcomes = {"latest": 0, "older": 0, "none": 0}
    torn_on_remote = 0
    for death in range(4):
        saved: dict[int, list] = {}
        for run in range(RUNS):
            uri = str(mnt / f"death{death}" / f"run{run}")
            for version in range(VERSIONS):
                info = ckptstore.save(state_for(run, version), uri)
                assert info.strategy == "marker", "a FUSE mount must commit by marker"
                saved.setdefault(run, []).append(version)
        # The VM dies somewhere inside the write-back window: some files have
        # reached the remote, others have not.
        time.sleep(rng.uniform(0.0, 3.0))
        remote_files = {p.name for p in (rclone_vm.remote_dir / f"death{death}").rglob("*") if p.is_file()}
        rclone_vm.kill_vm()
        rclone_vm.remount()

        for run in range(RUNS):
            uri = str(mnt / f"death{death}" / f"run{run}")
            kind, state = what_a_reader_finds(uri)
            if kind == "none":
                outcomes["none"] += 1
                continue
            matches = [v for v in saved[run] if same(state, state_for(run, v))]
            assert matches, f"{uri}: loaded a state that was never saved"
            outcomes["latest" if matches[-1] == VERSIONS - 1 else "older"] += 1
        # Count deaths that caught a checkpoint half uploaded: a commit record
        # on the remote whose data files are not all there.
        commits = [n for n in remote_files if n.endswith(".commit")]
        datas = {n for n in remote_files if n.endswith(".bin")}
        for c in commits:
            gen = c[: -len(".commit")]
            if not any(d.startswith(gen) for d in datas):
                torn_on_remote += 1
    print(f"outcomes over 4 deaths x {RUNS} checkpoints: {outcomes}; torn commits seen on the remote: "
          f"{torn_on_remote}")
    # The deaths must really have landed inside the upload window at least once.
    assert outcomes["none"] + outcomes["older"] >= 1, outcomes


def test_a_checkpoint_confirmed_uploaded_survives_the_vm_dying(rclone_vm):
    """What docs/colab.md tells users to do before a session ends actually works."""
    uri = str(rclone_vm.mountpoint / "run" / "final")
    ckptstore.save(state_for(0, 0), uri)
    ckptstore.save(state_for(0, 1), uri)
    rclone_vm.wait_uploaded(timeout=60)     # on Colab: drive.flush_and_unmount()
    rclone_vm.kill_vm()
    rclone_vm.remount()
    kind, state = what_a_reader_finds(uri)
    assert kind == "checkpoint" and same(state, state_for(0, 1))


def test_on_a_mount_the_previous_checkpoint_is_kept_until_the_next_commit(rclone_vm):
    """A save on a FUSE mount keeps the previous generation: if the new one never
    reaches the remote, the reader falls back to the old one instead of nothing."""
    uri = str(rclone_vm.mountpoint / "keep")
    ckptstore.save(state_for(1, 0), uri)
    rclone_vm.wait_uploaded(timeout=60)
    ckptstore.save(state_for(1, 1), uri)
    names = sorted(p.name for p in (rclone_vm.mountpoint / "keep").iterdir())
    assert len([n for n in names if n.endswith(".commit")]) == 2, names
    rclone_vm.kill_vm()                      # at once: the second save is still in the cache only
    rclone_vm.remount()
    kind, state = what_a_reader_finds(uri)
    assert kind == "checkpoint" and same(state, state_for(1, 0)), "the previous checkpoint was lost"
    # A third save then retires everything but itself and the one before it.
    ckptstore.save(state_for(1, 2), uri)
    ckptstore.save(state_for(1, 3), uri)
    names = sorted(p.name for p in (rclone_vm.mountpoint / "keep").iterdir())
    assert len([n for n in names if n.endswith(".commit")]) == 2, names
    assert same(ckptstore.load(uri), state_for(1, 3))


def test_retention_on_a_mount_keeps_a_step_that_had_time_to_upload(rclone_vm):
    """keep_last=1 with saves faster than the mount uploads: each new step would
    remove the only one on the remote. The manager keeps the newest step older
    than upload_settle_seconds (here just over the mount's 2 s write-back) as a
    net, and the VM dying right after a burst of saves still leaves it."""
    mgrs = {name: ckptstore.CheckpointManager(str(rclone_vm.mountpoint / name), keep_last=1,
                                              upload_settle_seconds=settle)
            for name, settle in (("netted", 3.0), ("unnetted", None))}
    for mgr in mgrs.values():
        mgr.save(1, state_for(3, 1))
    time.sleep(3.5)                          # step 1 reaches the remote (2 s write-back) and settles
    for step in range(2, 7):                 # then five saves in about a second
        for mgr in mgrs.values():
            mgr.save(step, state_for(3, step))
    assert mgrs["netted"].steps() == [1, 2, 6]   # the net, the next to settle, keep_last
    assert mgrs["unnetted"].steps() == [6]
    for mgr in mgrs.values():
        mgr.close()
    rclone_vm.kill_vm()
    rclone_vm.remount()
    with ckptstore.CheckpointManager(str(rclone_vm.mountpoint / "netted")) as mgr:
        restored = mgr.restore()
    assert restored is not None and same(restored, state_for(3, 1)), "the net under the uploads was lost"
    # the control: without the net, retention had removed the only step that reached the remote
    with ckptstore.CheckpointManager(str(rclone_vm.mountpoint / "unnetted")) as mgr:
        assert mgr.restore() is None


@pytest.fixture
def slow_upload_vm(tmp_path):
    """A private mount whose uploads crawl (--bwlimit), so a small commit record
    reaches the remote while the data it vouches for is still on its way."""
    from helpers.backends import RcloneMount

    mount = RcloneMount(tmp_path / "remote", tmp_path / "mnt", tmp_path / "cache", write_back="1s",
                        extra_args=("--bwlimit", "2M"))
    mount.start()
    try:
        yield mount
    finally:
        mount.kill_vm()


def test_a_commit_record_that_reached_the_remote_before_its_data_is_never_taken(slow_upload_vm):
    vm = slow_upload_vm
    uri = str(vm.mountpoint / "torn")
    ckptstore.save(state_for(2, 0), uri)
    remote = vm.remote_dir / "torn"
    deadline = time.monotonic() + 60
    # Kill the VM the moment the commit record is on the remote.
    while not (remote.exists() and any(p.name.endswith(".commit") for p in remote.iterdir())):
        assert time.monotonic() < deadline, "the commit record never reached the remote"
        time.sleep(0.01)
    vm.kill_vm()
    on_remote = {p.name: p.stat().st_size for p in remote.iterdir()}
    data = {n: s for n, s in on_remote.items() if n.endswith(".bin")}
    expected = sum(v.numel() * 4 for v in state_for(2, 0)["model"].values())
    assert sum(data.values()) < expected, (
        f"all data had reached the remote with its commit record, so nothing torn was tested: {on_remote}")
    vm.remount()
    kind, _ = what_a_reader_finds(uri)
    assert kind == "none", "a commit record whose data never arrived was taken as a checkpoint"
    assert not ckptstore.verify(uri, deep=True).ok
