"""A save killed with SIGKILL at any instant never leaves a torn checkpoint.

Specification: API.md guarantee 1 (atomic commit: "a reader sees a complete
checkpoint or none ... leaves the previous checkpoint at that URI loadable")
and guarantee 5 (leftovers are never mistaken for a checkpoint; `ckptstore gc`
removes them). Real writer processes (helpers/save_loop.py) overwrite one
local checkpoint in a loop and are SIGKILLed at seeded random instants; every
version they write is distinguishable, so a mix of two saves cannot pass.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ckptstore
from helpers.crash import bytes_under, interrupt_a_save, kill_at_random_instants
from helpers.save_loop import check_state, make_state

MEGABYTES = 24  # per version; large enough that a save takes a while, small enough to stay fast
ROUNDS = 36  # SIGKILLs per commit strategy
COMMITS = ["rename", "marker"]


def checkpoint_uri(run_dir: Path, commit: str) -> str:
    plain = str(run_dir / "ckpt")
    return plain if commit == "rename" else plain + "?commit=marker"


def run_gc(directory: Path, grace: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptstore", "gc", str(directory), "--grace", grace],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.mark.parametrize("commit", COMMITS)
def test_sigkill_at_random_instants_leaves_exactly_one_written_version(writers, run_dir, commit):
    uri = checkpoint_uri(run_dir, commit)
    ckptstore.save(make_state(0, MEGABYTES), uri)
    ckptstore.save(make_state(0, MEGABYTES), uri)
    clean_footprint = bytes_under(run_dir)  # what clean overwrites leave on disk

    current, rounds_with_commit, rounds_without_commit = kill_at_random_instants(
        writers, uri, rounds=ROUNDS, seed=f"ckptstore-crash-{commit}", megabytes=MEGABYTES, start_version=0,
        calibrate_commits=4, window_periods=3.0, after_commit_every=6)

    # The seeded delays must really have spread the kills around commits.
    assert rounds_without_commit >= 2 and rounds_with_commit >= 2, (rounds_without_commit, rounds_with_commit)

    # One more writer, killed mid-write, so leftovers certainly exist; then gc.
    committed = interrupt_a_save(writers, uri, run_dir, 30000, MEGABYTES,
                                 kill_above_bytes=bytes_under(run_dir) + 2**20)
    assert committed == []
    gc = run_gc(run_dir)
    assert gc.returncode == 0, gc.stderr
    assert bytes_under(run_dir) <= clean_footprint + 65536, "gc --grace 0 left leftovers behind"
    assert check_state(ckptstore.load(uri)) == current


@pytest.mark.parametrize("commit", COMMITS)
def test_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(writers, run_dir, commit):
    uri = checkpoint_uri(run_dir, commit)
    ckptstore.save(make_state(7, MEGABYTES), uri)
    committed = interrupt_a_save(writers, uri, run_dir, 8, MEGABYTES, kill_above_bytes=bytes_under(run_dir) + 2**20)
    assert committed == []
    assert ckptstore.exists(uri)
    assert check_state(ckptstore.load(uri)) == 7
    assert ckptstore.verify(uri, deep=True).ok


@pytest.mark.parametrize("commit", COMMITS)
def test_save_killed_before_its_first_commit_leaves_no_checkpoint(writers, run_dir, commit):
    uri = checkpoint_uri(run_dir, commit)
    committed = interrupt_a_save(writers, uri, run_dir, 1, MEGABYTES, kill_above_bytes=0)
    assert committed == []
    assert bytes_under(run_dir) > 0, "the killed save left nothing, so nothing was tested"
    assert ckptstore.exists(uri) is False
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ckptstore.load(uri)
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        ckptstore.verify(uri)


@pytest.mark.parametrize("commit", COMMITS)
def test_gc_removes_everything_an_interrupted_first_save_left(writers, run_dir, commit):
    uri = checkpoint_uri(run_dir, commit)
    interrupt_a_save(writers, uri, run_dir, 1, MEGABYTES, kill_above_bytes=2**20)
    gc = run_gc(run_dir)
    assert gc.returncode == 0, gc.stderr
    assert bytes_under(run_dir) == 0
    assert ckptstore.exists(uri) is False


@pytest.mark.parametrize("commit", COMMITS)
def test_gc_with_a_grace_period_keeps_fresh_leftovers(writers, run_dir, commit):
    uri = checkpoint_uri(run_dir, commit)
    ckptstore.save(make_state(3, MEGABYTES), uri)
    interrupt_a_save(writers, uri, run_dir, 4, MEGABYTES, kill_above_bytes=bytes_under(run_dir) + 2**20)
    before = bytes_under(run_dir)
    gc = run_gc(run_dir, grace="3600")
    assert gc.returncode == 0, gc.stderr
    assert bytes_under(run_dir) == before, "gc removed files younger than its grace period"
    assert check_state(ckptstore.load(uri)) == 3
