"""Thinning: old steps of a CheckpointManager run rewritten to hold only part of their state.

Specification: API.md, "Space: fitting a run into the storage a user has" (Thinning) and
"Multi-rank runs" (one deleter); the record a thinned step has is in ckptstore/thin.py.
Every test works on real files (a pytest tmp_path, or fsspec's memory filesystem); the kill
test kills a real process at many instants of a thinning.
"""
from __future__ import annotations

import collections
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.cli import main as cli
from ckptstore.gc import collect
from ckptstore.manager import StepRecord, to_thin
from ckptstore.stores import open_store

MiB = 1 << 20


def make_state(step: int, n: int = 1000) -> dict:
    """A training state: a model (an OrderedDict with _metadata, as state_dict() gives), an
    optimizer twice its size, and a few plain values; the same for the same step."""
    g = torch.Generator().manual_seed(step)
    model = collections.OrderedDict(w=torch.randn(n, generator=g), b=torch.randn(7, generator=g))
    model._metadata = collections.OrderedDict({"": {"version": 1}})
    optim = {"state": {0: {"exp_avg": torch.randn(n, generator=g), "exp_avg_sq": torch.rand(n, generator=g)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    return {"model": model, "optim": optim, "step": step, "rng": torch.randint(0, 255, (16,), generator=g,
                                                                             dtype=torch.uint8)}


def same(a, b) -> bool:
    """Equal values, bit for bit, whatever the containers (tensors by their bytes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def meta_of(uri) -> dict:
    with ckptstore.open(str(uri)) as v:
        return dict(v.info.meta)


def age_commit_records(step_dir: Path, seconds: float) -> None:
    """Make a step look committed ``seconds`` ago (its commit records' mtime is its commit time)."""
    then = time.time() - seconds
    for p in step_dir.glob("*.commit"):
        os.utime(p, (then, then))


# ---------------------------------------------------------------- which steps (unit)

def R(step, t, thinned=None, committed=True):
    return StepRecord(step, committed, t if committed else None, {}, thinned=thinned)


def test_to_thin_takes_every_step_older_than_the_n_newest_by_commit_time():
    records = [R(1, 10.0), R(2, 20.0), R(3, 30.0), R(4, 40.0), R(5, 50.0)]
    assert to_thin(records, thin_after=2) == [1, 2, 3]
    assert to_thin(records, thin_after=5) == []
    assert to_thin(records, thin_after=None) == []
    # by commit time, not by step number
    assert to_thin([R(1, 50.0), R(2, 40.0), R(3, 30.0)], thin_after=1) == [2, 3]
    # a thinned step is not thinned again, but still counts in the order where it was committed
    assert to_thin([R(1, 10.0, ("model",)), R(2, 20.0), R(3, 30.0)], thin_after=1) == [2]
    # never a save in flight, a step being removed, or one not proven committed
    assert to_thin(records, thin_after=2, in_flight={1}) == [2, 3]
    assert to_thin(records, thin_after=2, removed={5}) == [1, 2]
    assert to_thin(records + [R(6, 60.0, committed=False)], thin_after=2) == [1, 2, 3]


def test_thin_after_and_thin_select_are_checked():
    with pytest.raises(ValueError, match="go together"):
        ckptstore.CheckpointManager("memory://x", thin_after=2)
    with pytest.raises(ValueError, match="go together"):
        ckptstore.CheckpointManager("memory://x", thin_select="model")
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="thin_after"):
            ckptstore.CheckpointManager("memory://x", thin_after=bad, thin_select="model")
    for bad in ([], (), [()], [1.5]):
        with pytest.raises(ValueError, match="thin_select"):
            ckptstore.CheckpointManager("memory://x", thin_after=1, thin_select=bad)


# ---------------------------------------------------------------- what a thinned step is

def test_old_steps_keep_only_the_model_and_still_list_load_verify_and_export(tmp_path):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), thin_after=2, thin_select="model") as mgr:
        for s in range(1, 6):
            mgr.save(s, make_state(s), metrics={"loss": 1.0 / s})
        assert mgr.steps() == [1, 2, 3, 4, 5]
        assert mgr.latest_step() == 5
    for s in (1, 2, 3):
        uri = d / f"step-{s}"
        got = ckptstore.load(str(uri))
        assert list(got) == ["model"] and same(got["model"], make_state(s)["model"])
        assert got["model"]._metadata == {"": {"version": 1}}      # the model is kept whole
        meta = meta_of(uri)
        assert meta["thinned"] == ["model"] and meta["step"] == s and meta["metrics"] == {"loss": 1.0 / s}
        assert set(meta["thinned_from"]) == {"generation", "time"}
        part = ckptstore.load(str(uri), select=("model", "w"))
        assert list(part["model"]) == ["w"] and torch.equal(part["model"]["w"], make_state(s)["model"]["w"])
        with pytest.raises(KeyError):
            ckptstore.load(str(uri), select="optim")
        rep = ckptstore.verify(str(uri), deep=True)
        assert rep.ok, rep.problems
        # one generation: the whole one is gone, and with it the optimizer's bytes
        assert len(list(uri.glob("*.commit"))) == 1
        assert sum(p.stat().st_size for p in uri.glob("*.bin")) < 4 * 1010 + 64 * 3
    for s in (4, 5):
        assert same(ckptstore.load(str(d / f"step-{s}")), make_state(s))
        assert "thinned" not in meta_of(d / f"step-{s}")
    out = tmp_path / "model.safetensors"
    ckptstore.export(str(d / "step-1"), str(out), select="model")
    from safetensors.torch import load_file
    exported = load_file(str(out))
    assert set(exported) == {"w", "b"} and torch.equal(exported["w"], make_state(1)["model"]["w"])


def test_several_paths_nested_ones_and_lists_on_the_way(tmp_path):
    d = tmp_path / "run"
    sel = ["model", ("optim", "param_groups"), ("optim", "state", 0, "exp_avg")]
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select=sel) as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
    full = make_state(1)
    got = ckptstore.load(str(d / "step-1"))
    assert same(got, {"model": full["model"],
                      "optim": {"state": {0: {"exp_avg": full["optim"]["state"][0]["exp_avg"]}},
                                "param_groups": full["optim"]["param_groups"]}})
    assert meta_of(d / "step-1")["thinned"] == ["model", "optim/param_groups", "optim/state/0/exp_avg"]
    assert ckptstore.verify(str(d / "step-1"), deep=True).ok
    # a list on the way keeps its length, the items not kept are None (as load(select=) gives)
    lists = tmp_path / "lists"
    with ckptstore.CheckpointManager(str(lists), thin_after=1, thin_select=[("xs", 1)]) as mgr:
        mgr.save(1, {"xs": [torch.ones(3), torch.zeros(5), "c"], "y": torch.ones(2)})
        mgr.save(2, {"xs": [], "y": torch.ones(2)})
    assert same(ckptstore.load(str(lists / "step-1")), {"xs": [None, torch.zeros(5), None]})
    assert ckptstore.verify(str(lists / "step-1"), deep=True).ok


