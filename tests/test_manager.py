"""CheckpointManager: steps, restore with fallback, retention, async saves, space.

Specification: API.md "The manager (training runs)" and the manager issue.
Retention rules are checked one by one on the pure function that decides them
(`ckptstore.manager.to_keep`), then end to end on every backend.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest
import torch

import ckptstore
from ckptstore.manager import StepRecord, to_keep


def R(step, t, loss=None, committed=True):
    return StepRecord(step, committed, t if committed else None, {"loss": loss} if loss is not None else {})


def keep(records, now=1000.0, **policy):
    args = dict(keep_last=None, keep_best=None, best_metric=None, best_mode="min", keep_every=None, max_age=None)
    args.update(policy)
    return to_keep(records, now=now, **args)


RUN = [R(s, 100.0 + s, loss) for s, loss in [(10, 5.0), (20, 1.0), (30, 4.0), (40, 3.0), (50, 2.0), (60, 6.0)]]


# ---------------------------------------------------------------- retention rules (unit)

def test_no_policy_keeps_everything():
    assert keep(RUN) == {10, 20, 30, 40, 50, 60}


def test_keep_last_keeps_the_most_recent_by_commit_time_and_the_best():
    assert keep(RUN, keep_last=2) == {50, 60}
    # recency is by commit time, not by step number
    shuffled = [R(10, 300.0), R(20, 200.0), R(30, 100.0)]
    assert keep(shuffled, keep_last=1) == {10}


def test_keep_best_ranks_by_the_metric_in_either_direction():
    assert keep(RUN, keep_best=2, best_metric="loss") == {20, 50, 60}          # + the newest
    assert keep(RUN, keep_best=1, best_metric="loss", best_mode="max") == {60}


def test_the_best_is_never_removed_even_under_a_total_limit():
    """The Hugging Face failure mode: save_total_limit deletes the best checkpoint."""
    assert 20 in keep(RUN, keep_last=1, best_metric="loss")
    assert keep(RUN, keep_last=1, best_metric="loss") == {20, 60}


def test_on_a_mount_the_newest_step_old_enough_to_have_uploaded_is_kept():
    """Retention on a write-back mount: steps committed within `settle` s may exist
    only in the machine's cache; the newest older one stays as the net under them."""
    # RUN commits at 110..160; now=1000: all settled, the net is the newest (60), kept anyway
    assert keep(RUN, keep_last=1, settle=300) == {60}
    # commits at 910..960: only 10 and 20 are 75+ s old; the net is 20, and 30
    # (the next to settle) stays so the net can move on to it
    recent = [R(s, 900.0 + s) for s in (10, 20, 30, 40, 50, 60)]
    assert keep(recent, keep_last=2, settle=75) == {20, 30, 50, 60}
    # none is old enough: the oldest (the likeliest to have reached the remote) stays
    assert keep(recent, keep_last=1, settle=500) == {10, 60}
    # off a mount (settle None) only the policy counts
    assert keep(recent, keep_last=1) == {60}


def test_steps_without_the_metric_are_not_ranked():
    records = [R(1, 1.0, 0.5), R(2, 2.0), R(3, 3.0, None)]
    assert keep(records, keep_best=1, best_metric="loss") == {1, 3}


def test_keep_every_keeps_multiples():
    assert keep(RUN, keep_every=20) == {20, 40, 60}


def test_max_age_keeps_what_is_younger_than_it():
    # steps 60, 50, 40 were committed at 160, 150, 140: 5, 15 and 25 s before now
    assert keep(RUN, now=165.0, max_age=10.0) == {60}
    assert keep(RUN, now=165.0, max_age=20.0) == {50, 60}
    assert keep(RUN, now=165.0, max_age=30.0) == {40, 50, 60}


def test_rules_combine_as_a_union():
    assert keep(RUN, keep_last=1, keep_every=30, keep_best=1, best_metric="loss") == {60, 30, 20}


def test_the_newest_committed_step_is_always_kept():
    assert 60 in keep(RUN, keep_every=7)
    assert keep(RUN, keep_every=7) == {60}


