"""Hugging Face Trainer: StoreCallback commits every checkpoint the Trainer
saves, and restore_checkpoint gives it back so that a resumed run repeats an
uninterrupted one bit for bit.

Specification: the Hugging Face section of docs/integrations.md. Real
components only: a tiny GPT-2 built from a config, the real Trainer on CPU,
a real moto S3 server, a real tmpfs for the full-disk case. GPT-2 keeps its
dropout, the sampler shuffles and the LR schedule decays, so an exact match
after resuming needs the RNG, sampler and scheduler state back, not only the
weights and the optimizer.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments,
)

import ckptstore
from ckptstore.api import info
from ckptstore.integrations.transformers import FORMAT, StoreCallback, directory_state, restore_checkpoint
from helpers.tiny_gpt2 import dataset, tiny_model

STEPS = 12           # the whole run
STOP_AT = 8          # the interrupted run stops here: mid-epoch (6 steps an epoch)
SAVE_STEPS = 2
KEEP_LAST = 2


# ---------------------------------------------------------------- a tiny, deterministic run



def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(output_dir), use_cpu=True, max_steps=STEPS, save_strategy="steps",
                   save_steps=SAVE_STEPS, logging_steps=SAVE_STEPS, per_device_train_batch_size=4,
                   learning_rate=1e-2, report_to=[], disable_tqdm=True, seed=7)
    options.update(overrides)
    return TrainingArguments(**options)


class StopAt(TrainerCallback):
    """Ends training after ``step``, as a preempted job would (after that step's save)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(output_dir: Path, callbacks: list, resume_from: str | None = None) -> Trainer:
    trainer = Trainer(model=tiny_model(), args=training_args(output_dir), train_dataset=dataset(),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mirrored_files(state: dict) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in state["files"].items()}


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


# ---------------------------------------------------------------- the whole cycle, on S3

def test_trainer_checkpoints_go_to_s3_verified_pruned_and_resume_bit_exact(s3_store, tmp_path):
    uri = s3_store.uri("run")
    out = tmp_path / "out"

    # A run that stops at step 8 of 12, committing every save.
    first = train(out, [StoreCallback(uri, keep_last=KEEP_LAST), StopAt(STOP_AT)])
    assert first.state.global_step == STOP_AT
    local = {step: files_under(out / f"checkpoint-{step}") for step in range(SAVE_STEPS, STOP_AT + 1, SAVE_STEPS)}

    # Retention kept the last two of 2, 4, 6, 8; nothing else is left on S3.
    mgr = ckptstore.CheckpointManager(uri)
    assert mgr.steps() == [6, 8]
    assert {f.split("/run/", 1)[1].split("/", 1)[0] for f in s3_store.files()} == {"step-6", "step-8"}

    for step in mgr.steps():
        assert ckptstore.verify(s3_store.uri(f"run/step-{step}"), deep=True).ok
        state = mgr.restore(step)
        assert state["format"] == FORMAT and state["step"] == step
        # Every file of the Trainer's checkpoint, byte for byte.
        assert mirrored_files(state) == local[step]
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                "training_args.bin"} <= set(local[step])
        # The step records what the Trainer logged at it.
        meta = info(s3_store.uri(f"run/step-{step}"))["meta"]
        logged = next(e for e in first.state.log_history if e.get("step") == step and "loss" in e)
        assert meta["step"] == step
        assert meta["metrics"]["loss"] == logged["loss"]
        assert meta["metrics"]["learning_rate"] == logged["learning_rate"]

    # The machine is gone: only S3 remains.
    shutil.rmtree(out)
    path = restore_checkpoint(uri, out)
    assert path == str(out / "checkpoint-8")
    assert os.listdir(out) == ["checkpoint-8"]                  # no staging directory left
    assert files_under(Path(path)) == local[8]

    resumed = train(out, [StoreCallback(uri, keep_last=KEEP_LAST)], resume_from=path)
    assert resumed.state.global_step == STEPS
    assert mgr.steps() == [10, 12]
    for step in mgr.steps():
        assert ckptstore.verify(s3_store.uri(f"run/step-{step}"), deep=True).ok
    mgr.close()

    # The same run without interruption, same seed: the same losses and the same weights, bit for bit.
    reference = train(tmp_path / "reference", [])
    assert losses(resumed) == losses(reference)     # 2..8 from the restored trainer_state.json, 10 and 12 anew
    got, want = resumed.model.state_dict(), reference.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------- the callback, hook by hook