def test_a_step_that_holds_none_of_thin_select_stays_whole_with_a_warning(tmp_path, caplog):
    d = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select=["model", "ema"]) as mgr:
        mgr.save(1, {"weights": torch.ones(4), "optim": torch.ones(8)})
        mgr.save(2, make_state(2))
        mgr.save(3, make_state(3))
        mgr.save(4, make_state(4))
    assert "thinned" not in meta_of(d / "step-1")
    assert same(ckptstore.load(str(d / "step-1")), {"weights": torch.ones(4), "optim": torch.ones(8)})
    said = [r.getMessage() for r in caplog.records if "step 1 was not thinned" in r.getMessage()]
    assert len(said) == 1 and "holds none of model, ema" in said[0], said   # once, not at every save
    # thinned to what of thin_select it holds, saying what it lacks
    assert meta_of(d / "step-2")["thinned"] == ["model"]
    assert any("step 2 was thinned to model; it holds no ema" in r.getMessage() for r in caplog.records)


def test_many_small_tensors_and_a_big_one_are_copied_bit_for_bit(tmp_path):
    d = tmp_path / "run"
    g = torch.Generator().manual_seed(0)
    model = {f"layer{i}.{k}": torch.randn(int(torch.randint(0, 300, (1,), generator=g)), generator=g)
             for i in range(100) for k in ("bias", "norm")}
    model["embed"] = torch.randn(3 * MiB // 4, generator=g)            # spans several read pieces
    model["half"] = torch.randn(1001, generator=g).to(torch.bfloat16)
    model["tied"] = model["embed"][:10]                                  # a view: its storage is kept once
    state = {"optim": {k: torch.ones(3) for k in range(50)}, "model": model}
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model",
                                     storage_options={"part_size": "1MiB"}) as mgr:
        mgr.save(1, state)
        mgr.save(2, {"model": {}})
    got = ckptstore.load(str(d / "step-1"))
    assert same(got, {"model": model})
    assert got["model"]["tied"].untyped_storage().data_ptr() == got["model"]["embed"].untyped_storage().data_ptr()
    assert len(list((d / "step-1").glob("*.bin"))) == 4                  # 3 MiB + a little, in 1 MiB files
    assert ckptstore.verify(str(d / "step-1"), deep=True).ok


