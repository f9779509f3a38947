"""The save schedule and preemption signals of CheckpointManager (API.md, "The manager").

The signal tests use real signals: ``os.kill`` of this process for the
in-process cases, and SIGTERM sent at seeded random instants to training
runs in fresh processes (tests/helpers/resume_train.py ``preempt``), each
of which must exit 0 with a committed checkpoint of the step it was on, and
resume (in another fresh process) to the same losses and parameters as an
uninterrupted run, bit for bit.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ckptstore

HELPER = Path(__file__).resolve().parent / "helpers" / "resume_train.py"
REPO = HELPER.parents[2]


def _signal_self(sig=signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs in the main thread at the next bytecode boundary


# ---------------------------------------------------------------- the schedule

def test_save_interval_steps_picks_multiples_and_never_a_step_twice(tmp_path):
    with ckptstore.CheckpointManager(tmp_path / "run", save_interval_steps=5) as mgr:
        due = [s for s in range(0, 23) if mgr.should_save(s)]
        assert due == [0, 5, 10, 15, 20]
        mgr.save(10, {"w": torch.ones(2)})
        assert not mgr.should_save(10)          # already saved
        assert mgr.should_save(15)
    # a new manager (a resumed run) counts the steps the directory already holds
    with ckptstore.CheckpointManager(tmp_path / "run", save_interval_steps=5) as mgr:
        assert not mgr.should_save(10) and mgr.should_save(20)


def test_save_interval_seconds_counts_from_creation_then_from_each_save_start(tmp_path):
    with ckptstore.CheckpointManager(tmp_path / "run", save_interval_seconds=0.3) as mgr:
        assert not mgr.should_save(1)
        time.sleep(0.35)
        assert mgr.should_save(1) and mgr.should_save(2)    # due until a save starts
        mgr.save(2, {"w": torch.ones(2)})
        assert not mgr.should_save(2) and not mgr.should_save(3)
        time.sleep(0.35)
        assert mgr.should_save(3)


def test_without_a_schedule_nothing_is_due(tmp_path):
    with ckptstore.CheckpointManager(tmp_path / "run") as mgr:
        assert not any(mgr.should_save(s) for s in range(200))
        assert not mgr.preempted


@pytest.mark.parametrize("kwargs, message", [
    ({"save_interval_steps": 0}, "save_interval_steps"),
    ({"save_interval_steps": 2.5}, "save_interval_steps"),
    ({"save_interval_seconds": -1}, "save_interval_seconds"),
    ({"save_interval_seconds": float("nan")}, "save_interval_seconds"),
    ({"grace_seconds": 0}, "grace_seconds"),
    ({"preemption_signals": signal.SIGKILL}, "cannot be caught"),
    ({"preemption_signals": "SIGNOPE"}, "no signal named"),
    ({"preemption_signals": [signal.SIGTERM, 10**6]}, "not a signal"),
])
def test_a_bad_schedule_or_signal_is_a_value_error_naming_it(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ckptstore.CheckpointManager(tmp_path / "run", **kwargs)


def test_should_save_wants_a_step(tmp_path):
    with ckptstore.CheckpointManager(tmp_path / "run", save_interval_steps=2) as mgr:
        with pytest.raises(ValueError, match="step"):
            mgr.should_save(-1)


# ---------------------------------------------------------------- signals in this process

def test_a_signal_is_only_recorded_and_close_puts_the_previous_handler_back(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        mgr = ckptstore.CheckpointManager(tmp_path / "run", preemption_signals=["SIGUSR1", signal.SIGUSR2])
        assert not mgr.preempted and not mgr.should_save(7)
        _signal_self(signal.SIGUSR1)
        assert mgr.preempted and mgr.last_signal == signal.SIGUSR1 and seen == []   # ours ran, not theirs
        assert mgr.should_save(7)
        mgr.save(7, {"w": torch.ones(2)})
        assert not mgr.should_save(8)            # no signal since that save started
        _signal_self(signal.SIGUSR2)
        assert mgr.should_save(8)
        mgr.close()
        _signal_self(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]          # the user's handler is back
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_handlers_can_only_be_installed_from_the_main_thread(tmp_path):
    errors = []

    def make():
        try:
            ckptstore.CheckpointManager(tmp_path / "run", preemption_signals=signal.SIGTERM)
        except ValueError as e:
            errors.append(e)
    t = threading.Thread(target=make)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _big_state(mib: int) -> dict:
    return {"w": torch.randn(mib << 18), "step": 0}


def test_after_a_signal_an_async_save_in_flight_finishes_then_the_next_save_blocks_until_committed(tmp_path):
    with ckptstore.CheckpointManager(tmp_path / "run", async_save=True,
                                     preemption_signals=signal.SIGTERM) as mgr:
        first = mgr.save(1, _big_state(96))
        _signal_self()
        in_flight = not first.done()
        assert mgr.preempted and mgr.should_save(2)
        second = mgr.save(2, _big_state(8))
        # save returned: both are committed, the one in flight first
        assert first.done() and second.done()
        assert in_flight, "the first save was not in flight when the signal came (nothing was tested)"
        assert mgr.steps() == [1, 2]
        for step in (1, 2):
            ckptstore.verify(str(tmp_path / "run" / f"step-{step}"), deep=True)
        assert second.result().nbytes > 0


def test_a_signal_during_a_blocking_save_lets_the_save_complete(tmp_path):
    sent = []
    with ckptstore.CheckpointManager(tmp_path / "run", preemption_signals=signal.SIGTERM) as mgr:
        timer = threading.Timer(0.05, lambda: (sent.append(time.monotonic()), os.kill(os.getpid(), signal.SIGTERM)))
        state = _big_state(256)
        start = time.monotonic()
        timer.start()
        info = mgr.save(3, state)
        end = time.monotonic()
        timer.join()
        assert start < sent[0] < end, "the signal did not arrive during the save (nothing was tested)"
        assert isinstance(info, ckptstore.CheckpointInfo)
        time.sleep(0.01)
        assert mgr.preempted and mgr.should_save(4)
        ckptstore.verify(str(tmp_path / "run" / "step-3"), deep=True)


def test_saves_log_their_time_and_warn_past_the_grace_window(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ckptstore"):
        with ckptstore.CheckpointManager(tmp_path / "a", grace_seconds=1e-6) as mgr:
            mgr.save(1, {"w": torch.ones(4)})
        with ckptstore.CheckpointManager(tmp_path / "b", async_save=True, grace_seconds=3600) as mgr:
            mgr.save(1, {"w": torch.ones(4)}).result()
    text = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(lv == "INFO" and "step 1 saved in" in m for lv, m in text)
    assert any(lv == "WARNING" and "longer than grace_seconds=1e-06" in m for lv, m in text)
    assert any(lv == "INFO" and "blocked training" in m for lv, m in text)
    assert any(lv == "INFO" and "written in the background" in m for lv, m in text)
    assert sum(lv == "WARNING" for lv, _ in text) == 1


# ---------------------------------------------------------------- real SIGTERM to training runs

TRIALS, TOTAL, EVERY, STEP_SLEEP = 20, 600, 50, 0.002


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _preempted_run(manager: Path, delay: float) -> tuple[int, str, float]:
    """Start a training run, SIGTERM it ``delay`` s after its handler is installed; (exit, stdout, s to exit)."""
    p = subprocess.Popen([sys.executable, str(HELPER), "preempt", "--total", str(TOTAL), "--every", str(EVERY),
                          "--step-sleep", str(STEP_SLEEP), "--manager", str(manager)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO))
    try:
        ready = p.stdout.readline()
        assert ready.strip() == "READY", f"the run did not start: {ready!r} {p.stderr.read()[-2000:]}"
        time.sleep(delay)
        p.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = p.communicate(timeout=30)     # GCP's and Kubernetes' default grace window
        return p.returncode, out + err, time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigterm_at_random_instants_saves_the_current_step_and_the_resume_is_bit_identical(tmp_path):
    rng = random.Random(20261203)
    delays = [rng.uniform(0.0, 0.9) for _ in range(TRIALS)]
    full = subprocess.run([sys.executable, str(HELPER), "full", "--total", str(TOTAL), "--out", str(tmp_path / "full")],
                          capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=300)
    assert full.returncode == 0, full.stderr[-4000:]
    dirs, stopped = [], {}
    with cf.ThreadPoolExecutor(2) as pool:      # two runs at a time: each signalled on its own clock
        runs = list(pool.map(lambda a: _preempted_run(tmp_path / f"trial-{a[0]}", a[1]), enumerate(delays)))
    for i, (delay, (code, out, _)) in enumerate(zip(delays, runs)):
        d = tmp_path / f"trial-{i}"
        assert code == 0, f"trial {i} (SIGTERM after {delay:.3f} s) exited {code}:\n{out[-3000:]}"
        line = next(ln for ln in out.splitlines() if ln.startswith("STOPPED"))
        _, step, preempted = line.split()
        step = int(step)
        assert preempted == "1" and 0 < step < TOTAL, f"trial {i}: {line} (the signal must stop training)"
        mgr = ckptstore.CheckpointManager(d, _probe=False)
        # the step it was on is committed, and so is every scheduled step before it
        assert mgr.latest_step() == step, (i, mgr.steps(), step)
        assert mgr.steps() == sorted(set(range(EVERY, step, EVERY)) | {step})
        ckptstore.verify(str(d / f"step-{step}"), deep=True)
        dirs.append(str(d))
        stopped[str(d)] = step
    resumed = subprocess.run([sys.executable, str(HELPER), "resume-many", "--total", str(TOTAL),
                              "--out", str(tmp_path / "resumed"), "--managers", *dirs],
                             capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference = ckptstore.load(tmp_path / "full")
    got = ckptstore.load(tmp_path / "resumed")
    assert len({stopped[d] for d in dirs}) > TRIALS // 2       # the instants spread over the run
    for d in dirs:
        r, k = got[d], stopped[d]
        assert r["start"] == k
        assert r["losses"] == reference["losses"][k:], f"{d}: losses differ after resuming at step {k}"
        assert r["lrs"] == reference["lrs"][k:]
        for name, v in reference["params"].items():
            assert torch.equal(r["params"][name], v), f"{d}: parameter {name} differs after resuming at {k}"
