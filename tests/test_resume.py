"""Exact resume: RNG capture/restore, and a stopped-and-resumed run that repeats an uninterrupted one.

The unit tests check `capture_rng_state` / `restore_rng_state` through a real
`ckptstore.save` / `ckptstore.load` round trip. The exact-resume tests run a
small, stochastic training job (dropout, numpy and Python noise, a shuffled
DataLoader with its own generator, AdamW, OneCycleLR) in fresh processes
(tests/helpers/resume_train.py): once for 12 steps straight, and once stopped
after step 5 (mid-epoch) and resumed in another process. Losses, learning
rates and final parameters must be bit-identical.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.rng import RNG_STATE_VERSION, capture_rng_state, restore_rng_state

HELPER = Path(__file__).resolve().parent / "helpers" / "resume_train.py"
REPO = HELPER.parents[2]
TOTAL, STOP = 12, 5  # 6 batches per epoch: the stop falls mid-epoch, the run crosses an epoch boundary


def _draws(n: int = 4) -> dict:
    """The next draws of every global generator (advances them)."""
    return {
        "python": [random.random() for _ in range(n)] + [random.gauss(0, 1) for _ in range(3)],
        "numpy": np.concatenate([np.random.rand(n), np.random.standard_normal(3)]),
        "torch": torch.cat([torch.rand(n), torch.randn(3)]),
        "dropout": torch.nn.functional.dropout(torch.ones(64), 0.5, training=True),
    }


def _assert_same_draws(a: dict, b: dict) -> None:
    assert a["python"] == b["python"]
    assert np.array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])
    assert torch.equal(a["dropout"], b["dropout"])


def _scramble() -> None:
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)


def _half_consumed_gaussians() -> None:
    """Leave a cached Gaussian in Python's random and numpy's legacy generator (the tricky state)."""
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    random.gauss(0, 1)
    np.random.standard_normal()  # odd count: has_gauss = 1
    torch.randn(3)


def _tuples_to_lists(obj):
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _tuples_to_lists(v) for k, v in obj.items()}
    return obj


# --- capture / restore ---------------------------------------------------------------


def test_round_trip_through_save_load_reproduces_the_next_draws(tmp_path):
    _half_consumed_gaussians()
    state = capture_rng_state()
    assert state["version"] == RNG_STATE_VERSION
    assert {"python", "numpy", "torch"} <= set(state)
    assert state["python"][2] is not None and state["numpy"][3] == 1  # a cached Gaussian is part of it
    ckptstore.save({"rng": state}, str(tmp_path / "ckpt"))  # allow_pickle=False: must be the safe format
    expected = _draws()

    _scramble()
    loaded = ckptstore.load(str(tmp_path / "ckpt"))["rng"]
    restore_rng_state(loaded)
    _assert_same_draws(_draws(), expected)

    # restoring is repeatable: the loaded state is not consumed or aliased by a restore
    _scramble()
    restore_rng_state(loaded)
    _assert_same_draws(_draws(), expected)


def test_capture_is_a_copy():
    torch.manual_seed(1)
    state = capture_rng_state()
    before = copy.deepcopy(state)
    _draws()
    assert torch.equal(state["torch"], before["torch"])
    assert np.array_equal(state["numpy"][1], before["numpy"][1])
    assert state["python"] == before["python"]


def test_what_load_returns_for_the_state_types(tmp_path):
    """ckptstore keeps tuples, uint32 arrays, big ints and cached floats as they were."""
    _half_consumed_gaussians()
    state = capture_rng_state()
    ckptstore.save(state, str(tmp_path / "rng"))
    loaded = ckptstore.load(str(tmp_path / "rng"), map_location="cpu")
    assert type(loaded["python"]) is tuple and type(loaded["python"][1]) is tuple
    assert loaded["python"] == state["python"]
    assert type(loaded["numpy"]) is tuple
    assert loaded["numpy"][1].dtype == np.uint32 and np.array_equal(loaded["numpy"][1], state["numpy"][1])
    assert loaded["numpy"][2:] == state["numpy"][2:]
    assert loaded["torch"].dtype == torch.uint8 and loaded["torch"].device.type == "cpu"
    assert torch.equal(loaded["torch"], state["torch"])


def test_restore_accepts_lists_for_tuples_and_arrays_for_tensors():
    _half_consumed_gaussians()
    state = capture_rng_state()
    expected = _draws()
    mangled = _tuples_to_lists(state)
    mangled["python"][1] = np.asarray(mangled["python"][1], dtype=np.int64)
    mangled["numpy"][1] = mangled["numpy"][1].astype(np.int64).tolist()
    mangled["torch"] = state["torch"].numpy()
    _scramble()
    restore_rng_state(mangled)
    _assert_same_draws(_draws(), expected)


def test_numpy_dict_form_round_trips(tmp_path):
    np.random.seed(3)
    np.random.rand(5)
    state = capture_rng_state()
    state["numpy"] = np.random.get_state(legacy=False)  # the dict form
    ckptstore.save(state, str(tmp_path / "rng"))
    expected = np.random.rand(4)
    np.random.seed(0)
    restore_rng_state(ckptstore.load(str(tmp_path / "rng")))
    assert np.array_equal(np.random.rand(4), expected)


def test_missing_entries_are_left_alone():
    torch.manual_seed(5)
    state = capture_rng_state()
    expected = torch.rand(3)
    random.seed(11)
    py_expected = random.random()
    random.seed(11)
    restore_rng_state({"version": RNG_STATE_VERSION, "torch": state["torch"]})
    assert torch.equal(torch.rand(3), expected)
    assert random.random() == py_expected


def test_cuda_entries_without_cuda_restore_the_rest_and_warn(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _half_consumed_gaussians()
    state = capture_rng_state()
    assert "cuda" not in state  # nothing to record without CUDA
    state["cuda"] = [state["torch"].clone(), state["torch"].clone()]  # as if captured on a 2-GPU machine
    expected = _draws()
    _scramble()
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        restore_rng_state(state)
    _assert_same_draws(_draws(), expected)
    assert any("CUDA" in r.getMessage() and r.name == "ckptstore" for r in caplog.records)


def test_unknown_keys_are_ignored_with_a_warning(caplog):
    torch.manual_seed(2)
    state = capture_rng_state()
    expected = torch.rand(4)
    state["jax"] = {"key": np.zeros(2, dtype=np.uint32)}
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        restore_rng_state(state)
    assert torch.equal(torch.rand(4), expected)
    assert any("jax" in r.getMessage() for r in caplog.records)


def test_a_bad_entry_raises_and_changes_nothing():
    state = capture_rng_state()
    state["torch"] = state["torch"].float()  # not a byte tensor
    random.seed(4)
    np.random.seed(4)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(4)
    np.random.seed(4)
    with pytest.raises(TypeError, match="torch"):
        restore_rng_state(state)
    assert random.random() == expected_py and np.random.rand() == expected_np  # python/numpy untouched


def test_newer_version_and_non_dict_are_refused():
    state = capture_rng_state()
    state["version"] = RNG_STATE_VERSION + 1
    with pytest.raises(ValueError, match="newer"):
        restore_rng_state(state)
    with pytest.raises(TypeError):
        restore_rng_state([1, 2, 3])


def _run_all(jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the helper once per job, all at once, each in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, str(HELPER), *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
             for name, args in jobs.items()}
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Outputs of: the uninterrupted run; the first part (saving with ckptstore.save and with a
    CheckpointManager); the resumes from each; and a resume that skips restore_rng_state (the
    control). Two phases of concurrent fresh processes."""
    d = tmp_path_factory.mktemp("resume")
    p = {name: str(d / name) for name in ("ckpt", "mgr", "full", "first", "resume", "mgr_resume", "no_rng")}
    n = ["--total", str(TOTAL)]
    first = ["first", *n, "--stop", str(STOP), "--ckpt", p["ckpt"], "--out", p["first"], "--manager", p["mgr"]]
    phase2 = {"resume": ["resume", *n, "--ckpt", p["ckpt"], "--out", p["resume"]],
              "no_rng": ["resume", *n, "--ckpt", p["ckpt"], "--skip-rng", "--out", p["no_rng"]],
              "mgr_resume": ["resume", *n, "--manager", p["mgr"], "--out", p["mgr_resume"]]}
    procs = _run_all({"full": ["full", *n, "--out", p["full"]], "first": first})
    if procs["first"].returncode == 0:
        procs.update(_run_all(phase2))
    results = {name: ckptstore.load(p[name]) for name, cp in procs.items() if cp.returncode == 0}
    return procs, results