def test_a_step_whose_kept_bytes_fail_their_checksum_is_not_thinned(tmp_path, caplog):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d)) as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
    corrupt_step(d / "step-1")
    before = sorted(os.listdir(d / "step-1"))
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model") as mgr:
        assert mgr.prune() == []
        assert mgr.prune() == []
    said = [r.getMessage() for r in caplog.records if "step 1 was not thinned" in r.getMessage()]
    assert len(said) == 1 and "CRC-32C" in said[0], said
    assert sorted(os.listdir(d / "step-1")) == before          # nothing of the attempt is left
    assert "thinned" not in meta_of(d / "step-1")


# ---------------------------------------------------------------- its place in the run

def test_a_thinned_step_keeps_its_place_for_keep_last_latest_step_and_max_age(tmp_path):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d)) as mgr:
        for s in range(1, 5):
            mgr.save(s, make_state(s))
    age_commit_records(d / "step-1", 2000)
    age_commit_records(d / "step-2", 1900)
    with ckptstore.CheckpointManager(str(d), thin_after=2, thin_select="model") as mgr:
        assert mgr.prune() == []
    assert meta_of(d / "step-1")["thinned"] == ["model"] and meta_of(d / "step-2")["thinned"] == ["model"]
    # thinning rewrote steps 1 and 2 just now; they are still the oldest
    fresh = ckptstore.CheckpointManager(str(d))
    assert fresh.latest_step() == 4
    assert fresh.restore()["step"] == 4
    assert ckptstore.CheckpointManager(str(d), max_age=1000).prune(dry_run=True) == [1, 2]
    assert ckptstore.CheckpointManager(str(d), keep_last=3).prune() == [1]
    assert ckptstore.CheckpointManager(str(d)).steps() == [2, 3, 4]


def test_thinning_runs_with_retention_and_counts_only_kept_steps(tmp_path):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), keep_last=3, thin_after=1, thin_select="model") as mgr:
        for s in range(1, 7):
            mgr.save(s, make_state(s))
            kept = mgr.steps()
            assert kept == list(range(max(1, s - 2), s + 1))
            assert [("thinned" in meta_of(d / f"step-{k}")) for k in kept] == [True] * (len(kept) - 1) + [False]
        assert mgr.latest_step() == 6


def test_on_the_memory_filesystem_too(tmp_path):
    uri = f"memory://ckptstore-tests/{uuid.uuid4().hex}/run"
    with ckptstore.CheckpointManager(uri, keep_last=3, thin_after=1, thin_select="model") as mgr:
        for s in range(1, 5):
            mgr.save(s, make_state(s))
        assert mgr.steps() == [2, 3, 4] and mgr.latest_step() == 4
        assert same(mgr.restore(), make_state(4))
        assert same(mgr.restore(step=2), {"model": make_state(2)["model"]})
        assert ckptstore.verify(f"{uri}/step-2", deep=True).ok


# ---------------------------------------------------------------- restore

def corrupt_step(step_dir: Path) -> None:
    """Flip a bit of the model's weights (the first blob of make_state's states)."""
    data = min(step_dir.glob("*.bin"))
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))


