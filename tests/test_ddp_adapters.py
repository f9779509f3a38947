"""The Hugging Face and Lightning adapters under their own multi-process (DDP) strategies.

Specification: docs/distributed.md, the StoreCallback docstring
(ckptstore/integrations/transformers.py) and the Lightning section of
docs/integrations.md. Real processes only, on CPU and gloo:

- Hugging Face: two ranks of tests/helpers/hf_ddp_train.py, started by
  tests/helpers/ranks.py with torchrun's environment; the Trainer forms the
  group itself. StoreCallback opens the multi-rank manager on every rank,
  and every rank takes part in each save. A SIGTERM to one rank makes both
  save the same step and stop.
- Lightning: tests/helpers/lightning_ddp_train.py, started once; with
  ``strategy="ddp"`` Lightning starts rank 1 itself by running the script
  again. Lightning saves on rank 0 only, through StoreCheckpointIO; a second
  two-process fit resumes from ``last.ckpt``.

Everything is then checked here, in one process: what the store holds,
that it verifies, and that it is what the Trainer wrote. Each job is launched
once (module fixtures) and serves several tests, since each launch pays two
imports of torch and transformers or lightning on a small machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptstore
from ckptstore.api import info
from helpers.backends import free_port
from helpers.ranks import RankJob, check_all_succeeded, describe, run_ranks

HELPERS = Path(__file__).resolve().parent / "helpers"
JOB_TIMEOUT = 120.0   # a whole job (imports included) past this is killed

# HF run: 6 steps of 2 ranks x 4 rows (3 steps an epoch), a save every 2, keep_last=2
HF_STEPS, HF_SAVE_STEPS, HF_KEEP_LAST = 6, 2, 2
HF_PREEMPT_STEPS = 60   # 50 ms each at least: a run that ignores SIGTERM reaches the end
LIGHTNING_EPOCHS, LIGHTNING_RESUMED_EPOCHS = 2, 4   # 4 steps an epoch


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def stored_step(store: Path, step: int) -> str:
    return str(store / f"step-{step}")


def manager_steps(store: Path) -> list[int]:
    with ckptstore.CheckpointManager(str(store), _probe=False) as mgr:
        return mgr.steps()


# ---------------------------------------------------------------- Hugging Face, DDP

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """Two ranks train HF_STEPS steps, saving every HF_SAVE_STEPS through StoreCallback(keep_last=2)."""
    base = tmp_path_factory.mktemp("hf-ddp")
    out, store = base / "out", base / "store"
    ranks = run_ranks(HELPERS / "hf_ddp_train.py",
                      [out, store, HF_STEPS, HF_SAVE_STEPS, HF_KEEP_LAST], world_size=2, timeout=JOB_TIMEOUT)
    return out, store, ranks


def test_hf_every_rank_trains_in_one_group_and_saves_every_checkpoint(hf_run):
    _, _, ranks = hf_run
    check_all_succeeded(ranks, "the HF DDP run")
    for r in ranks:
        done = r.result("done")
        assert done["world_size"] == 2, describe(ranks)
        assert done["global_step"] == HF_STEPS
        assert done["saves"] == list(range(HF_SAVE_STEPS, HF_STEPS + 1, HF_SAVE_STEPS))


def test_hf_retention_keeps_the_last_two_steps_and_both_ranks_wrote_them(hf_run):
    out, store, ranks = hf_run
    check_all_succeeded(ranks, "the HF DDP run")
    assert manager_steps(store) == [4, 6]
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("step-")) == ["step-4", "step-6"]
    for step in (4, 6):
        local = files_under(out / f"checkpoint-{step}")
        record = info(stored_step(store, step))
        assert record["writer"]["ranks"] == 2
        assert record["meta"]["step"] == step
        # each file once, though both ranks passed all of them (the output_dir is shared)
        assert record["blobs"] == {"ndarray": len(local)}
        assert record["nbytes"] < 1.5 * sum(len(b) for b in local.values())


def test_hf_each_kept_step_verifies_and_holds_the_trainers_files_byte_for_byte(hf_run):
    out, store, ranks = hf_run
    check_all_succeeded(ranks, "the HF DDP run")
    for step in manager_steps(store):
        uri = stored_step(store, step)
        report = ckptstore.verify(uri, deep=True)
        assert report.ok, report.problems
        local = files_under(out / f"checkpoint-{step}")
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin",
                "rng_state_0.pth", "rng_state_1.pth"} <= set(local)
        for name in ("model.safetensors", "rng_state_0.pth", "rng_state_1.pth"):   # the ranks' own files too
            selected = ckptstore.load(uri, select=("files", name))    # the tree down to that one file
            assert list(selected["files"]) == [name]
            assert bytes(selected["files"][name]) == local[name], name
        # One process reads the whole step: nothing was stored per rank.
        state = ckptstore.load(uri)
        assert state["format"] == "transformers-checkpoint-dir" and state["step"] == step
        assert {name: bytes(data) for name, data in state["files"].items()} == local


def test_hf_restore_checkpoint_in_one_process_writes_back_the_directory_byte_for_byte(hf_run, tmp_path):
    from ckptstore.integrations.transformers import restore_checkpoint
    out, store, ranks = hf_run
    check_all_succeeded(ranks, "the HF DDP run")
    for step in (None, 4):
        path = Path(restore_checkpoint(str(store), tmp_path / f"restored-{step}", step))
        assert path.name == f"checkpoint-{step or HF_STEPS}"
        assert files_under(path) == files_under(out / path.name)


def test_hf_sigterm_to_rank_1_makes_both_ranks_save_the_same_step_and_stop(tmp_path):
    out, store = tmp_path / "out", tmp_path / "store"
    args = [out, store, HF_PREEMPT_STEPS, 4, 2, "preempt"]
    with RankJob(HELPERS / "hf_ddp_train.py", args, world_size=2) as job:
        job.wait_for(1, "STEP 5", timeout=JOB_TIMEOUT)
        at = max(int(line.split()[1]) for line in job.lines(1) if line.startswith("STEP "))   # before the signal
        job.send_signal(1, signal.SIGTERM)
        ranks = job.finish(timeout=JOB_TIMEOUT)
    check_all_succeeded(ranks, "the preempted HF DDP run")
    done = [r.result("done") for r in ranks]
    stopped = {d["global_step"] for d in done}
    assert len(stopped) == 1, f"ranks stopped at {[d['global_step'] for d in done]}:\n{describe(ranks)}"
    step = stopped.pop()
    assert at < step < HF_PREEMPT_STEPS, f"SIGTERM after step {at}, stopped at {step}"
    assert done[0]["saves"] == done[1]["saves"] and done[0]["saves"][-1] == step, done   # saved where it stopped
    assert manager_steps(store)[-1] == step
    report = ckptstore.verify(stored_step(store, step), deep=True)
    assert report.ok, report.problems
    stored = ckptstore.load(stored_step(store, step))
    assert {name: bytes(data) for name, data in stored["files"].items()} == files_under(out / f"checkpoint-{step}")
    assert json.loads(bytes(stored["files"]["trainer_state.json"]))["global_step"] == step


# ---------------------------------------------------------------- Lightning, DDP

def lightning_fit(ckpts: Path, results: Path, epochs: int, resume: Path | None = None) -> list[dict]:
    """One two-process fit of the Lightning helper: the JSON lines every rank reported, in order."""
    results.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(HELPERS / "lightning_ddp_train.py"), str(ckpts), str(results), str(epochs)]
    if resume is not None:
        command.append(str(resume))
    # A session of its own: Lightning starts rank 1 itself, and a job that hangs is killed whole.
    proc = subprocess.Popen(command, env=env, cwd=results, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    reports = [json.loads(line) for f in sorted(results.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]
    assert proc.returncode == 0, f"the Lightning DDP fit exited {proc.returncode}:\n{output[-6000:]}"
    assert {r["rank"] for r in reports if r["kind"] == "done"} == {0, 1}, output[-6000:]
    return reports


def of_kind(reports: list[dict], kind: str, rank: int | None = None) -> list[dict]:
    return [r for r in reports if r["kind"] == kind and (rank is None or r["rank"] == rank)]


def weights_of(report: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in report["weights"].items()}


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """A two-process fit to LIGHTNING_EPOCHS, then a second one resumed from its last.ckpt."""
    base = tmp_path_factory.mktemp("lightning-ddp")
    ckpts = base / "ckpts"
    first = lightning_fit(ckpts, base / "first", LIGHTNING_EPOCHS)
    last_of_first = ckptstore.load(ckpts / "last.ckpt")     # the second fit replaces last.ckpt
    second = lightning_fit(ckpts, base / "second", LIGHTNING_RESUMED_EPOCHS, resume=ckpts / "last.ckpt")
    return ckpts, first, last_of_first, second


def test_lightning_ddp_saves_on_rank_0_only_through_the_plugin_and_each_checkpoint_verifies(lightning_runs):
    ckpts, first, _, _ = lightning_runs
    assert {r["world_size"] for r in of_kind(first, "done")} == {2}
    assert of_kind(first, "save_call", rank=1) == []
    calls = of_kind(first, "save_call", rank=0)
    assert [(Path(c["path"]).name, c["global_step"]) for c in calls] == [
        ("epoch=0-step=4.ckpt", 4), ("last.ckpt", 4), ("epoch=1-step=8.ckpt", 8), ("last.ckpt", 8)]
    for name, step in (("epoch=0-step=4.ckpt", 4), ("epoch=1-step=8.ckpt", 8)):
        path = ckpts / name
        assert path.is_dir() and any(p.suffix == ".commit" for p in path.iterdir())   # a ckptstore checkpoint
        report = ckptstore.verify(path, deep=True)
        assert report.ok, (name, report.problems)
        state = ckptstore.load(path)
        assert state["global_step"] == step and state["epoch"] == step // 4 - 1


def test_lightning_ddp_resumes_from_last_ckpt_on_two_ranks_and_reaches_max_epochs(lightning_runs):
    ckpts, _, last_of_first, second = lightning_runs
    assert last_of_first["global_step"] == 8
    starts = of_kind(second, "start")
    assert sorted(s["rank"] for s in starts) == [0, 1]
    for start in starts:   # both ranks begin where the checkpoint left off, with its weights
        assert (start["global_step"], start["epoch"]) == (8, LIGHTNING_EPOCHS)
        got, want = weights_of(start), last_of_first["state_dict"]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    for done in of_kind(second, "done"):
        assert (done["global_step"], done["epoch"]) == (4 * LIGHTNING_RESUMED_EPOCHS, LIGHTNING_RESUMED_EPOCHS)
    assert of_kind(second, "save_call", rank=1) == []
    assert [Path(c["path"]).name for c in of_kind(second, "save_call", rank=0)] == [
        "epoch=2-step=12.ckpt", "last.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]
    for name, step in (("epoch=2-step=12.ckpt", 12), ("epoch=3-step=16.ckpt", 16), ("last.ckpt", 16)):
        report = ckptstore.verify(ckpts / name, deep=True)
        assert report.ok, (name, report.problems)
        assert ckptstore.load(ckpts / name)["global_step"] == step