def _result(runs, name: str) -> dict:
    procs, results = runs
    if name not in procs:
        pytest.fail(f"{name} never ran (an earlier process failed)")
    cp = procs[name]
    assert cp.returncode == 0, f"{name} failed (exit {cp.returncode}):\n{cp.stderr[-4000:]}"
    return results[name]


def _assert_bit_identical(full: dict, first: dict, resumed: dict) -> None:
    assert len(first["losses"]) == STOP and len(resumed["losses"]) == TOTAL - STOP
    assert first["losses"] + resumed["losses"] == full["losses"]  # exact float equality, step by step
    assert first["lrs"] + resumed["lrs"] == full["lrs"]
    assert resumed["params"].keys() == full["params"].keys()
    for k, v in full["params"].items():
        assert torch.equal(resumed["params"][k], v), f"parameter {k} differs after resume"
    assert resumed["pos"]["step"] == full["pos"]["step"] == TOTAL
    assert resumed["pos"]["epoch"] == full["pos"]["epoch"]


def test_resumed_run_is_bit_identical_to_uninterrupted(runs):
    _assert_bit_identical(_result(runs, "full"), _result(runs, "first"), _result(runs, "resume"))


def test_resumed_run_via_manager_is_bit_identical(runs):
    _assert_bit_identical(_result(runs, "full"), _result(runs, "first"), _result(runs, "mgr_resume"))


def test_control_without_rng_restore_diverges(runs):
    """The exact-resume test can fail: skipping restore_rng_state changes the dropout masks and noise."""
    full, first, bad = _result(runs, "full"), _result(runs, "first"), _result(runs, "no_rng")
    assert first["losses"] + bad["losses"] != full["losses"]
    assert not all(torch.equal(bad["params"][k], v) for k, v in full["params"].items())