def test_restore_of_the_whole_state_never_takes_a_thinned_step_without_saying_so(tmp_path, caplog):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model") as mgr:
        mgr.save(1, {"weights": torch.ones(4), "step": 1})    # holds no model: stays whole
        mgr.save(2, make_state(2))
        mgr.save(3, make_state(3))
        mgr.save(4, make_state(4))
    assert "thinned" in meta_of(d / "step-2") and "thinned" in meta_of(d / "step-3")
    corrupt_step(d / "step-4")
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with ckptstore.CheckpointManager(str(d)) as mgr:
        got = mgr.restore()
    assert same(got, {"weights": torch.ones(4), "step": 1})
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 4 does not verify" in m for m in said), said
    assert any("step 3 was thinned to model; skipped" in m for m in said), said
    assert any("step 2 was thinned to model; skipped" in m for m in said), said
    # a selection inside what was kept: the newest step that verifies and holds it, thinned or not
    caplog.clear()
    with ckptstore.CheckpointManager(str(d)) as mgr:
        got = mgr.restore(select="model")
        assert same(got, {"model": make_state(3)["model"]})
        got = mgr.restore(select=("model", "w"))
        assert torch.equal(got["model"]["w"], make_state(3)["model"]["w"])
        into = {"model": collections.OrderedDict(w=torch.empty(1000), b=torch.empty(7))}
        got = mgr.restore(select="model", into=into)
        assert got["model"]["w"] is into["model"]["w"] and torch.equal(into["model"]["w"], make_state(3)["model"]["w"])
    assert not any("was thinned" in r.getMessage() for r in caplog.records)


def test_restore_step_n_returns_what_that_step_holds(tmp_path, caplog):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model") as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
        caplog.set_level(logging.WARNING, logger="ckptstore")
        assert same(mgr.restore(step=1), {"model": make_state(1)["model"]})
        assert same(mgr.restore(step=2), make_state(2))
        with pytest.raises(KeyError):
            mgr.restore(step=1, select="optim")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_when_every_step_is_thinned_restore_raises_rather_than_start_a_run_over(tmp_path, caplog):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model") as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
    corrupt_step(d / "step-2")
    caplog.set_level(logging.WARNING, logger="ckptstore")
    with ckptstore.CheckpointManager(str(d)) as mgr:
        with pytest.raises(ckptstore.CorruptCheckpointError, match=r"(?s)step 2.*thinned step\(s\).*step 1"):
            mgr.restore()
        assert same(mgr.restore(select="model"), {"model": make_state(1)["model"]})
    shutil.rmtree(d / "step-2")
    caplog.clear()
    with ckptstore.CheckpointManager(str(d)) as mgr:
        # steps exist: None would tell a training script to start from scratch over them
        with pytest.raises(ckptstore.CheckpointError, match="every committed step was thinned") as e:
            mgr.restore()
        assert not isinstance(e.value, ckptstore.CorruptCheckpointError)
        assert same(mgr.restore(select="model"), {"model": make_state(1)["model"]})
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "step 1 was thinned to model; skipped" in said


# ---------------------------------------------------------------- incremental runs

def big_state(step: int) -> dict:
    """A model of 1 MiB and an optimizer of 2 x 2 MiB: with 1 MiB data files, the optimizer's
    bytes fill files of their own."""
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(MiB // 4, generator=g)},
            "optim": {"m": torch.randn(2 * MiB // 4, generator=g), "v": torch.rand(2 * MiB // 4, generator=g)},
            "step": step}


def test_incremental_thinning_writes_no_data_and_the_sweep_frees_what_only_the_optimizer_used(tmp_path):
    d = tmp_path / "run"
    opts = {"part_size": "1MiB"}
    with ckptstore.CheckpointManager(str(d), incremental=True, storage_options=opts) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, big_state(s))
    shared = d / ".shared"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in shared.iterdir()}
    steps_before = {p.name: p.read_bytes() for p in (d / "step-1").iterdir()}
    with ckptstore.CheckpointManager(str(d), incremental=True, storage_options=opts, thin_after=1,
                                     thin_select="model") as mgr:
        mgr.prune()
        after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in shared.iterdir()}
        # no byte written: every shared file left is one that was there, untouched
        assert set(after) < set(before) and all(after[n] == before[n] for n in after)
        freed = sum(before[n][0] for n in set(before) - set(after))
        assert freed >= 2 * 4 * MiB - 2 * MiB, freed      # most of steps 1 and 2's optimizers
        # the step directories hold only commit records, one each
        for s in (1, 2):
            names = os.listdir(d / f"step-{s}")
            assert len(names) == 1 and names[0].endswith(".commit") and names[0] not in steps_before
            assert meta_of(d / f"step-{s}")["thinned"] == ["model"]
            assert same(ckptstore.load(str(d / f"step-{s}")), {"model": big_state(s)["model"]})
            assert ckptstore.verify(str(d / f"step-{s}"), deep=True).ok
        # a later save with bytes only a thinned-away optimizer held writes them again
        again = big_state(4)
        again["optim"] = big_state(1)["optim"]
        mgr.save(4, again)
        assert same(mgr.restore(), again)
        for s in (1, 2, 3, 4):
            assert ckptstore.verify(str(d / f"step-{s}"), deep=True).ok
    assert cli(["gc", "--grace", "0", str(d)]) == 0
    for s, want in ((1, {"model": big_state(1)["model"]}), (4, again)):
        assert same(ckptstore.load(str(d / f"step-{s}")), want)