def test_uncommitted_steps_and_saves_in_flight_are_never_removed():
    records = RUN + [R(70, None, committed=False)]
    assert 70 in keep(records, keep_last=1)
    assert 30 in keep(RUN, keep_last=1, in_flight={30})


# ---------------------------------------------------------------- the manager, every backend

def state(step: int):
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 32, generator=g), "step": step}


def mgr_uri(store):
    return store.uri("run")


def test_steps_latest_and_restore(store):
    mgr = ckptstore.CheckpointManager(mgr_uri(store))
    assert mgr.steps() == [] and mgr.latest_step() is None and mgr.restore() is None
    for s in (3, 1, 2):
        # below the newest committed step: a deliberate save out of order needs force
        info = mgr.save(s, state(s), metrics={"loss": float(s)}, force=s < 3)
        assert isinstance(info, ckptstore.CheckpointInfo)
    assert mgr.steps() == [1, 2, 3]
    assert mgr.latest_step() == 2                     # the most recently committed
    assert mgr.restore()["step"] == 2
    assert torch.equal(mgr.restore(step=3)["w"], state(3)["w"])
    # a fresh manager on the same directory sees the same
    assert ckptstore.CheckpointManager(mgr_uri(store)).steps() == [1, 2, 3]


def test_an_existing_step_is_refused_unless_forced(store):
    mgr = ckptstore.CheckpointManager(mgr_uri(store))
    mgr.save(5, state(5))
    with pytest.raises(ckptstore.CheckpointExistsError, match="step 5"):
        mgr.save(5, state(6))
    assert mgr.restore(step=5)["step"] == 5
    mgr.save(5, state(6), force=True)
    assert mgr.restore(step=5)["step"] == 6


