"""Hugging Face ``Trainer`` checkpoints in a ckptstore ``CheckpointManager``.

The Trainer already knows how to save and resume itself: ``_save_checkpoint``
writes ``checkpoint-<step>/`` (weights, optimizer, scheduler, scaler, RNG
states, ``trainer_state.json``, ``training_args.bin``) and
``train(resume_from_checkpoint=dir)`` reads exactly that layout back. So this
adapter does not re-derive the training state; it mirrors the directory.

* ``StoreCallback`` commits every ``checkpoint-<step>/`` the Trainer writes as
  step ``<step>`` of a manager: each file becomes a read-only memory-mapped
  ``uint8`` array keyed by its relative path. The bytes go from the page cache
  to the store with no second copy in anonymous memory, nothing is unpickled
  (``optimizer.pt`` and ``training_args.bin`` are pickles, carried as opaque
  bytes), and the manager checksums, verifies, commits and prunes as usual.
* ``restore_checkpoint`` streams a committed step back as
  ``<output_dir>/checkpoint-<step>/`` (a file at a time, a few read windows
  in memory), byte for byte what the Trainer wrote,
  so ``trainer.train(resume_from_checkpoint=path)`` resumes it exactly as it
  would resume its own directory (RNG and scheduler state included).

Importing this module imports transformers; ``import ckptstore`` does not.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                      PathNotFoundError)
from ..manager import CheckpointManager, step_dir
from ..plan import file_blobs
from ..reader import load_manifest, open_commit, stream_blob
from ..stores import open_store
from ..stores.local import fsync_dir

__all__ = ["StoreCallback", "restore_checkpoint", "directory_state", "FORMAT"]

log = logging.getLogger("ckptstore")

#: The ``"format"`` entry of a mirrored checkpoint directory's state.
FORMAT = "transformers-checkpoint-dir"
_VERSION = 1


# ---------------------------------------------------------------- directory <-> state

def _map_file(path: Path) -> np.ndarray:
    """The file's bytes as a read-only uint8 array backed by the page cache.

    A plain ndarray view of the mapping (the safe format takes ndarrays, not
    their np.memmap subclass); it keeps the mapping alive. Empty files cannot
    be mapped.
    """
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def directory_state(directory: str | os.PathLike, step: int) -> dict:
    """The state that mirrors ``directory``: every regular file under it, by relative POSIX path.

    A symbolic link to a file is stored as that file's bytes; links to
    directories are not followed, and empty directories are not recorded.
    """
    root = Path(directory)
    files: dict[str, np.ndarray] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file():
                files[path.relative_to(root).as_posix()] = _map_file(path)
    return {"format": FORMAT, "version": _VERSION, "step": step, "files": files}


def _safe_relpath(key: Any, uri: str) -> PurePosixPath:
    """A stored file name as a path that stays inside the target directory.

    The names come from storage: one reaching outside (absolute, ``..``) is a
    corrupt or hostile checkpoint, never something to write.
    """
    p = PurePosixPath(key) if isinstance(key, str) else None
    if p is None or not p.parts or p.is_absolute() or ".." in p.parts or key != p.as_posix() or "\0" in key:
        raise CorruptCheckpointError(f"{uri}: stored file name {key!r} is not a plain relative path", uri)
    return p


def _occupied(target: Path) -> bool:
    """Whether ``target`` holds anything (an empty directory, e.g. one made by hand, does not count)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return True
    return target.is_dir() and any(target.iterdir())