def test_an_incremental_run_that_thins_keeps_the_selected_bytes_in_files_of_their_own(tmp_path):
    """Without part_size a save is one data file on a local disk; a manager that thins writes
    the thin_select values' bytes and the rest to separate files, so that thinning frees the
    optimizer's bytes whatever the file size."""
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), incremental=True, thin_after=1, thin_select="model") as mgr:
        for s in (1, 2, 3):
            mgr.save(s, big_state(s))
        # the manager's sweep after thinning freed steps 1 and 2's optimizers: three models and
        # one optimizer are left (15 MiB were written)
        shared = d / ".shared"
        left = sum(p.stat().st_size for p in shared.iterdir() if p.suffix == ".bin")
        assert left <= 3 * MiB + 4 * MiB + 1024, left
        for s in (1, 2):
            assert same(ckptstore.load(str(d / f"step-{s}")), {"model": big_state(s)["model"]})
            assert ckptstore.verify(str(d / f"step-{s}"), deep=True).ok
        assert same(mgr.restore(), big_state(3))


# ---------------------------------------------------------------- async saves

def test_with_async_save_thinning_is_done_when_wait_returns(tmp_path):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), async_save=True, thin_after=1, thin_select="model") as mgr:
        for s in range(1, 4):
            h = mgr.save(s, make_state(s))
            mgr.wait()
            assert h.result().meta["step"] == s
            for k in range(1, s):
                assert meta_of(d / f"step-{k}")["thinned"] == ["model"]
            assert "thinned" not in meta_of(d / f"step-{s}")
        assert same(mgr.restore(), make_state(3))


def test_with_compression_the_kept_blobs_stay_as_stored(tmp_path):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), compression="zstd", thin_after=1, thin_select="model") as mgr:
        for s in (1, 2):
            st = make_state(s, n=100_000)
            st["model"]["z"] = torch.zeros(50_000)           # compresses
            mgr.save(s, st)
    got = ckptstore.load(str(d / "step-1"))
    want = make_state(1, n=100_000)["model"]
    want["z"] = torch.zeros(50_000)
    assert same(got["model"], want) and list(got) == ["model"]
    assert ckptstore.verify(str(d / "step-1"), deep=True).ok


# ---------------------------------------------------------------- command line

