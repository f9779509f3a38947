"""A caller's mistake is never corruption, and never costs a checkpoint.

Specification: API.md "The manager" (only corruption of what is stored causes a
fallback; `restore()` raises when no step verifies; the lower-step refusal; the
`best_metric` check; `allow_pickle` on the manager) and `errors.is_corruption`,
the one place that decides what corruption is.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.manager import core as manager_module
from ckptstore.errors import CallerMistake, ClaimHeldError, DeviceUnavailableError
from ckptstore.format.manifest import CLAIM_NAME
from ckptstore.writer import CLAIM_STALE
from helpers.records import rewrite_record

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def state_of(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}, "step": step}


def run_with(tmp_path: Path, steps, **kw) -> ckptstore.CheckpointManager:
    mgr = ckptstore.CheckpointManager(tmp_path / "run", **kw)
    for s in steps:
        mgr.save(s, state_of(s))
        time.sleep(0.01)     # distinct commit times
    return mgr


def say_saved_on(step_dir: Path, device: str) -> None:
    def edit(head):
        blobs = head["blobs"]
        if isinstance(blobs, dict):
            blobs["devices"] = [device]
        else:
            for b in blobs:
                b["device"] = device
    rewrite_record(step_dir, edit)


def flip_a_data_byte(step_dir: Path) -> None:
    data = sorted(p for p in step_dir.iterdir() if p.name.endswith(".bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))


def fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]


# ---------------------------------------------------------------- devices

@needs_cpu_only
def test_restore_with_a_cuda_map_location_on_a_cpu_only_host_raises_and_keeps_every_step(tmp_path, caplog):
    """The newcomer's README path on a machine without CUDA: no fallback, no deletion."""
    mgr = run_with(tmp_path, [25, 45, 50, 51], keep_last=4)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(DeviceUnavailableError) as e:
            mgr.restore(map_location="cuda")
    assert isinstance(e.value, RuntimeError) and not isinstance(e.value, ckptstore.CorruptCheckpointError)
    assert "cuda" in str(e.value) and "map_location" in str(e.value)
    assert fallbacks(caplog) == []
    assert mgr.steps() == [25, 45, 50, 51]
    # the loop that follows a failed restore does not get to start over either
    with pytest.raises(ValueError):
        mgr.save(0, state_of(0))
    assert mgr.steps() == [25, 45, 50, 51]
    assert mgr.restore(map_location="cpu")["step"] == 51


@needs_cpu_only
def test_a_step_saved_from_cuda_restored_on_a_cpu_only_host_names_the_device_and_the_fix(tmp_path, caplog):
    mgr = run_with(tmp_path, [10, 20], keep_last=1)
    say_saved_on(tmp_path / "run" / "step-20", "cuda:0")
    assert ckptstore.verify(tmp_path / "run" / "step-20", deep=True).ok      # the record is intact
    with pytest.raises(DeviceUnavailableError, match=r"cuda:0.*map_location='cpu'"):
        ckptstore.load(tmp_path / "run" / "step-20")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(DeviceUnavailableError):
            mgr.restore()
    assert fallbacks(caplog) == []
    assert mgr.steps() == [20]
    got = mgr.restore(map_location="cpu")
    torch.testing.assert_close(got["model"]["w"], state_of(20)["model"]["w"], rtol=0, atol=0)
    # into= CPU tensors needs no CUDA: the saved device does not matter there
    into = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(64)}}
    ckptstore.load(tmp_path / "run" / "step-20", into=into, select="model")
    assert torch.equal(into["model"]["w"], state_of(20)["model"]["w"])


def test_a_map_location_that_names_no_device_is_the_callers_error(tmp_path, caplog):
    mgr = run_with(tmp_path, [1, 2])
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(ValueError, match="map_location='gpu' does not name a device") as e:
            mgr.restore(map_location="gpu")
    assert isinstance(e.value, CallerMistake)
    assert fallbacks(caplog) == []


