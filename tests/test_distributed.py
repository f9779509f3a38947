"""The multi-rank CheckpointManager, with real ranks.

Specification: API.md, "Multi-rank runs (torch.distributed)". Every test
starts real processes (tests/helpers/manager_worker.py, launched by
tests/helpers/ranks.py) that form a gloo group on loopback and construct the
manager on every rank; each rank reports what it saw as ``RESULT {json}``
lines and the test decides. Where several checks need the same job, one
launch serves them (module fixtures), because each launch pays four torch
imports on a small machine.

What is checked, in API.md's words:
- what a rank passes: DTensors (1-D and 2-D meshes, uneven shards) saved as
  global tensors, DDP replicas stored once, per-rank values kept per rank;
- restore at any world size (4, 2 and one process without a group),
  in place, bit-exact; per-rank values only at the same world size;
- a single process reads, verifies and refuses the multi-rank step;
- one commit: a failure in any phase of one rank's part, or a SIGKILL at a
  random instant of it (local disk and S3), fails the save on every rank
  naming that rank, within collective_timeout, commits nothing, and gc
  removes what it wrote;
- agreement: a SIGTERM to any one rank makes every rank save the same step,
  and a resumed run is bit for bit the uninterrupted one; one rank's corrupt
  part makes every rank fall back to the same step;
- one deleter (keep_last over four ranks), async saves between training
  collectives.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptstore
from helpers.manager_worker import PHASES, TIMEOUT, layout_globals
from helpers.ranks import RankJob, check_all_succeeded, describe, run_ranks

WORKER = Path(__file__).resolve().parent / "helpers" / "manager_worker.py"
SLACK = 30.0         # seconds past collective_timeout after which a rank counts as hung
JOB_TIMEOUT = 120.0  # a whole job (torch imports included) past this is killed
PER_RANK = ("rng", "loader", "mine")   # the per-rank paths of the layout state


def named_ranks(message: str) -> set[int]:
    """The rank numbers an error message names ("rank 1", "ranks 1, 3", "ranks [1, 3]", "rank(s) 2")."""
    found: set[int] = set()
    for m in re.finditer(r"\branks?(?:\(s\))?\s*[:=#]?\s*[\[({]?\s*(\d+(?:\s*(?:,|and|&)\s*\d+)*)",
                         message, re.IGNORECASE):
        found |= {int(x) for x in re.findall(r"\d+", m.group(1))}
    return found


def files_in(directory: str, fs=None) -> list[str]:
    """Every file under ``directory`` (a local path, or a path on ``fs``), relative to it."""
    if fs is not None:
        root = directory.split("://", 1)[-1].rstrip("/")
        if not fs.exists(root):
            return []
        return sorted(p[len(root) + 1:] for p in fs.find(root))
    out = []
    for where, _dirs, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(where, n), directory) for n in names]
    return sorted(out)


def step_files(directory: str, step: int, fs=None) -> list[str]:
    return [f for f in files_in(directory, fs) if f.startswith(f"step-{step}/")]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptstore", *args], capture_output=True, text=True, timeout=120)


def option_args(options: dict | None) -> list[str]:
    return [a for k, v in (options or {}).items() for a in ("-o", f"{k}={v}")]


def results_of(ranks, kind: str) -> list[dict]:
    return [r.result(kind) for r in ranks]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def test_the_launcher_forms_one_gloo_job_of_real_processes():
    ranks = run_ranks(WORKER, ["ping"], world_size=2, timeout=JOB_TIMEOUT)
    check_all_succeeded(ranks, "ping")
    assert [r["sum"] for r in results_of(ranks, "ping")] == [1.0, 1.0]


# ---------------------------------------------------------------- what a rank passes, read back anywhere

@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """Four ranks saved step 7 of manager_worker.layout_state, then restored it (in the same job)."""
    directory = str(tmp_path_factory.mktemp("layout") / "run")
    ranks = run_ranks(WORKER, ["layout", directory], world_size=4, timeout=JOB_TIMEOUT)
    return directory, ranks


def test_four_ranks_restore_their_shards_in_place_and_the_global_tensors_without_into(layout_run):
    directory, ranks = layout_run
    check_all_succeeded(ranks, "the layout job")
    for r in results_of(ranks, "layout"):
        assert r["steps"] == [7] and r["latest"] == 7, r
        assert r["problems"] == [], f"rank {r['rank']}: {r['problems']}"


def test_a_single_process_loads_and_verifies_the_global_tensors_of_a_multi_rank_step(layout_run):
    directory, ranks = layout_run
    step = f"{directory}/step-7"
    assert ckptstore.exists(step), describe(ranks)
    model = ckptstore.load(step, select="model")["model"]
    for name, g in layout_globals().items():
        assert same_bits(model[name], g), name
    report = ckptstore.verify(step, deep=True)
    assert report.ok, report.problems
    done = cli("verify", "--deep", step)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_multi_rank_step_exports_its_global_tensors_to_safetensors(layout_run, tmp_path):
    from safetensors.torch import load_file

    directory, ranks = layout_run
    step = f"{directory}/step-7"
    assert ckptstore.exists(step), describe(ranks)
    ckptstore.export(step, tmp_path / "model.safetensors", select="model")
    exported = load_file(str(tmp_path / "model.safetensors"))
    wanted = {name: g for name, g in layout_globals().items()}
    assert set(exported) == set(wanted)
    for name, g in wanted.items():
        assert same_bits(exported[name], g), name


def test_a_single_process_loading_the_whole_step_is_told_which_values_are_per_rank(layout_run):
    directory, ranks = layout_run
    assert ckptstore.exists(f"{directory}/step-7"), describe(ranks)
    with pytest.raises(ValueError) as e:
        ckptstore.load(f"{directory}/step-7")
    assert any(p in str(e.value) for p in PER_RANK), str(e.value)


def test_values_equal_on_every_rank_are_stored_once(layout_run):
    directory, ranks = layout_run
    assert ckptstore.exists(f"{directory}/step-7"), describe(ranks)
    replica = layout_globals()["ddp"]
    one_copy = replica.numel() * replica.element_size()   # 1 MiB; everything else is a few KiB
    stored = sum(os.path.getsize(os.path.join(directory, f)) for f in step_files(directory, 7))
    assert one_copy <= stored < 1.5 * one_copy, f"{stored} bytes stored for a {one_copy}-byte replica on 4 ranks"


def test_two_ranks_restore_a_four_rank_step_resharded_and_refuse_its_per_rank_values(layout_run):
    directory, _ = layout_run
    assert ckptstore.exists(f"{directory}/step-7")
    ranks = run_ranks(WORKER, ["reshard", directory], world_size=2, timeout=JOB_TIMEOUT)
    check_all_succeeded(ranks, "the two-rank restore")
    for r in results_of(ranks, "reshard"):
        assert r["latest"] == 7, r
        assert r["problems"] == [], f"rank {r['rank']}: {r['problems']}"
        refused = r["refused"]
        assert refused is not None, f"rank {r['rank']}: restore() of per-rank values at another world size worked"
        assert not refused.get("not_value_error"), f"rank {r['rank']}: {refused}"
        assert any(p in refused["message"] for p in PER_RANK), refused["message"]


def test_one_process_without_a_group_restores_a_four_rank_step_into_global_tensors(layout_run):
    directory, ranks = layout_run
    assert ckptstore.exists(f"{directory}/step-7"), describe(ranks)
    into = {name: torch.zeros_like(g) for name, g in layout_globals().items()}
    ptrs = {name: t.data_ptr() for name, t in into.items()}
    with ckptstore.CheckpointManager(directory) as mgr:
        assert mgr.latest_step() == 7
        got = mgr.restore(select="model", into={"model": into})
        with pytest.raises(ValueError) as e:
            mgr.restore()
    assert any(p in str(e.value) for p in PER_RANK), str(e.value)
    for name, g in layout_globals().items():
        assert got["model"][name] is into[name], name
        assert into[name].data_ptr() == ptrs[name], name
        assert same_bits(into[name], g), name


# ---------------------------------------------------------------- one commit: a rank that fails

@pytest.fixture(scope="module")
def inject_run(tmp_path_factory):
    """Four ranks: step 1, then per phase a save whose part on rank 1 raises, then one without."""
    directory = str(tmp_path_factory.mktemp("inject") / "run")
    ranks = run_ranks(WORKER, ["inject", directory], world_size=4, timeout=JOB_TIMEOUT)
    return directory, ranks


@pytest.mark.parametrize("phase", PHASES)
def test_rank_1_failing_in_a_phase_fails_the_save_on_every_rank_and_the_next_save_works(inject_run, phase):
    directory, ranks = inject_run
    check_all_succeeded(ranks, "the injection job")
    for r in ranks:
        seen = [x for x in r.results if x.get("kind") == "inject" and x["phase"] == phase]
        assert seen, f"rank {r.rank} has no result for {phase}:\n{r.describe()}"
        seen = seen[0]
        outcome, failing = seen["outcome"], seen["failing_step"]
        assert outcome is not None, f"rank {r.rank}: save({failing}) returned though rank 1 failed in {phase}"
        assert outcome["checkpoint_error"], f"rank {r.rank}: {outcome}"
        assert 1 in named_ranks(outcome["message"]), f"rank {r.rank}: the error does not name rank 1: {outcome}"
        assert seen["seconds"] < TIMEOUT + SLACK, f"rank {r.rank} took {seen['seconds']:.1f} s"
        assert seen["after"]["latest"] == failing - 1, f"rank {r.rank}: {seen['after']}"
        assert failing not in seen["after"]["steps"], f"rank {r.rank}: {seen['after']}"
        assert seen["retry"] is None, f"rank {r.rank}: the next save failed: {seen['retry']}"
        assert seen["latest"] == seen["next_step"], seen


def test_failed_saves_commit_nothing_and_gc_removes_what_they_wrote(inject_run):
    directory, ranks = inject_run
    check_all_succeeded(ranks, "the injection job")
    good, failed = [1, 3, 5, 7, 9], [2, 4, 6, 8]
    for r in results_of(ranks, "inject-end"):
        assert r["steps"] == good, r
    for step in good:
        report = ckptstore.verify(f"{directory}/step-{step}", deep=True)
        assert report.ok, (step, report.problems)
    for step in failed:
        assert not ckptstore.exists(f"{directory}/step-{step}")
    done = cli("gc", directory, "--grace", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    for step in failed:
        assert step_files(directory, step) == [], f"gc left files of the failed save of step {step}"
    with ckptstore.CheckpointManager(directory) as mgr:
        assert mgr.steps() == good
    for step in good:
        assert ckptstore.verify(f"{directory}/step-{step}", deep=True).ok, step


# ---------------------------------------------------------------- one commit: a rank that dies

# (backend, what the survivors do once save() raised): "stay" like a job that handles the error,
# "exit" at once like a script the error ends (rank 0, which hosts the job's store, included).
KILL_ROUNDS = [("local", "stay"), ("local", "exit"), ("s3", "stay")]


@pytest.mark.parametrize("backend,after", KILL_ROUNDS, ids=[f"{b}-survivors-{a}" for b, a in KILL_ROUNDS])
def test_a_rank_killed_mid_save_fails_it_on_every_survivor_and_commits_nothing(backend, after, request, tmp_path):
    seed = int(os.environ.get("CKPTSTORE_KILL_SEED", time.time_ns())) + KILL_ROUNDS.index((backend, after))
    pick = random.Random(seed)
    victim = pick.randint(1, 3)
    phase = pick.choice(PHASES)
    delay = pick.uniform(0.0, 0.3)   # into the phase (each phase of the victim is followed by 0.3 s)
    how = f"seed {seed}: SIGKILL rank {victim} {delay:.3f} s into {phase}"
    if backend == "s3":
        s3 = request.getfixturevalue("s3_store")
        directory, options, fs = f"{s3.uri_root}/run", s3.backend.options(), s3.fs
    else:
        directory, options, fs = str(tmp_path / "run"), {}, None
    release = str(tmp_path / "release") if after == "stay" else "-"

    args = ["die", directory, json.dumps(options), str(victim), release]
    with RankJob(WORKER, args, world_size=4) as job:
        job.wait_for(victim, f"ENTER {phase}", timeout=JOB_TIMEOUT)
        time.sleep(delay)
        job.kill(victim)
        killed_at = time.monotonic()
        survivors = [r for r in range(4) if r != victim]
        for rank in survivors:   # AssertionError naming the rank if one hangs past the timeout
            job.wait_for(rank, 'RESULT {"kind": "die"', timeout=max(0.0, killed_at + TIMEOUT + SLACK - time.monotonic()))
        took = time.monotonic() - killed_at
        if release != "-":
            Path(release).touch()
        ranks = job.finish(timeout=30)
    assert ranks[victim].returncode == -signal.SIGKILL, f"{how}:\n{describe(ranks)}"
    for rank in survivors:
        assert ranks[rank].returncode == 0, f"{how}:\n{describe(ranks)}"
    # Nothing new is committed; the previous step stays the newest and intact; gc cleans up.
    # (Checked first: it must hold whatever the survivors said.)
    step1, step2 = f"{directory}/step-1", f"{directory}/step-2"
    assert not ckptstore.exists(step2, storage_options=options), how
    with ckptstore.CheckpointManager(directory, storage_options=options) as mgr:
        assert mgr.steps() == [1] and mgr.latest_step() == 1, how
    assert ckptstore.verify(step1, storage_options=options, deep=True).ok, how
    done = cli("gc", directory, "--grace", "0", *option_args(options))
    assert done.returncode == 0, done.stdout + done.stderr
    assert step_files(directory, 2, fs) == [], f"{how}: gc left files of the dead save"
    report = ckptstore.verify(step1, storage_options=options, deep=True)
    assert report.ok, (how, report.problems)

    # Every survivor raised CheckpointError naming the dead rank.
    said = {rank: ranks[rank].result("die") for rank in survivors}
    everything = f"{how}; the survivors said:\n" + "\n".join(f"rank {k}: {v}" for k, v in said.items())
    for rank, r in said.items():
        outcome = r["outcome"]
        assert outcome is not None, f"rank {rank}'s save(2) returned though rank {victim} died; {everything}"
        assert outcome["checkpoint_error"], f"rank {rank}: not a CheckpointError; {everything}"
        assert victim in named_ranks(outcome["message"]), f"rank {rank} does not name the dead rank; {everything}"
    when = ", ".join(f"rank {k} after {v['seconds']:.1f} s of save(2)" for k, v in said.items())
    print(f"{how}: every survivor raised within {took:.1f} s of the kill ({when})")


# ---------------------------------------------------------------- preemption and resumption

TOTAL = 120   # training steps; 30 ms each in a preempted run: one that ignores SIGTERM reaches the end


def preempted_run(directory: str, signalled: int) -> tuple[int, list]:
    """A four-rank training run that gets SIGTERM on rank ``signalled`` once it passed step 5.
    Returns the last step that rank had printed when the signal was sent, and the ranks."""
    with RankJob(WORKER, ["train", str(TOTAL), f"preempt:{directory}"], world_size=4) as job:
        job.wait_for(signalled, "STEP 5", timeout=JOB_TIMEOUT)
        job.send_signal(signalled, signal.SIGTERM)
        at = max(int(line.split()[1]) for line in job.lines(signalled) if line.startswith("STEP "))
        ranks = job.finish(timeout=JOB_TIMEOUT)
    return at, ranks


@pytest.fixture(scope="module")
def preemption(tmp_path_factory):
    """Two preempted runs (SIGTERM to rank 0, to rank 2), then one job that resumes each to
    TOTAL and trains an uninterrupted run from scratch."""
    base = tmp_path_factory.mktemp("preempt")
    runs = {}
    for signalled in (0, 2):
        directory = str(base / f"signal-rank-{signalled}")
        runs[signalled] = (directory, *preempted_run(directory, signalled))
    resumed = run_ranks(WORKER, ["train", str(TOTAL), *(f"resume:{runs[s][0]}" for s in runs), "plain"],
                        world_size=4, timeout=JOB_TIMEOUT)
    return runs, resumed


@pytest.mark.parametrize("signalled", [0, 2])
def test_sigterm_to_one_rank_makes_every_rank_save_the_same_step(preemption, signalled):
    runs, _ = preemption
    directory, at, ranks = runs[signalled]
    check_all_succeeded(ranks, f"the run preempted on rank {signalled}")
    said = results_of(ranks, "preempt")
    saved = {r["saved"] for r in said}
    assert len(saved) == 1 and None not in saved, f"steps saved per rank: {[r['saved'] for r in said]}"
    step = saved.pop()
    assert at <= step <= at + 20, f"SIGTERM after step {at}, saved at {step}"
    for r in said:
        assert r["should"] == [step], r
        assert r["steps"] == [step], r
    assert said[signalled]["preempted"], said[signalled]
    with ckptstore.CheckpointManager(directory) as mgr:
        assert mgr.steps() == [step]
    assert ckptstore.verify(f"{directory}/step-{step}", deep=True).ok


@pytest.mark.parametrize("signalled", [0, 2])
def test_a_resumed_run_is_bit_for_bit_the_uninterrupted_one(preemption, signalled):
    runs, resumed = preemption
    directory, _, ranks = runs[signalled]
    check_all_succeeded(ranks, f"the run preempted on rank {signalled}")
    check_all_succeeded(resumed, "the resumed runs")
    saved = ranks[0].result("preempt")["saved"]
    for r in resumed:
        plain = r.result("plain")
        again = [x for x in r.results if x.get("kind") == "resume" and x["directory"] == directory]
        assert again, f"rank {r.rank} did not resume {directory}:\n{r.describe()}"
        again = again[0]
        assert again["resumed_from"] == saved, again
        for field in ("step", "w", "m", "rng", "position"):
            assert again[field] == plain[field], f"rank {r.rank}: {field} differs from the uninterrupted run"


# ---------------------------------------------------------------- agreement on corruption

def test_one_ranks_corrupt_part_makes_every_rank_fall_back_to_the_same_step(tmp_path):
    directory = str(tmp_path / "run")
    ranks = run_ranks(WORKER, ["corrupt", directory], world_size=4, timeout=JOB_TIMEOUT)
    check_all_succeeded(ranks, "the corruption job")
    said = results_of(ranks, "corrupt")
    assert said[0]["flipped"], "step 2 has no data file written by a non-zero rank slot"
    assert [r["got_step"] for r in said] == [1, 1, 1, 1], [r["got_step"] for r in said]
    assert all(r["holds_step_1"] for r in said), said
    warned = [w for r in said for w in r["warnings"]]
    assert any(re.search(r"step[- ]2\b", w) for w in warned), f"no warning names step 2: {warned}"


# ---------------------------------------------------------------- one deleter, async saves

@pytest.fixture(scope="module")
def retention_run(tmp_path_factory):
    """Four ranks, keep_last=2, five saves: synchronous into DIR/sync, async into DIR/async-replicas
    (a DDP state) and DIR/async-dtensors (with a DTensor)."""
    directory = str(tmp_path_factory.mktemp("retention") / "run")
    ranks = run_ranks(WORKER, ["retention", directory], world_size=4, timeout=JOB_TIMEOUT)
    return directory, ranks


def kept_on_storage(directory: str) -> list[int]:
    return sorted({int(f.split("/")[0][len("step-"):]) for f in files_in(directory) if f.startswith("step-")})


def test_keep_last_over_four_ranks_removes_each_old_step_once_without_warnings(retention_run):
    directory, ranks = retention_run
    for r in results_of(ranks, "retention-sync"):
        assert r["steps"] == [4, 5] and r["latest"] == 5, r
        assert r["warnings"] == [], f"rank {r['rank']}: {r['warnings']}"
    assert kept_on_storage(f"{directory}/sync") == [4, 5], files_in(f"{directory}/sync")


@pytest.mark.parametrize("kind", ["replicas", "dtensors"])
def test_async_saves_between_training_collectives_keep_the_two_newest(retention_run, kind):
    directory, ranks = retention_run
    check_all_succeeded(ranks, "the retention job")
    for r in results_of(ranks, f"retention-async-{kind}"):
        assert r["failed"] is None, f"rank {r['rank']}: {r['failed']['message']}\n{r['failed']['traceback']}"
        assert r["steps"] == [4, 5] and r["latest"] == 5, r
        assert r["problems"] == [], f"rank {r['rank']}: {r['problems']}"
    where = f"{directory}/async-{kind}"
    assert kept_on_storage(where) == [4, 5], files_in(where)
    for step in (4, 5):
        assert ckptstore.verify(f"{where}/step-{step}", deep=True).ok
    if kind == "dtensors":      # saved with compression="zstd": every rank's shard of "wide" compressed
        d = ckptstore.api.info(f"{where}/step-5")
        assert d["format"] == "5.0" and d["compressed"] == 4 and d["stored"] < d["logical"], d
        wide = ckptstore.load(f"{where}/step-5", select=("model", "wide"))["model"]["wide"]
        assert same_bits(wide, torch.arange(1024 * 256, dtype=torch.float32).reshape(1024, 256) / 1000 + 5)