def test_ls_names_thinned_steps(tmp_path, capsys):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), thin_after=1, thin_select="model") as mgr:
        for s in (1, 2):
            mgr.save(s, make_state(s))
    capsys.readouterr()
    assert cli(["ls", str(d)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["step-1"].endswith("ok, thinned to model") and rows["step-2"].endswith("ok"), rows


def test_cli_prune_thins_and_dry_run_says_what_it_would_thin(tmp_path, capsys):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d)) as mgr:
        for s in range(1, 5):
            mgr.save(s, make_state(s))
    assert cli(["prune", str(d), "--thin-after", "2", "--thin-select", "model", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 0 step(s)" in out and "would thin 2 step(s): 1, 2 to model" in out, out
    assert all("thinned" not in meta_of(d / f"step-{s}") for s in range(1, 5))
    assert cli(["prune", str(d), "--keep-last", "3", "--thin-after", "1", "--thin-select", "model",
                "--thin-select", "optim/state/0/exp_avg"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 step(s): 1" in out and "thinned 2 step(s): 2, 3 to model, optim/state/0/exp_avg" in out, out
    got = ckptstore.load(str(d / "step-2"))
    assert same(got, {"model": make_state(2)["model"],
                      "optim": {"state": {0: {"exp_avg": make_state(2)["optim"]["state"][0]["exp_avg"]}}}})
    assert meta_of(d / "step-2")["thinned"] == ["model", "optim/state/0/exp_avg"]
    assert same(ckptstore.load(str(d / "step-4")), make_state(4))


@pytest.mark.parametrize("args", [
    ["--thin-after", "1"],
    ["--thin-select", "model"],
    ["--thin-after", "0", "--thin-select", "model"],
    ["--thin-after", "1", "--thin-select", "/"],
    [],
])
def test_cli_prune_usage_errors_exit_2(tmp_path, capsys, args):
    d = tmp_path / "run"
    ckptstore.CheckpointManager(str(d)).save(1, make_state(1))
    assert cli(["prune", str(d), *args]) == 2
    assert "error" in capsys.readouterr().err
    assert "thinned" not in meta_of(d / "step-1")


# ---------------------------------------------------------------- kill -9

CHILD = textwrap.dedent("""
    import sys
    import ckptstore
    mgr = ckptstore.CheckpointManager(sys.argv[1], thin_after=1, thin_select="model",
                                      incremental=sys.argv[2] == "1")
    print("ready", flush=True)
    mgr.prune()
    print("done", flush=True)
""")


def kill_state(step: int, big: bool) -> dict:
    g = torch.Generator().manual_seed(step)
    n = (3 * MiB if big else MiB // 8) // 4
    return {"model": {"w": torch.randn(n, generator=g), "b": torch.randn(n // 3, generator=g)},
            "optim": {"m": torch.randn(n, generator=g), "v": torch.randn(2 * n, generator=g)}, "step": step}


def check_whole_or_thinned(d: Path, steps, big: bool) -> tuple[int, int]:
    whole = thinned = 0
    for s in steps:
        uri = str(d / f"step-{s}")
        with ckptstore.open(uri) as v:
            meta, got = dict(v.info.meta), v.load()
        want = kill_state(s, big)
        if "thinned" in meta:
            assert meta["thinned"] == ["model"] and meta["step"] == s
            assert same(got, {"model": want["model"]}), f"step {s} thinned, but not to the model's values"
            thinned += 1
        else:
            assert same(got, want), f"step {s} neither whole nor thinned"
            whole += 1
    return whole, thinned


@pytest.mark.parametrize("incremental", [False, True], ids=["own-files", "incremental"])
def test_kill_9_at_any_instant_of_a_thinning_leaves_each_step_whole_or_thinned(tmp_path, incremental):
    big = not incremental      # an incremental thinning writes no data: small steps do
    template = tmp_path / "template"
    steps = [1, 2, 3, 4]
    with ckptstore.CheckpointManager(str(template), incremental=incremental) as mgr:
        for s in steps:
            mgr.save(s, kill_state(s, big))
    env = dict(os.environ, PYTHONPATH=str(Path(ckptstore.__file__).resolve().parent.parent))

    def start(d: Path) -> tuple[subprocess.Popen, float]:
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(d), "1" if incremental else "0"],
                             stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        return p, time.monotonic()

    # how long a whole thinning takes here: the kills fall from its start to its end
    ref = tmp_path / "ref"
    shutil.copytree(template, ref)
    p, t0 = start(ref)
    assert p.stdout is not None and p.stdout.readline().strip() == "done"
    span = time.monotonic() - t0
    assert p.wait(timeout=120) == 0
    assert check_whole_or_thinned(ref, steps, big) == (1, 3)

    rng = random.Random(1234)
    kills = 8 if not incremental else 5
    delays = sorted(rng.uniform(0, span) for _ in range(kills - 1)) + [0.0]
    for k, delay in enumerate(delays):
        d = tmp_path / f"kill{k}"
        shutil.copytree(template, d)
        p, t0 = start(d)
        time.sleep(max(0.0, delay - (time.monotonic() - t0)))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        check_whole_or_thinned(d, steps, big)
        # what the killed thinning left: the next one finishes the job; gc then leaves only what is committed
        with ckptstore.CheckpointManager(str(d), incremental=incremental, thin_after=1, thin_select="model") as mgr:
            mgr.prune()
        assert check_whole_or_thinned(d, steps, big) == (1, 3)
        assert cli(["gc", "--grace", "0", str(d)]) == 0
        for s in steps:
            rep = ckptstore.verify(str(d / f"step-{s}"), deep=True)
            assert rep.ok, rep.problems
        assert not collect(open_store(str(d)), grace=0, dry_run=True)
        for s in steps:
            # only the committed generation's files
            names = os.listdir(d / f"step-{s}")
            assert len({n[:25] for n in names}) == 1 and len([n for n in names if n.endswith(".commit")]) == 1, names
        shutil.rmtree(d)


# ---------------------------------------------------------------- several ranks

RANK_WORKER = textwrap.dedent("""
    import datetime, json, logging, os, sys
    import torch
    import torch.distributed as dist
    import ckptstore

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    seen = []
    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    logging.getLogger("ckptstore").addHandler(Seen(logging.WARNING))

    def state(step):
        g = torch.Generator().manual_seed(step)
        return {"model": {"w": torch.randn(1000, generator=g)}, "optim": {"m": torch.randn(2000, generator=g)},
                "step": step, "mine": torch.full((3,), float(rank))}

    with ckptstore.CheckpointManager(sys.argv[1], thin_after=1, thin_select="model", collective_timeout=60) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, state(s))
        full = mgr.restore()
        one = mgr.restore(step=1)
        print("RESULT " + json.dumps({
            "rank": rank, "steps": mgr.steps(), "full_step": full["step"],
            "full_mine": full["mine"].tolist(), "one_keys": sorted(one),
            "one_model": torch.equal(one["model"]["w"], state(1)["model"]["w"]),
            "warnings": [m for m in seen if "thinned" in m or "not thinned" in m]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


def test_on_two_ranks_one_process_thins_and_every_rank_restores_the_same_step(tmp_path):
    from helpers.ranks import check_all_succeeded, run_ranks
    worker = tmp_path / "worker.py"
    worker.write_text(RANK_WORKER)
    d = tmp_path / "run"
    ranks = run_ranks(worker, [str(d)], world_size=2, timeout=180)
    check_all_succeeded(ranks, "the two-rank thinning job")
    for r in ranks:
        (res,) = r.results
        assert res["steps"] == [1, 2, 3] and res["full_step"] == 3 and res["full_mine"] == [float(r.rank)] * 3
        assert res["one_keys"] == ["model"] and res["one_model"] and not res["warnings"], res
    for s in (1, 2):
        assert meta_of(d / f"step-{s}")["thinned"] == ["model"]
        got = ckptstore.load(str(d / f"step-{s}"))       # a single process: the per-rank value is gone
        assert list(got) == ["model"]
        assert ckptstore.verify(str(d / f"step-{s}"), deep=True).ok
    assert "thinned" not in meta_of(d / "step-3")


def test_on_a_mount_the_whole_generation_goes_once_the_thinned_one_has_settled(fuse_store):
    """A mount keeps a checkpoint's previous generation while the new one may still be
    uploading; a thinned step's whole state then goes after upload_settle_seconds, so thinning
    frees its bytes on a Drive too."""
    run = fuse_store.uri("run")
    d = Path(run)
    with ckptstore.CheckpointManager(run, thin_after=1, thin_select="model", upload_settle_seconds=0.5) as mgr:
        mgr.save(1, make_state(1))
        mgr.save(2, make_state(2))
        names = lambda: sorted(n for n in os.listdir(d / "step-1") if n.endswith(".commit"))
        assert len(names()) == 2                     # whole and thinned: the whole one is the net
        time.sleep(0.6)
        mgr.prune()
        assert len(names()) == 1 and meta_of(d / "step-1")["thinned"] == ["model"]
        assert same(ckptstore.load(str(d / "step-1")), {"model": make_state(1)["model"]})
        assert same(mgr.restore(), make_state(2))