def save_as_trainer(callback: StoreCallback, args: TrainingArguments, step: int, *, zero: bool = True,
                    logs: list[dict] | None = None) -> None:
    """What the Trainer does around one save, with its real state objects."""
    state = TrainerState(global_step=step, is_world_process_zero=zero, log_history=list(logs or []))
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    callback.on_save(args, state, control)
    callback.on_train_end(args, state, control)


def fake_checkpoint(output_dir: Path, step: int, payload: bytes = b"weights") -> Path:
    d = output_dir / f"checkpoint-{step}"
    (d / "shards" / "deep").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(payload)
    (d / "shards" / "deep" / "part-0.bin").write_bytes(bytes(range(256)) * 3)
    (d / "empty.txt").write_bytes(b"")
    return d


def test_subdirectories_and_empty_files_round_trip(local_store, tmp_path):
    args = training_args(tmp_path / "out")
    original = files_under(fake_checkpoint(tmp_path / "out", 3))
    save_as_trainer(StoreCallback(local_store.uri("run")), args, 3)
    path = restore_checkpoint(local_store.uri("run"), tmp_path / "restored")
    assert path == str(tmp_path / "restored" / "checkpoint-3")
    assert files_under(Path(path)) == original
    assert original["empty.txt"] == b"" and "shards/deep/part-0.bin" in original


def test_saving_maps_the_files_instead_of_reading_them_into_memory(tmp_path):
    d = fake_checkpoint(tmp_path / "out", 3)
    files = directory_state(d, 3)["files"]
    weights = files["model.safetensors"]
    assert type(weights) is np.ndarray and isinstance(weights.base, np.memmap)
    assert not weights.flags.writeable
    assert bytes(weights) == b"weights"


def test_async_save_is_committed_by_the_end_of_training(local_store, tmp_path):
    original = files_under(fake_checkpoint(tmp_path / "out", 3))
    save_as_trainer(StoreCallback(local_store.uri("run"), async_save=True), training_args(tmp_path / "out"), 3)
    assert ckptstore.verify(local_store.uri("run/step-3"), deep=True).ok
    assert files_under(Path(restore_checkpoint(local_store.uri("run"), tmp_path / "restored"))) == original


