"""kill -9 mid-save on S3, GCS and a FUSE mount: old or new, never a mix.

Specification: API.md guarantee 1 on every backend ("a save that dies at any
instant ... leaves no checkpoint that load, exists or a manager would take as
committed, and leaves the previous checkpoint at that URI loadable"), and
guarantee 5 (`ckptstore gc` removes what the killed saves left). Real writer
processes (helpers/save_loop.py) overwrite one checkpoint on the real server
or mount in a loop and are SIGKILLed at seeded random instants spread over
their commit cadence; every version they write is distinguishable, so a mix
of two saves cannot pass the check.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import ckptstore
from helpers.crash import kill_at_random_instants
from helpers.save_loop import check_state, make_state

MEGABYTES = 20   # several parts per save on object stores (16 MiB parts)
ROUNDS = 10      # SIGKILLs per backend


@pytest.mark.parametrize("backend", ["s3", "gcs", "fuse"])
def test_sigkill_mid_save_on_remote_backends_leaves_old_or_new(writers, request, backend):
    store = request.getfixturevalue(f"{backend}_store")
    uri = store.uri("ckpt")
    ckptstore.save(make_state(0, MEGABYTES), uri)
    current, with_commit, without_commit = kill_at_random_instants(
        writers, uri, rounds=ROUNDS, seed=f"ckptstore-remote-crash-{backend}", megabytes=MEGABYTES,
        start_version=0, calibrate_commits=3, window_periods=2.5)
    # The seeded delays must have landed both before and after commits.
    assert with_commit >= 1 and without_commit >= 1, (with_commit, without_commit)

    # What the killed saves left is recognisable and gc removes it: afterwards
    # only the committed generation remains.
    directory = store.uri_root + store.query
    done = subprocess.run([sys.executable, "-m", "ckptstore", "gc", directory, "--grace", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    left = [p.rsplit("/", 1)[-1] for p in store.files()]
    gens = {name[:25] for name in left if name.endswith((".bin", ".commit", ".tmp", ".claim"))}
    assert len(gens) == 1, f"gc left more than the committed generation: {left}"
    assert ckptstore.verify(uri, deep=True).ok
    assert check_state(ckptstore.load(uri)) == current