def _refuse_occupied(target: Path, overwrite: bool) -> None:
    if not overwrite and _occupied(target):
        raise CheckpointExistsError(f"{target} already exists; pass overwrite=True to replace it", str(target))


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete ``staging`` directory to ``target``.

    The Trainer takes any ``checkpoint-<n>`` directory for a checkpoint, so
    ``target`` appears only complete, by one rename. A target being
    overwritten is moved aside first and deleted after the rename.
    """
    _refuse_occupied(target, overwrite)
    old = None
    if _occupied(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.ckptstore-old-", dir=target.parent))
        os.replace(target, old / target.name)
    elif target.is_dir():
        target.rmdir()
    os.rename(staging, target)
    fsync_dir(str(target.parent))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(uri: Any, output_dir: str | os.PathLike, step: int | None = None, *,
                       storage_options: Mapping[str, Any] | None = None, overwrite: bool = False) -> str | None:
    """Write step ``step`` of the manager at ``uri`` to ``<output_dir>/checkpoint-<step>``; return that path.

    Without ``step``: the most recently committed step that verifies (a
    corrupt one is skipped with a warning for the next older step). Returns
    None when ``uri`` holds no committed step, so
    ``trainer.train(resume_from_checkpoint=...)`` starts fresh.

    Each file streams from storage to disk a few read windows at a time, so a
    restore holds no copy of the step in memory, and every byte is checked
    against its checksum. The files are written and fsynced in a hidden
    staging directory beside the target, which is renamed into place only
    when complete: a restore that dies midway, or meets a checksum mismatch,
    leaves no ``checkpoint-<step>`` for the Trainer to mistake for a
    checkpoint. An existing non-empty target raises CheckpointExistsError
    unless ``overwrite``.
    """
    out = Path(output_dir)
    if step is not None:   # known target: refuse before reading anything
        _refuse_occupied(out / f"{PREFIX_CHECKPOINT_DIR}-{step}", overwrite)
    # restoring needs no write access; one process writes the files, whether or not it is a rank of a job
    mgr = CheckpointManager(uri, storage_options=storage_options, _probe=False, _collective=False)
    try:
        if step is not None:
            candidates = [step]
        else:
            newest = mgr.latest_step()
            if newest is None:
                return None
            candidates = [newest] + [s for s in sorted(mgr.steps(), reverse=True) if s != newest]
        root = open_store(uri, storage_options)
        for i, s in enumerate(candidates):
            try:
                return _restore_step(root.child(step_dir(s)), out, overwrite, mgr.directory)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                if step is not None or i == len(candidates) - 1:
                    raise
                log.warning("%s: step %d does not verify, falling back to an older step: %s", mgr.directory, s, e)
        return None
    finally:
        mgr.close()


def _restore_step(store, out: Path, overwrite: bool, where: str) -> str:
    with store.errors("restore"):
        m, _ = open_commit(store)
        try:
            head = load_manifest(store, m, select=["format", "version", "step"])
        except PathNotFoundError:
            head = None         # some other state: refused as not a Trainer directory below
        saved_step, entries = _checked_entries(head, m, where)
        target = out / f"{PREFIX_CHECKPOINT_DIR}-{saved_step}"
        _refuse_occupied(target, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.ckptstore-restore-", dir=out))
        try:
            _stream_tree(store, m, entries, staging)
            _publish(staging, target, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("%s: restored step %d to %s", where, saved_step, target)
    return str(target)


def _checked_entries(head: Any, m, uri: str) -> tuple[int, dict[PurePosixPath, int]]:
    """(step, {relative path: blob}) of a step ``directory_state`` made, from the record alone."""
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{uri}: not a Trainer checkpoint directory saved by StoreCallback "
            f"(format {head.get('format') if isinstance(head, dict) else type(head).__name__!r})", uri)
    if head.get("version") != _VERSION:
        raise CorruptCheckpointError(
            f"{uri}: Trainer checkpoint format version {head.get('version')!r}; this ckptstore reads "
            f"version {_VERSION}", uri)
    if not isinstance(head.get("step"), int):
        raise CorruptCheckpointError(f"{uri}: Trainer checkpoint without its step", uri)
    files = file_blobs(m, ("files",))
    if files is None:
        raise CorruptCheckpointError(f"{uri}: Trainer checkpoint without its files", uri)
    out = {}
    for key, blob in files.items():
        if blob is None:
            raise CorruptCheckpointError(f"{uri}: stored file {key!r} is not a byte array", uri)
        out[_safe_relpath(key, uri)] = blob
    return head["step"], out


def _stream_tree(store, m, entries: Mapping[PurePosixPath, int], target: Path) -> None:
    """Stream every file into the new directory ``target``, each fsynced, then the directories."""
    dirs = {target}
    for rel, blob in entries.items():
        path = target.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        dirs.update(path.parents[i] for i in range(len(rel.parts) - 1))
        with open(path, "xb") as f:
            stream_blob(store, m, blob, f.write)
            f.flush()
            os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(str(d))


# ---------------------------------------------------------------- the callback

def _step_metrics(state: TrainerState) -> dict[str, float | int]:
    """The numbers the Trainer logged at the current step (loss, learning rate, eval metrics, epoch).

    Only entries of ``log_history`` whose ``step`` is ``global_step``: a value
    logged at an earlier step would rank this step by another step's result.
    """
    out: dict[str, float | int] = {}
    for entry in reversed(state.log_history):
        if entry.get("step") != state.global_step:
            break
        for k, v in entry.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, v)
    return out


def _best_from_args(args: TrainingArguments) -> tuple[str | None, str]:
    """The Trainer's own best-model metric, named as it appears in the logs, and its direction."""
    name = args.metric_for_best_model
    if name is None:
        return None, "min"
    if not name.startswith("eval_"):
        name = f"eval_{name}"
    return name, "max" if args.greater_is_better else "min"