def test_a_record_naming_no_device_is_corrupt(tmp_path):
    ckptstore.save(state_of(1), tmp_path / "c")
    say_saved_on(tmp_path / "c", "warp-drive:0")
    with pytest.raises(ckptstore.CorruptCheckpointError, match="not a device"):
        ckptstore.load(tmp_path / "c")


@pytest.mark.parametrize("raised", [MemoryError, TypeError, KeyboardInterrupt])
def test_errors_of_the_callers_map_location_function_propagate_as_they_are(tmp_path, caplog, raised):
    mgr = run_with(tmp_path, [1, 2])

    def placement(storage, location):
        raise raised("from the caller's function")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(raised, match="from the caller's function"):
            mgr.restore(map_location=placement)
    assert fallbacks(caplog) == []
    assert mgr.steps() == [1, 2]


def test_an_into_that_does_not_fit_raises_without_a_fallback(tmp_path, caplog):
    mgr = run_with(tmp_path, [1, 2])
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(ValueError, match="w"):
            mgr.restore(into={"model": {"w": torch.zeros(3)}})
        with pytest.raises(KeyError, match="nope"):
            mgr.restore(select=["nope"])
    assert fallbacks(caplog) == []


# ---------------------------------------------------------------- what restore() returns

def test_restore_returns_none_only_for_a_run_without_steps(tmp_path):
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    assert mgr.restore() is None
    (tmp_path / "run" / "step-3").mkdir()          # a leftover, never committed
    assert mgr.restore() is None


def test_restore_raises_naming_every_step_when_none_verifies(tmp_path, caplog):
    mgr = run_with(tmp_path, [5, 10, 15])
    for s in (5, 10, 15):
        flip_a_data_byte(tmp_path / "run" / f"step-{s}")
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        with pytest.raises(ckptstore.CorruptCheckpointError) as e:
            mgr.restore()
    for s in (5, 10, 15):
        assert f"step {s}:" in str(e.value)
    assert len(fallbacks(caplog)) == 3
    assert mgr.steps() == [5, 10, 15]


def test_a_fallback_past_corrupt_steps_lets_the_run_save_them_again(tmp_path, caplog):
    run_with(tmp_path, [25, 45, 50, 51], keep_last=3)
    flip_a_data_byte(tmp_path / "run" / "step-50")
    flip_a_data_byte(tmp_path / "run" / "step-51")
    fresh = ckptstore.CheckpointManager(tmp_path / "run", keep_last=3, save_interval_steps=5)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        assert fresh.restore()["step"] == 45
    assert len(fallbacks(caplog)) == 2
    assert fresh.should_save(50)
    fresh.save(46, state_of(46))                     # after the restored step: accepted
    fresh.save(50, state_of(50))                     # replaces the corrupt one, no force needed
    assert fresh.restore(step=50)["step"] == 50
    assert ckptstore.verify(tmp_path / "run" / "step-50", deep=True).ok


# ---------------------------------------------------------------- saves a restarted run makes

def test_a_run_restarted_from_scratch_cannot_remove_the_steps_it_could_resume(tmp_path):
    run_with(tmp_path, [25, 45, 50, 51])
    mgr = ckptstore.CheckpointManager(tmp_path / "run", keep_last=4)
    with pytest.raises(ValueError, match=r"step 0 is lower than step 51"):
        mgr.save(0, state_of(0))
    for s in (5, 10):
        with pytest.raises(ValueError):
            mgr.save(s, state_of(s))
    assert mgr.steps() == [25, 45, 50, 51]
    assert not (tmp_path / "run" / "step-0").exists()


def test_a_restored_run_saves_on_and_force_saves_below(tmp_path):
    run_with(tmp_path, [10, 20])
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    assert mgr.restore()["step"] == 20
    mgr.save(21, state_of(21))
    rollback = ckptstore.CheckpointManager(tmp_path / "run")
    assert rollback.restore(step=10)["step"] == 10   # an explicit rollback: saves after 10 are fine
    rollback.save(11, state_of(11))
    other = ckptstore.CheckpointManager(tmp_path / "run")
    other.save(3, state_of(3), force=True)
    assert other.steps() == [3, 10, 11, 20, 21]