def test_restore_falls_back_past_a_corrupt_newest_step_with_a_warning(store, caplog):
    mgr = ckptstore.CheckpointManager(mgr_uri(store))
    mgr.save(1, state(1))
    mgr.save(2, state(2))
    data = [p for p in store.files() if "/step-2/" in p and p.endswith(".bin")]
    assert data
    raw = bytearray(store.read(data[0]))
    raw[len(raw) // 2] ^= 0x40
    store.write(data[0], bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        restored = mgr.restore()
    assert restored["step"] == 1
    assert any("step 2" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ckptstore.CorruptCheckpointError):
        mgr.restore(step=2)


def test_retention_prunes_after_each_commit_and_keeps_the_best(store):
    mgr = ckptstore.CheckpointManager(mgr_uri(store), keep_last=2, best_metric="loss")
    losses = {1: 9.0, 2: 1.0, 3: 5.0, 4: 7.0, 5: 8.0}
    for s, loss in losses.items():
        mgr.save(s, state(s), metrics={"loss": loss})
    # on a write-back mount, where none of them is old enough to have surely
    # reached the remote, the oldest stays too (the net under the uploads)
    assert mgr.steps() == ([1, 2, 4, 5] if store.kind == "fuse" else [2, 4, 5])
    assert mgr.prune() == []
    assert mgr.restore(step=2)["step"] == 2


def test_without_a_policy_nothing_is_removed(store):
    mgr = ckptstore.CheckpointManager(mgr_uri(store))
    for s in range(4):
        mgr.save(s, state(s))
    assert mgr.prune() == [] and mgr.steps() == [0, 1, 2, 3]


def test_a_half_removed_step_is_never_taken_as_committed(local_store, monkeypatch):
    """Removal takes the commit record first: dying right after leaves data nobody trusts."""
    mgr = ckptstore.CheckpointManager(mgr_uri(local_store), keep_last=1)
    mgr.save(1, state(1))
    from ckptstore.stores.local import LocalStore
    real_remove = LocalStore.remove
    step1_calls = []

    def remove_then_die(self, names):
        if self.path.endswith("/step-1") and names:
            step1_calls.append(list(names))
            if any(n.endswith(".bin") for n in names):
                raise KeyboardInterrupt   # the process dies before the data goes
        return real_remove(self, names)

    monkeypatch.setattr(LocalStore, "remove", remove_then_die)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, state(2))
    monkeypatch.setattr(LocalStore, "remove", real_remove)
    assert step1_calls and all(n.endswith(".commit") for n in step1_calls[0]), step1_calls
    assert mgr.steps() == [2]
    assert mgr.restore()["step"] == 2
    assert any(p.endswith(".bin") and "/step-1/" in p for p in local_store.files()), "nothing was left half-removed"


def test_a_step_being_written_by_another_process_is_not_pruned(local_store, writers):
    """A save in flight in another process has no commit record yet: retention leaves it."""
    from helpers.crash import interrupt_a_save
    run = mgr_uri(local_store)
    mgr = ckptstore.CheckpointManager(run, keep_last=1)
    for s in (1, 2):
        mgr.save(s, state(s))
    import pathlib
    from helpers.crash import bytes_under
    interrupt_a_save(writers, run + "/step-9", pathlib.Path(run), 1, 8,
                     kill_above_bytes=bytes_under(pathlib.Path(run)) + 2**20)
    mgr.save(3, state(3))
    names = {p.split("/")[-2] for p in local_store.files()}
    assert "step-9" in names and mgr.steps() == [3]


# ---------------------------------------------------------------- async

def test_async_save_returns_after_the_copy_and_later_updates_do_not_leak(store):
    mgr = ckptstore.CheckpointManager(mgr_uri(store), async_save=True)
    model = torch.nn.Linear(64, 64)
    tied = {"a": model.weight, "b": model.weight}     # shared storage must stay shared
    expected = model.weight.detach().clone()
    h = mgr.save(1, {"model": model.state_dict(), "tied": tied})
    with torch.no_grad():
        model.weight.add_(1.0)                          # training goes on
    info = h.result()
    assert isinstance(info, ckptstore.CheckpointInfo)
    mgr.close()
    out = ckptstore.CheckpointManager(mgr_uri(store)).restore()
    assert torch.equal(out["model"]["weight"], expected)
    assert out["tied"]["a"].untyped_storage().data_ptr() == out["tied"]["b"].untyped_storage().data_ptr()
    assert isinstance(out["tied"]["a"], torch.nn.Parameter)


def test_at_most_one_async_save_is_in_flight(local_store):
    mgr = ckptstore.CheckpointManager(mgr_uri(local_store), async_save=True)
    h1 = mgr.save(1, state(1))
    h2 = mgr.save(2, state(2))
    assert h1.done(), "the second save started before the first was committed"
    h2.result()
    mgr.close()
    assert mgr.steps() == [1, 2]


def test_an_async_error_surfaces_on_the_next_save_wait_or_close(local_store):
    mgr = ckptstore.CheckpointManager(mgr_uri(local_store), async_save=True)
    other = ckptstore.CheckpointManager(mgr_uri(local_store))   # another writer of the same run
    mgr.save(1, state(1)).result()
    # each step is committed by the other writer after this manager listed the run: its own
    # save of it fails in the background
    other.save(2, state(2))
    mgr.save(2, state(2))
    with pytest.raises(ckptstore.CheckpointExistsError):
        mgr.save(3, state(3))
    other.save(4, state(4))
    mgr.save(4, state(4))
    with pytest.raises(ckptstore.CheckpointExistsError):
        mgr.wait()
    other.save(5, state(5))
    mgr.save(5, state(5))
    with pytest.raises(ckptstore.CheckpointExistsError):
        mgr.close()


def test_a_pending_async_save_finishes_at_interpreter_exit(tmp_path):
    run = tmp_path / "run"
    code = f"""
import torch, ckptstore
mgr = ckptstore.CheckpointManager({str(run)!r}, async_save=True)
mgr.save(7, {{"w": torch.ones(4 << 20)}})
# no wait(), no close(): the interpreter exits with the save in flight
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mgr = ckptstore.CheckpointManager(str(run))
    assert mgr.steps() == [7]
    assert torch.equal(mgr.restore()["w"], torch.ones(4 << 20))


def test_a_failing_pending_save_at_exit_is_reported(tmp_path):
    run = tmp_path / "run"
    code = f"""
import torch, ckptstore
mgr = ckptstore.CheckpointManager({str(run)!r}, async_save=True)
mgr.save(6, {{"w": torch.ones(4)}}).result()
ckptstore.CheckpointManager({str(run)!r}).save(7, {{"w": torch.ones(4)}})   # another writer commits 7
mgr.save(7, {{"w": torch.zeros(4)}})   # exists: fails in the background, nobody waits
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "step 7" in done.stderr and "failed" in done.stderr, done.stderr


# ---------------------------------------------------------------- space and permissions

def test_a_directory_that_cannot_be_written_is_refused_at_construction(mount_tmpfs):
    ro = mount_tmpfs("ro", "ro", "size=1m")
    with pytest.raises(ckptstore.StorageError, match="not writable"):
        ckptstore.CheckpointManager(str(ro / "run"))


def test_a_state_that_cannot_fit_is_refused_before_writing(mount_tmpfs):
    disk = mount_tmpfs("small", "size=8m")
    mgr = ckptstore.CheckpointManager(str(disk / "run"))
    mgr.save(1, {"w": torch.ones(1 << 18)})                # 1 MiB
    with pytest.raises(ckptstore.InsufficientSpaceError):
        mgr.save(2, {"w": torch.ones(16 << 18)})           # 16 MiB on an 8 MiB disk
    assert mgr.steps() == [1]
    assert not (disk / "run" / "step-2").exists() or not any((disk / "run" / "step-2").iterdir())


def test_a_disk_filling_up_during_a_save_removes_what_it_wrote(mount_tmpfs):
    disk = mount_tmpfs("filling", "size=12m")
    mgr = ckptstore.CheckpointManager(str(disk / "run"))
    mgr.save(1, {"w": torch.ones(1 << 20)})                # 4 MiB
    # Fits by the free-space check, then something else takes the room mid-save.
    hog = disk / "hog"
    stop = threading.Event()

    def fill():
        with open(hog, "wb") as f:
            while not stop.is_set():
                try:
                    f.write(bytes(1 << 16))
                    f.flush()
                except OSError:
                    return
                time.sleep(0.0005)

    filler = threading.Thread(target=fill, daemon=True)
    filler.start()
    try:
        with pytest.raises(ckptstore.InsufficientSpaceError):
            for s in range(2, 10):
                mgr.save(s, {"w": torch.ones(1 << 20)})
    finally:
        stop.set()
        filler.join(5)
    hog.unlink()
    assert mgr.restore(step=1)["w"].sum() == 1 << 20
    leftovers = [p for p in (disk / "run").rglob("*.bin") if p.parent.name not in {f"step-{s}" for s in mgr.steps()}]
    assert not leftovers, leftovers


# ---------------------------------------------------------------- object store listing cost

def test_listing_hundreds_of_steps_on_s3_is_one_listing(moto_server):
    from helpers.faultproxy import FaultProxy
    bucket = moto_server.create_bucket("many-steps")
    fs = moto_server.filesystem()
    port = int(moto_server.endpoint.rsplit(":", 1)[1])
    with FaultProxy("127.0.0.1", port, seed=0) as proxy:
        run = f"s3://{bucket}/run?endpoint_url={proxy.endpoint}&key=k&secret=s"
        mgr = ckptstore.CheckpointManager(run)
        mgr.save(0, state(0))
        # 300 more committed steps, copied object by object (no manager saves: that would be slow)
        src = [p for p in fs.find(f"{bucket}/run/step-0")]
        for s in range(1, 301):
            for p in src:
                fs.copy(p, p.replace("/step-0/", f"/step-{s}/"))
        before = proxy.stats["requests"]
        steps = mgr.steps()
        latest = mgr.latest_step()
        used = proxy.stats["requests"] - before
    assert steps == list(range(301)) and latest is not None
    assert used <= 2, f"steps() and latest_step() took {used} requests for 301 steps"


def test_incremental_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError, match="incremental"):
        ckptstore.CheckpointManager(str(tmp_path / "run"), incremental="yes")
