"""The command line: ls, info, verify, gc, and usage errors.

Specification: API.md "Command line" (exit 0 when all is well, 1 when a verify
finds a problem, 2 for usage errors). Every test runs the real entry point
in a subprocess: `python -m ckptstore ...`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptstore
from helpers.crash import bytes_under, interrupt_a_save
from helpers.save_loop import check_state, make_state


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptstore", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    ckptstore.save({"w": torch.arange(1000.0), "step": 10}, str(d / "step-10"))
    ckptstore.save({"w": torch.arange(2000.0), "step": 20}, str(d / "step-20"))
    return d


def corrupt_one_data_byte(checkpoint: Path) -> None:
    data_file = max((p for p in checkpoint.rglob("*.bin")), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    data_file.write_bytes(bytes(data))


def test_ls_lists_the_checkpoints_in_a_directory(run_dir):
    done = cli("ls", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "step-10" in done.stdout and "step-20" in done.stdout


def test_ls_does_not_list_a_directory_that_is_not_a_checkpoint(run_dir):
    (run_dir / "notes").mkdir()
    (run_dir / "notes" / "readme.txt").write_text("hello")
    done = cli("ls", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "notes" not in done.stdout


def test_info_describes_a_checkpoint(run_dir):
    done = cli("info", str(run_dir / "step-20"))
    assert done.returncode == 0, done.stderr
    assert "step-20" in done.stdout


def test_info_of_a_missing_checkpoint_fails_with_a_message_not_a_traceback(run_dir):
    done = cli("info", str(run_dir / "nope"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "nope" in done.stdout + done.stderr


def test_verify_of_an_intact_checkpoint_exits_0(run_dir):
    done = cli("verify", str(run_dir / "step-10"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_deep_verify_of_an_intact_checkpoint_exits_0(run_dir):
    done = cli("verify", str(run_dir / "step-10"), "--deep")
    assert done.returncode == 0, done.stdout + done.stderr


def test_deep_verify_of_a_corrupt_checkpoint_exits_1(run_dir):
    corrupt_one_data_byte(run_dir / "step-10")
    done = cli("verify", str(run_dir / "step-10"), "--deep")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_verify_of_a_truncated_checkpoint_exits_1(run_dir):
    data_file = max((run_dir / "step-20").rglob("*.bin"), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:-1])
    done = cli("verify", str(run_dir / "step-20"))
    assert done.returncode == 1, done.stdout + done.stderr


def test_verify_of_a_missing_checkpoint_fails_with_a_message_not_a_traceback(run_dir):
    done = cli("verify", str(run_dir / "nope"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["verify"], ["gc"], ["verify", "--no-such-flag", "x"], ["gc", "d", "--grace", "soon"]],
    ids=["no-command", "unknown-command", "verify-no-uri", "gc-no-dir", "unknown-flag", "bad-grace"],
)
def test_usage_errors_exit_2(args):
    done = cli(*args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


def test_gc_removes_leftovers_of_an_interrupted_save_and_keeps_the_checkpoint(writers, tmp_path):
    run = tmp_path / "gc-run"
    run.mkdir()
    uri = str(run / "ckpt")
    ckptstore.save(make_state(1, 16), uri)
    committed_bytes = bytes_under(run)
    assert interrupt_a_save(writers, uri, run, 2, 16, kill_above_bytes=committed_bytes + 2**20) == []
    assert bytes_under(run) > committed_bytes

    kept = cli("gc", str(run), "--grace", "3600")
    assert kept.returncode == 0, kept.stderr
    assert bytes_under(run) > committed_bytes, "gc removed leftovers younger than its grace period"

    done = cli("gc", str(run), "--grace", "0")
    assert done.returncode == 0, done.stderr
    assert bytes_under(run) == committed_bytes
    assert check_state(ckptstore.load(uri)) == 1


def test_gc_of_a_directory_without_leftovers_changes_nothing(run_dir):
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    done = cli("gc", str(run_dir), "--grace", "0")
    assert done.returncode == 0, done.stderr
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    assert ckptstore.load(str(run_dir / "step-20"))["step"] == 20


def test_prune_applies_a_retention_policy_to_a_manager_directory(tmp_path):
    run = str(tmp_path / "run")
    mgr = ckptstore.CheckpointManager(run)
    for s, loss in enumerate([3.0, 1.0, 4.0, 5.0, 6.0]):
        mgr.save(s, {"w": torch.full((3,), float(s))}, metrics={"loss": loss})
    dry = subprocess.run([sys.executable, "-m", "ckptstore", "prune", run, "--keep-last", "2",
                          "--best-metric", "loss", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "would remove 2 step(s): 0, 2" in dry.stdout
    assert mgr.steps() == [0, 1, 2, 3, 4]
    done = subprocess.run([sys.executable, "-m", "ckptstore", "prune", run, "--keep-last", "2",
                           "--best-metric", "loss"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert mgr.steps() == [1, 3, 4]          # the best (loss 1.0) and the two newest


@pytest.mark.parametrize("args", [[], ["--keep-best", "1"], ["--keep-last", "0"]])
def test_prune_without_a_valid_policy_is_a_usage_error(tmp_path, args):
    done = subprocess.run([sys.executable, "-m", "ckptstore", "prune", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


def test_cp_copies_between_backends_verified_at_the_destination(tmp_path, s3_store, memory_store):
    state = {"w": torch.randn(300, 200), "tied": None, "step": 9}
    state["tied"] = state["w"]
    src = str(tmp_path / "src")
    ckptstore.save(state, src)
    dst = s3_store.uri("copied")
    done = subprocess.run([sys.executable, "-m", "ckptstore", "cp", src, dst], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verified at the destination" in done.stdout
    assert ckptstore.verify(dst, deep=True).ok
    out = ckptstore.load(dst)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 9
    assert out["tied"].untyped_storage().data_ptr() == out["w"].untyped_storage().data_ptr()
    # and on to a third backend, from the object store
    again = subprocess.run([sys.executable, "-m", "ckptstore", "cp", dst, str(tmp_path / "back")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert torch.equal(ckptstore.load(str(tmp_path / "back"))["w"], state["w"])


def test_cp_refuses_a_corrupt_source_and_commits_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ckptstore.save({"w": torch.randn(1000)}, str(src))
    data = next(p for p in src.iterdir() if p.suffix == ".bin")
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    done = subprocess.run([sys.executable, "-m", "ckptstore", "cp", str(src), str(dst)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "CRC-32C" in done.stderr
    assert not ckptstore.exists(str(dst))
    assert not dst.exists() or not any(dst.iterdir())


def test_cp_converts_a_torch_save_file(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.arange(10)}, pt)
    done = subprocess.run([sys.executable, "-m", "ckptstore", "cp", str(pt), str(tmp_path / "ck")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.equal(ckptstore.load(str(tmp_path / "ck"))["w"], torch.arange(10))


def test_ls_shows_a_manager_runs_steps_with_size_time_metrics_and_strategy(tmp_path):
    run = str(tmp_path / "run")
    mgr = ckptstore.CheckpointManager(run)
    for s in (10, 2):     # step 2 after step 10 (force: below the newest), so names and steps disagree
        mgr.save(s, {"w": torch.ones(1000)}, metrics={"loss": 0.25, "acc": 0.5}, force=True)
    done = subprocess.run([sys.executable, "-m", "ckptstore", "ls", run], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "SIZE", "COMMITTED", "STRATEGY", "METRICS", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["step-2", "step-10"]     # by step, not by name
    for ln in lines[1:]:
        assert "rename" in ln and "loss=0.25" in ln and "acc=0.5" in ln and ln.endswith("ok")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_bench_times_save_and_load_against_raw_bytes_and_cleans_up(tmp_path, memory_store, where):
    uri = str(tmp_path / "bench") if where == "local" else memory_store.uri("bench")
    done = subprocess.run([sys.executable, "-m", "ckptstore", "bench", uri, "--size", "2MiB", "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {ln.split()[0]: ln.split() for ln in done.stdout.splitlines() if ln.startswith("ckptstore.")}
    assert set(rows) == {"ckptstore.save", "ckptstore.load"}
    assert all(float(r[1]) > 0 for r in rows.values())
    if where == "local":
        assert not any((tmp_path / "bench").rglob("*")), "bench left files behind"


def test_bench_rejects_a_bad_size(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ckptstore", "bench", str(tmp_path), "--size", "lots"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def leave_an_interrupted_save_in(checkpoint: Path, files: int = 3, size: int = 1 << 20) -> None:
    """Data files of a newer generation with no commit record: what a save killed mid-write leaves."""
    from ckptstore.format.manifest import data_name, new_generation
    gen = new_generation()
    for k in range(files):
        (checkpoint / data_name(gen, k)).write_bytes(b"\0" * size)


def test_gc_says_what_it_kept_because_it_is_younger_than_the_grace_period(run_dir):
    leave_an_interrupted_save_in(run_dir / "step-20")
    done = cli("gc", str(run_dir), "--grace", "3600")
    assert done.returncode == 0, done.stderr
    assert "kept 3 leftover file(s), 3.0 MiB, younger than the grace period of 3600 s" in done.stdout
    assert "--grace 0" in done.stdout
    assert len(list((run_dir / "step-20").iterdir())) > 3
    done = cli("gc", str(run_dir), "--grace", "0")
    assert done.returncode == 0, done.stderr
    assert "removed 3 leftover file(s), 3.0 MiB" in done.stdout
    assert not [ln for ln in done.stdout.splitlines() if ln.startswith("kept")]


@pytest.mark.parametrize("args", [["ls"], ["verify"], ["info"], ["gc"]])
def test_a_missing_directory_exits_1_naming_it(tmp_path, args):
    missing = tmp_path / "nothing-here"
    done = cli(*args, str(missing))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "nothing-here" in done.stderr and "Traceback" not in done.stderr


def test_verify_of_a_manager_run_directory_names_its_steps(tmp_path):
    run = str(tmp_path / "run")
    mgr = ckptstore.CheckpointManager(run)
    for s in (2, 4, 10):
        mgr.save(s, {"w": torch.ones(3)})
    done = cli("verify", run)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "step-2, step-4, step-10" in done.stderr
    assert f"ckptstore verify {run}/step-10" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name, step", [("epoch=0-step=8.ckpt", "8"), ("checkpoint-500", "500"),
                                        ("step-12", "12"), ("last", "-")])
def test_ls_shows_the_step_in_lightning_and_hugging_face_names(tmp_path, name, step):
    ckptstore.save({"w": torch.ones(3)}, str(tmp_path / name))
    done = cli("ls", str(tmp_path))
    assert done.returncode == 0, done.stderr
    row = done.stdout.splitlines()[1].split()
    assert row[:2] == [name, step], done.stdout