def _wait_for_every_rank() -> None:
    """Every rank writes its own ``rng_state_<rank>.pth``; process zero mirrors the directory after all have."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class StoreCallback(TrainerCallback):
    """Commit each ``checkpoint-<global_step>`` the Trainer saves to a CheckpointManager at ``uri``.

    The manager is opened (and its directory proven writable) when training
    begins and closed, waiting for an async save, when it ends. Under
    several processes (DDP) it is the multi-rank manager (docs/distributed.md):
    every rank takes part in each save, the files equal on every rank are
    stored once and written by whichever rank is least loaded, and the
    ranks' own files (``rng_state_<rank>.pth``) are kept per rank. Retention options mean what they mean
    for :class:`ckptstore.CheckpointManager`; ``keep_best`` without
    ``best_metric`` ranks by the Trainer's ``metric_for_best_model``. Each
    step records the metrics the Trainer logged at that step.

    A step already in the store (training resumed from an older step) is
    replaced, as the Trainer replaces its own ``checkpoint-<step>``.

    ``save_interval_seconds`` makes the Trainer save when that long has passed
    since the last save started, on top of its own ``save_steps``.
    ``preemption_signals`` (e.g. ``(signal.SIGTERM,)``) installs the manager's
    handlers, which only record the signal; at the end of the step it arrived
    in, the Trainer is told to save that step (committed before the save
    returns) and to stop; under several processes, a signal on any rank
    makes every rank save the same step and stop. ``upload_settle_seconds``: the
    manager's, for a run on a FUSE mount such as Colab's Drive. ``incremental``:
    the manager's; each checkpoint-<step> directory's files are stored once
    across steps when their bytes did not change (a frozen base model).
    """

    def __init__(self, uri: Any, storage_options: Mapping[str, Any] | None = None, *,
                 keep_last: int | None = None, keep_best: int | None = None, best_metric: str | None = None,
                 best_mode: str | None = None, keep_every: int | None = None, max_age: float | None = None,
                 async_save: bool = False, save_interval_seconds: float | None = None,
                 preemption_signals: Any = None, grace_seconds: float | None = None,
                 upload_settle_seconds: float | None = 300.0, incremental: bool = False):
        self.uri = uri
        self.incremental = incremental
        self.storage_options = storage_options
        self.keep_last, self.keep_best, self.keep_every, self.max_age = keep_last, keep_best, keep_every, max_age
        self.best_metric, self.best_mode = best_metric, best_mode
        self.async_save = async_save
        self.save_interval_seconds, self.preemption_signals = save_interval_seconds, preemption_signals
        self.grace_seconds = grace_seconds
        self.upload_settle_seconds = upload_settle_seconds
        self.manager: CheckpointManager | None = None

    def _open(self, args: TrainingArguments) -> CheckpointManager:
        if self.manager is None:
            best_metric, best_mode = self.best_metric, self.best_mode
            if best_metric is None:
                best_metric, derived_mode = _best_from_args(args)
                best_mode = best_mode or derived_mode
            self.manager = CheckpointManager(
                self.uri, keep_last=self.keep_last, keep_best=self.keep_best, best_metric=best_metric,
                best_mode=best_mode or "min", keep_every=self.keep_every, max_age=self.max_age,
                async_save=self.async_save, storage_options=self.storage_options,
                save_interval_seconds=self.save_interval_seconds, preemption_signals=self.preemption_signals,
                grace_seconds=self.grace_seconds, upload_settle_seconds=self.upload_settle_seconds,
                incremental=self.incremental)
        return self.manager

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._open(args)   # on every rank; a bad URL or missing credentials fail now, not at the first save

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        mgr = self.manager
        if mgr is None or (self.save_interval_seconds is None and self.preemption_signals is None):
            return
        # should_save is the same on every rank (a signal on any one, rank 0's clock)
        if mgr.should_save(state.global_step):
            control.should_save = True
            if mgr.preempted:
                log.info("%s: preemption signal: saving step %d and stopping", mgr.directory, state.global_step)
                control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        _wait_for_every_rank()
        step = state.global_step
        directory = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not directory.is_dir():
            raise CheckpointError(
                f"StoreCallback: the Trainer reported a save at step {step}, but {directory} is not a "
                "directory (hyperparameter-search runs save elsewhere and are not supported)")
        mgr = self._open(args)
        metrics = _step_metrics(state)
        if mgr.best_metric is not None:
            # a step without an evaluation has no value of the metric: it ranks as absent
            metrics.setdefault(mgr.best_metric, None)
        mgr.save(step, directory_state(directory, step), metrics=metrics, force=True)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.manager is not None:
            mgr, self.manager = self.manager, None
            mgr.close()   # waits for an async save and raises its error