class SigtermAt(TrainerCallback):
    """Sends this process a real SIGTERM from another thread during step ``step``, as a
    preemption would, and waits until it has been delivered."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            t.start()
            t.join()
            time.sleep(0.01)   # the handler runs in the main thread at its next bytecode


def test_a_sigterm_makes_the_trainer_save_the_current_step_through_the_manager_and_stop(local_store, tmp_path):
    callback = StoreCallback(local_store.uri("run"), preemption_signals=(signal.SIGTERM,), async_save=True)
    trainer = Trainer(model=tiny_model(), args=training_args(tmp_path / "out", save_steps=4),
                      train_dataset=dataset(), callbacks=[SigtermAt(7), callback])
    trainer.train()
    assert trainer.state.global_step == 7                       # stopped at the step the signal came in
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # the handler is gone with the manager
    mgr = ckptstore.CheckpointManager(local_store.uri("run"), _probe=False)
    assert mgr.steps() == [4, 7]
    assert ckptstore.verify(local_store.uri("run/step-7"), deep=True).ok
    restored = Path(restore_checkpoint(local_store.uri("run"), tmp_path / "restored"))
    assert restored.name == "checkpoint-7"
    assert files_under(restored) == files_under(tmp_path / "out" / "checkpoint-7")


def test_save_interval_seconds_makes_the_trainer_save_on_time(local_store, tmp_path):
    callback = StoreCallback(local_store.uri("run"), save_interval_seconds=1e-6)
    trainer = Trainer(model=tiny_model(), args=training_args(tmp_path / "out", save_strategy="no", max_steps=3),
                      train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    assert ckptstore.CheckpointManager(local_store.uri("run"), _probe=False).steps() == [1, 2, 3]


def test_keep_best_ranks_by_the_trainers_metric_for_best_model(local_store, tmp_path):
    args = training_args(tmp_path / "out", metric_for_best_model="loss")  # logged as eval_loss, lower is better
    callback = StoreCallback(local_store.uri("run"), keep_last=1, keep_best=1)
    for step, eval_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]:
        fake_checkpoint(tmp_path / "out", step)
        logs = [{"loss": 9.0, "step": step - 1}, {"eval_loss": eval_loss, "step": step}]
        save_as_trainer(callback, args, step, logs=logs)
    with ckptstore.CheckpointManager(local_store.uri("run")) as mgr:
        assert mgr.steps() == [2, 4]            # the best and the newest
    assert info(local_store.uri("run/step-4"))["meta"]["metrics"] == {"eval_loss": 4.0}   # not step 3's loss


def test_a_step_saved_again_after_resuming_from_an_older_one_is_replaced(local_store, tmp_path):
    args = training_args(tmp_path / "out")
    d = fake_checkpoint(tmp_path / "out", 3, b"first run")
    save_as_trainer(StoreCallback(local_store.uri("run")), args, 3)
    (d / "model.safetensors").write_bytes(b"second run")
    save_as_trainer(StoreCallback(local_store.uri("run")), args, 3)
    path = restore_checkpoint(local_store.uri("run"), tmp_path / "restored")
    assert Path(path, "model.safetensors").read_bytes() == b"second run"


# ---------------------------------------------------------------- restore_checkpoint

def committed_run(store, tmp_path: Path, step: int = 3) -> str:
    fake_checkpoint(tmp_path / "out", step)
    save_as_trainer(StoreCallback(store.uri("run")), training_args(tmp_path / "out"), step)
    return store.uri("run")


def test_restore_refuses_to_clobber_a_nonempty_target_unless_asked(local_store, tmp_path):
    uri = committed_run(local_store, tmp_path)
    target = tmp_path / "restored" / "checkpoint-3"
    target.mkdir(parents=True)
    (target / "mine.txt").write_bytes(b"keep me")
    for step in (3, None):   # refused before reading (known step) and after (newest step)
        with pytest.raises(ckptstore.CheckpointExistsError, match="checkpoint-3"):
            restore_checkpoint(uri, tmp_path / "restored", step)
    assert files_under(target) == {"mine.txt": b"keep me"}
    assert os.listdir(tmp_path / "restored") == ["checkpoint-3"]

    restore_checkpoint(uri, tmp_path / "restored", overwrite=True)
    assert files_under(target) == files_under(tmp_path / "out" / "checkpoint-3")
    assert os.listdir(tmp_path / "restored") == ["checkpoint-3"]   # the old one is gone, no staging left


def test_restore_fills_an_empty_target_directory(local_store, tmp_path):
    uri = committed_run(local_store, tmp_path)
    (tmp_path / "restored" / "checkpoint-3").mkdir(parents=True)
    path = restore_checkpoint(uri, tmp_path / "restored")
    assert files_under(Path(path)) == files_under(tmp_path / "out" / "checkpoint-3")


def test_restore_of_an_empty_run_returns_none_so_training_starts_fresh(local_store, tmp_path):
    ckptstore.CheckpointManager(local_store.uri("run")).close()
    assert restore_checkpoint(local_store.uri("run"), tmp_path / "restored") is None
    assert not (tmp_path / "restored").exists()


def test_restore_of_a_missing_step_raises_not_found(local_store, tmp_path):
    uri = committed_run(local_store, tmp_path)
    with pytest.raises(ckptstore.CheckpointNotFoundError):
        restore_checkpoint(uri, tmp_path / "restored", step=4)


def test_restore_refuses_file_names_that_leave_the_target(local_store, tmp_path):
    evil = {"format": FORMAT, "version": 1, "step": 5, "files": {"../escaped.txt": np.frombuffer(b"x", np.uint8)}}
    with ckptstore.CheckpointManager(local_store.uri("run")) as mgr:
        mgr.save(5, evil)
    with pytest.raises(ckptstore.CorruptCheckpointError, match="escaped"):
        restore_checkpoint(local_store.uri("run"), tmp_path / "restored")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "restored").exists()              # refused before anything was written


def test_restore_refuses_a_checkpoint_that_is_not_a_trainer_directory(local_store, tmp_path):
    with ckptstore.CheckpointManager(local_store.uri("run")) as mgr:
        mgr.save(1, {"model": torch.ones(2)})
    with pytest.raises(ckptstore.CorruptCheckpointError, match="StoreCallback"):
        restore_checkpoint(local_store.uri("run"), tmp_path / "restored")


def test_a_restore_that_fails_midway_leaves_no_checkpoint_directory(local_store, tmp_path, mount_tmpfs):
    """A full disk stops the restore after some files: the Trainer must find nothing to resume."""
    src = tmp_path / "out" / "checkpoint-3"
    src.mkdir(parents=True)
    (src / "a-small.json").write_bytes(b"{}")
    (src / "b-big.bin").write_bytes(os.urandom(2 * 2**20))
    with ckptstore.CheckpointManager(local_store.uri("run")) as mgr:
        mgr.save(3, directory_state(src, 3))
    disk = mount_tmpfs("small-disk", "size=1m")
    with pytest.raises(OSError) as excinfo:
        restore_checkpoint(local_store.uri("run"), disk)
    assert excinfo.value.errno == errno.ENOSPC
    assert os.listdir(disk) == []


def test_restore_skips_a_corrupt_newest_step_for_the_one_before(local_store, tmp_path):
    run = local_store.uri("run")
    for step in (2, 4):
        src = tmp_path / f"out/checkpoint-{step}"
        src.mkdir(parents=True)
        (src / "weights.bin").write_bytes(bytes([step]) * 100_000)
        with ckptstore.CheckpointManager(run) as mgr:
            mgr.save(step, directory_state(src, step))
    data = [p for p in local_store.files() if "/step-4/" in p and p.endswith(".bin")]
    for p in data:
        raw = bytearray(local_store.read(p))
        raw[-10] ^= 1
        local_store.write(p, bytes(raw))
    target = restore_checkpoint(run, tmp_path / "restored")
    assert target.endswith("checkpoint-2")
    assert (Path(target) / "weights.bin").read_bytes() == bytes([2]) * 100_000
    assert sorted(os.listdir(tmp_path / "restored")) == ["checkpoint-2"]


def test_restoring_a_step_from_s3_holds_no_copy_of_it_in_memory(s3_store, tmp_path):
    """Each file streams from S3 to disk: peak RSS grows by a few read windows, not the step's size."""
    src = tmp_path / "out" / "checkpoint-5"
    src.mkdir(parents=True)
    size = 192 * 2**20
    with open(src / "model.safetensors", "wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))
    run = s3_store.uri("run")
    with ckptstore.CheckpointManager(run) as mgr:
        mgr.save(5, directory_state(src, 5))
    code = f"""
import json, re, sys
from pathlib import Path
from ckptstore.integrations.transformers import restore_checkpoint
import s3fs, aiobotocore.session, botocore.client  # imported before the measurement: code is not data
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
target = restore_checkpoint({run!r}, {str(tmp_path / "restored")!r})
print(json.dumps({{"extra": hwm() - before, "target": target}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    restored = Path(result["target"]) / "model.safetensors"
    assert restored.read_bytes() == (src / "model.safetensors").read_bytes()
    # A copy of the step would be at least its 192 MiB; streaming holds the in-flight read
    # windows (4 MiB x 4 requests, each held twice by the HTTP client) and the allocator's slack.
    assert result["extra"] < size / 2, f"restore peaked {result['extra'] / 2**20:.0f} MiB above the start"


def test_incremental_stores_a_file_that_did_not_change_once(local_store, tmp_path):
    """incremental=True: the frozen part of a Trainer checkpoint (here a big unchanged file)
    is written by the first step only; both steps restore exactly."""
    args = training_args(tmp_path / "out")
    frozen = bytes(range(256)) * 4096            # 1 MiB that never changes
    for step in (3, 6):
        d = fake_checkpoint(tmp_path / "out", step, f"adapter at {step}".encode())
        (d / "base.bin").write_bytes(frozen)
        save_as_trainer(StoreCallback(local_store.uri("run"), incremental=True), args, step)
    infos = {}
    for step in (3, 6):
        with ckptstore.open(local_store.uri(f"run/step-{step}")) as ck:
            infos[step] = ck.info
    assert infos[3].nbytes > len(frozen) and infos[6].nbytes < len(frozen) // 8, infos
    for step in (3, 6):
        path = restore_checkpoint(local_store.uri("run"), tmp_path / f"restored-{step}", step=step)
        assert Path(path, "base.bin").read_bytes() == frozen
        assert Path(path, "model.safetensors").read_bytes() == f"adapter at {step}".encode()