def test_saving_a_committed_step_is_refused_in_save_itself_even_async(tmp_path):
    run_with(tmp_path, [1])
    mgr = ckptstore.CheckpointManager(tmp_path / "run", async_save=True)
    with pytest.raises(ckptstore.CheckpointExistsError, match="step 1 is already committed"):
        mgr.save(1, state_of(1))
    mgr.save(2, state_of(2)).result()
    mgr.close()


# ---------------------------------------------------------------- metrics

def test_a_typo_in_best_metric_raises_naming_what_was_given(tmp_path):
    mgr = ckptstore.CheckpointManager(tmp_path / "run", keep_best=1, best_metric="val_los")
    with pytest.raises(KeyError, match=r"val_los.*'val_loss'"):
        mgr.save(1, state_of(1), metrics={"val_loss": 0.5})
    assert mgr.steps() == []
    mgr.save(1, state_of(1))                                       # metrics=None: no metric for it
    assert mgr.steps() == [1]
    mgr.save(2, state_of(2), metrics={"val_los": 0.1, "lr": 1e-3})
    assert mgr.steps() == [2]                                      # the best and the newest


def test_the_best_step_survives_keep_last_with_the_metric_spelled_right(tmp_path):
    mgr = ckptstore.CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1, best_metric="val_loss")
    for s, loss in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.7)]:
        mgr.save(s, state_of(s), metrics={"val_loss": loss})
    assert mgr.steps() == [2, 4]


# ---------------------------------------------------------------- allow_pickle and the safe format

