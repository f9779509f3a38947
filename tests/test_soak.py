"""The Colab-like soak, short version: 3 VM deaths (tests/helpers/soak.py).

Specification: the preemption issue's soak, API.md guarantee 1 on FUSE mounts
and the manager's `restore()` ("the newest checkpoint that verifies"). A real
Jupyter kernel (nbclient, ipykernel) trains and checkpoints through a
CheckpointManager to an rclone mount with a 2 s write-back cache; the harness
kills the kernel and rclone with SIGKILL at seeded random instants, deletes
the cache and remounts; a fresh kernel resumes. `make soak` runs 30 deaths.
"""
from __future__ import annotations

from helpers.backends import RcloneMount
from helpers.soak import run_soak, summary


def test_three_vm_deaths_resume_bit_for_bit_from_the_newest_uploaded_checkpoint(tmp_path):
    RcloneMount.check_tools()
    # Deaths from 1.2x the kernel's start-up time (it varies between kernels) to
    # 5 s after it: in training, where a save is in flight or waiting for upload.
    report = run_soak(tmp_path / "soak", deaths=3, seed=20261203, earliest=1.2, window=5.0)
    text = summary(report)
    print(text)
    assert report.problems == [], text
    assert len(report.deaths) == 3, text
    # Not vacuous: some death lost steps that existed only on the dead VM
    # (saved to the mount, not yet uploaded), and every resume was timed.
    assert any(d.last_step > d.uploaded_step for d in report.deaths), text
    assert len(report.resume_s) >= 2, text
    assert all(d.steps_lost == d.last_step - d.uploaded_step for d in report.deaths), text