def test_allow_pickle_on_the_manager_saves_and_restores_what_the_safe_format_refuses(tmp_path):
    for async_save in (False, True):
        d = tmp_path / f"run-{async_save}"
        with ckptstore.CheckpointManager(d, allow_pickle=True, async_save=async_save) as mgr:
            mgr.save(1, {"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)})
        back = ckptstore.CheckpointManager(d, allow_pickle=True).restore()
        assert back["args"] == argparse.Namespace(lr=0.1)
        with pytest.raises(ckptstore.UnsafeCheckpointError):
            ckptstore.CheckpointManager(d).restore()


def test_an_async_save_of_a_refused_value_raises_from_save_itself(tmp_path):
    mgr = ckptstore.CheckpointManager(tmp_path / "run", async_save=True, save_interval_steps=1)
    with pytest.raises(ckptstore.UnsupportedObjectError, match=r"argparse.Namespace"):
        mgr.save(1, {"args": argparse.Namespace(lr=0.1)})
    mgr.wait()                                       # nothing went to the background
    assert mgr.should_save(1)                        # and step 1 is still due
    mgr.save(1, state_of(1)).result()                # the refused save left nothing behind
    mgr.close()
    assert mgr.steps() == [1]


# ---------------------------------------------------------------- a save in flight

@pytest.fixture
def held_writer(monkeypatch):
    """The manager's background write waits for ``release`` (a save kept in flight)."""
    release = threading.Event()
    started = threading.Event()
    real = manager_module.write_checkpoint

    def held(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)
    monkeypatch.setattr(manager_module, "write_checkpoint", held)
    yield started, release
    release.set()


def test_a_step_in_flight_is_not_due_and_cannot_be_saved_twice(tmp_path, held_writer):
    started, release = held_writer
    mgr = ckptstore.CheckpointManager(tmp_path / "run", async_save=True, save_interval_steps=5)
    handle = mgr.save(5, state_of(5))
    assert started.wait(30)
    assert mgr.should_save(5) is False
    with pytest.raises(ckptstore.CheckpointExistsError, match="step 5 is being saved already"):
        mgr.save(5, state_of(5))
    release.set()
    handle.result()
    assert mgr.should_save(5) is False
    mgr.close()
    assert mgr.steps() == [5]


# ---------------------------------------------------------------- a claim left by a dead writer

def _claim_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    start = stat[stat.rfind(b")") + 2:].split()[19].decode()
    owner = {"boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
             "pidns": os.readlink("/proc/self/ns/pid"), "pid": pid, "start": start}
    return json.dumps({"generation": "x", "time": time.time(), "owner": owner}).encode()


def test_a_claim_whose_writer_was_killed_does_not_block_the_resumed_save(tmp_path):
    run_with(tmp_path, [10])
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    body = _claim_of(victim.pid)
    victim.kill()
    victim.wait()
    (tmp_path / "run" / "step-11").mkdir()
    (tmp_path / "run" / "step-11" / CLAIM_NAME).write_bytes(body)
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    assert mgr.steps() == [10]
    mgr.save(11, state_of(11))                    # at once, not after CLAIM_STALE seconds
    assert mgr.steps() == [10, 11]
    assert not (tmp_path / "run" / "step-11" / CLAIM_NAME).exists()


def test_a_claim_of_a_live_writer_is_reported_as_in_progress_never_as_committed(tmp_path):
    run_with(tmp_path, [10])
    (tmp_path / "run" / "step-11").mkdir()
    (tmp_path / "run" / "step-11" / CLAIM_NAME).write_bytes(_claim_of(os.getpid()))
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    with pytest.raises(ClaimHeldError) as e:
        mgr.save(11, state_of(11))
    assert "already committed" not in str(e.value) and "nothing is committed" in str(e.value)
    assert mgr.steps() == [10]
    # a claim that outlived the lease is taken over, whoever wrote it
    old = time.time() - CLAIM_STALE - 5
    os.utime(tmp_path / "run" / "step-11" / CLAIM_NAME, (old, old))
    mgr.save(11, state_of(11))
    assert mgr.steps() == [10, 11]


def test_a_claim_from_another_machine_waits_for_its_lease(tmp_path):
    run_with(tmp_path, [10])
    (tmp_path / "run" / "step-11").mkdir()
    foreign = {"generation": "x", "time": time.time(),
               "owner": {"boot": "another-machine", "pidns": "pid:[1]", "pid": 999999, "start": "1"}}
    (tmp_path / "run" / "step-11" / CLAIM_NAME).write_text(json.dumps(foreign))
    with pytest.raises(ClaimHeldError):
        ckptstore.CheckpointManager(tmp_path / "run").save(11, state_of(11))


# ---------------------------------------------------------------- values the format holds

def test_a_size_with_negative_entries_round_trips(tmp_path):
    ckptstore.save({"s": torch.Size([-1, 3]), "t": torch.Size([])}, tmp_path / "c")
    back = ckptstore.load(tmp_path / "c")
    assert back == {"s": torch.Size([-1, 3]), "t": torch.Size([])}
    assert type(back["s"]) is torch.Size



def test_prune_with_a_metric_no_step_holds_raises_and_removes_nothing(tmp_path):
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    for s, loss in [(1, 0.1), (2, 0.9), (3, 0.8)]:
        mgr.save(s, state_of(s), metrics={"val_loss": loss})
    typo = ckptstore.CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1, best_metric="val_los")
    with pytest.raises(KeyError, match=r"val_los.*'val_loss'"):
        typo.prune()
    assert typo.steps() == [1, 2, 3]
    right = ckptstore.CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1, best_metric="val_loss")
    assert right.prune() == [2]


def test_the_cli_prune_with_a_typod_metric_removes_nothing(tmp_path, capsys):
    from ckptstore.cli import main
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    for s, loss in [(1, 0.1), (2, 0.9), (3, 0.8)]:
        mgr.save(s, state_of(s), metrics={"val_loss": loss})
    code = main(["prune", str(tmp_path / "run"), "--keep-last", "1", "--keep-best", "1", "--best-metric", "val_los"])
    assert code != 0
    assert "val_loss" in capsys.readouterr().err
    assert mgr.steps() == [1, 2, 3]
