"""The manager across the ranks of a torch.distributed job (world size > 1).

Every rank makes the same ``CheckpointManager`` and calls it at the same
points; ``Ranks`` is what makes those calls agree:

- ``join``: the ranks check they were given the same settings and see the
  same directory (a file rank 0 writes there is visible to every rank);
- a save is ``collective.save_step`` (one commit after every rank's part is
  durable); retention, prune and sweeps run on rank 0 only, after commits;
- ``steps()``, ``latest_step()`` and ``prune()`` are rank 0's answer, shared;
- ``restore()`` tries the steps rank 0 lists, newest first, on every rank,
  and moves on together when any rank finds its part of a step corrupt;
- the schedule: ``save_interval_steps`` needs no talk (every rank counts the
  same steps). A preemption signal on any rank, or rank 0's
  ``save_interval_seconds`` clock, raises an *event*; each rank notices it at
  its next ``should_save`` (a read of a store counter at most every
  ``POLL`` seconds, never a collective of the training), says at which step
  it noticed, and all save at one step past the largest of those. Training
  that runs a collective per step keeps its ranks within a step of each
  other, so every rank learns that step before it passes it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

import concurrent.futures as cf

from ..errors import CheckpointError, CorruptCheckpointError, is_corruption
from .collective import SaveJob, plan_part, raise_here, save_step
from .background import SaveHandle, yield_to_training
from .room import CollectiveError, Op, Room, delete_keys, ranks_text
from .schedule import check_step

log = logging.getLogger("ckptstore")

POLL = 0.05             # seconds between looks at the event counter in should_save
_made: dict[str, int] = {}   # managers made per directory in this process: the room's name
_made_lock = threading.Lock()


def world() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed runs more than one rank here, else None."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    n = dist.get_world_size()
    return (dist.get_rank(), n) if n > 1 else None


class Ranks:
    def __init__(self, directory: str, timeout: float, rank: int, world_size: int):
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        with _made_lock:
            n = _made[directory] = _made.get(directory, 0) + 1
        self.rank, self.world, self.uri = rank, world_size, directory
        self.room = Room(store, rank, world_size, f"{directory}#{n}", timeout, directory)
        self.margin = max(5.0, 0.1 * timeout)
        # the event agreement (see the module docstring)
        self.epoch = 0
        self.noticed: int | None = None       # the step at which this rank noticed the pending event
        self.target: int | None = None        # the step every rank saves for it, once agreed
        self.raised = -1                      # the last epoch this rank raised an event in
        self.last_look = 0.0
        self.preempted = False                # some rank got a preemption signal

    @property
    def store(self):
        return self.room.store

    def release(self) -> None:
        """Let go of the job's store (the manager is closed): a process that ends must not hold
        connections to it, nor keep the one rank 0 hosts alive, past its own shutdown."""
        self.room.release()

    def op(self, what: str, background: bool = False) -> Op:
        return self.room.op(what, background=background)

    # -- setup

    def join(self, settings: dict, probe) -> None:
        """Same settings everywhere, and one directory everyone sees (rank 0 proves it writable)."""
        op = self.op("making the CheckpointManager")
        try:
            said = op.everyone(settings)
        except CollectiveError as e:
            raise CollectiveError(
                f"{e}. Under torch.distributed with {self.world} ranks the manager is collective: every rank "
                "must make it, with the same arguments (a manager made on rank 0 alone waits for the others; "
                "see docs/distributed.md)", self.uri, e.ranks) from None
        differ = sorted(r for r, s in said.items() if s != said[0])
        if differ:
            raise CheckpointError(
                f"{self.uri}: {ranks_text(differ)} made the CheckpointManager with other settings than rank 0 "
                f"(rank 0: {said[0]}; rank {differ[0]}: {said[differ[0]]}); every rank must pass the same",
                self.uri)
        name = self.share("writing a probe of the directory", probe)
        answers = self.op("checking the ranks share the directory").everyone(probe(check=name))
        if self.rank == 0:
            probe(remove=name)
        blind = sorted(r for r, ok in answers.items() if not ok)
        if blind:
            raise CheckpointError(
                f"{self.uri}: {ranks_text(blind)} cannot see a file rank 0 wrote in this directory: every rank "
                "must save to the same storage (a shared filesystem, a bucket), not to its own local disk",
                self.uri)

    # -- agreement

    def share(self, what: str, compute) -> Any:
        """Rank 0's ``compute()`` on every rank (an error of it raised on every rank)."""
        op = self.op(what)
        if self.rank == 0:
            try:
                value = compute()
            except BaseException as e:
                op.fail(e)
                op.linger((), self.margin)   # rank 0 hosts the store: the others read the error first
                raise
            return op.share(value)
        return op.share()

    # -- the schedule

    def _event_key(self, *parts: Any) -> str:
        return "/".join(map(str, ("event", self.epoch, *parts)))

    def raise_event(self, preempt: bool) -> None:
        """A save is due on every rank (a preemption signal here, or rank 0's clock)."""
        store = self.store
        if preempt and not self.preempted:
            self.preempted = True
            store.add("preempted", 1)
        if self.raised != self.epoch:
            self.raised = self.epoch
            store.add(self._event_key("raised"), 1)
        self.last_look = 0.0      # look now

    def due(self, step: int) -> bool:
        """The event part of should_save(step): True at the agreed step."""
        store = self.store
        now = time.monotonic()
        if self.noticed is None and now - self.last_look >= POLL:
            self.last_look = now
            raised = store.add(self._event_key("raised"), 0)
            # after the event: a preempted rank marks "preempted" before it raises the event
            if not self.preempted and store.add("preempted", 0):
                self.preempted = True
            if raised:
                self.noticed = step
                store.set(self._event_key("noticed", self.rank), str(step))
                store.add(self._event_key("noticed", "n"), 1)
        if self.noticed is not None and self.target is None:
            if store.add(self._event_key("noticed", "n"), 0) >= self.world:
                steps = [int(store.get(self._event_key("noticed", r))) for r in range(self.world)]
                self.target = max(steps) + 1
                if step > self.target:
                    log.warning("%s: rank %d learned the agreed save step %d only at step %d (its ranks run more "
                                "than a step apart); it saves now", self.uri, self.rank, self.target, step)
        return self.target is not None and step >= self.target

    def consume(self, step: int) -> None:
        """A save of ``step`` happened: the event it was due for (if any) is done."""
        if self.target is not None and step >= self.target:
            if self.rank == 0 and self.epoch > 0:
                # the previous event's keys: every rank has saved for it, so has read them (this
                # event's may still be read by ranks that have not reached this save yet)
                old = self.epoch - 1
                delete_keys(self.store, ["/".join(map(str, ("event", old, *part)))
                                         for part in [*(("noticed", r) for r in range(self.world)), ("noticed", "n"),
                                                      ("raised",)]])
            self.epoch += 1
            self.noticed = self.target = None

    # -- restore

    def restore(self, candidates, load, mark_corrupt, explicit: bool):
        """Load the first of rank 0's ``candidates`` that every rank can; see ``CheckpointManager.restore``."""
        steps = self.share("choosing the step to restore", candidates)
        problems: list[str] = []
        for step in steps:
            op = self.op(f"restoring step {step}")
            error: BaseException | None = None
            state = None
            mine: dict[str, Any]
            try:
                state = load(step)
                mine = {"ok": True}
            except Exception as e:      # noqa: BLE001 - told to every rank, raised below
                error = e
                mine = {"ok": False, "corrupt": is_corruption(e), "error": f"{type(e).__name__}: {e}"[:1000]}
            said = op.everyone(mine)
            bad = {r: s for r, s in said.items() if not s["ok"]}
            if not bad:
                return step, state
            other = {r: s for r, s in bad.items() if not s["corrupt"]}
            if other:
                if error is not None and not is_corruption(error):
                    raise error
                raise CollectiveError(
                    f"{self.uri}: restoring step {step} failed on {ranks_text(other)}: "
                    + "; ".join(f"rank {r}: {s['error']}" for r, s in sorted(other.items())), self.uri,
                    tuple(sorted(other)))
            text = "; ".join(f"rank {r}: {s['error']}" for r, s in sorted(bad.items()))
            if explicit:
                if error is not None:
                    raise error
                raise CorruptCheckpointError(f"{self.uri}: step {step} does not verify on {ranks_text(bad)}: {text}",
                                             self.uri)
            log.warning("%s: step %d does not verify on %s, every rank falls back to an older step: %s",
                        self.uri, step, ranks_text(bad), text)
            mark_corrupt(step)
            problems.append(f"step {step}: {text}")
        return None, problems


# ---------------------------------------------------------------- the manager's calls on several ranks

def save_on_ranks(mgr: Any, step: int, state: Any, metrics: Any, force: bool):
    """``CheckpointManager.save`` on one rank of several (see collective.py)."""
    r: Ranks = mgr._ranks
    mgr.wait()    # the save in flight first (its error, on every rank)
    blocking = not mgr.async_save or mgr.preempted
    op = r.op(f"saving step {step}", background=not blocking)
    start = time.monotonic()
    try:
        metrics, replace = mgr._admit(step, metrics, force)
        known = mgr._known_steps()
        # encoded here, so a value the safe format refuses raises from save itself; async, the
        # blobs copied off the training tensors before save returns
        part = plan_part(state, allow_pickle=mgr.allow_pickle, copy=not blocking)
    except BaseException as e:
        op.fail(e)
        if r.rank == 0:
            op.linger((), r.margin)
        raise_here(op, e)
    mgr._last_start, mgr._signals_at_start = start, mgr._preemption.count
    known.add(step)
    mgr._floor = step if mgr._floor is None else max(mgr._floor, step)
    r.consume(step)
    incremental = mgr.incremental
    from .core import step_dir
    job = SaveJob(step=step, store=mgr._store.child(step_dir(step)),
                             shared=mgr._shared() if incremental else None, part=part,
                             meta={"step": step, "metrics": metrics or {}}, overwrite=replace,
                             index=mgr._shared_index() if incremental and r.rank == 0 else None,
                             margin=r.margin, compression=mgr.compression)
    with mgr._lock:
        mgr._in_flight.add(step)
    if blocking:
        info = _run_save(mgr, op, job, start)
        if not mgr.async_save:
            return info
        done: cf.Future = cf.Future()
        done.set_result(info)
        return SaveHandle(step, done)
    if mgr._executor is None:
        mgr._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-async-save",
                                              initializer=yield_to_training)
    mgr._pending_step = step
    mgr._pending = mgr._executor.submit(_run_save, mgr, op, job, start)
    log.info("%s: step %d: save() blocked training %.2f s on rank %d (the copy); writing in the background",
             mgr.directory, step, time.monotonic() - start, r.rank)
    return SaveHandle(step, mgr._pending)


def _run_save(mgr: Any, op: Op, job: Any, start: float):
    step = job.step
    try:
        m, info = save_step(op, job)
    except BaseException:
        if mgr._saved is not None:
            mgr._saved.discard(step)      # not saved: should_save may ask for it again
        raise
    finally:
        with mgr._lock:
            mgr._in_flight.discard(step)
    took = time.monotonic() - start
    log.info("%s: step %d saved by %d ranks in %.2f s", mgr.directory, step, mgr._ranks.world, took)
    mgr._check_grace(step, took)
    if m is not None:      # rank 0: the one process that removes anything
        if mgr.incremental:
            mgr._committed_incremental(step, m)
        mgr._retain_after(step)
    return info


def restore_on_ranks(mgr: Any, step: int | None, map_location, select: Any, into: Any) -> Any:
    """``CheckpointManager.restore`` on one rank of several: the same step on every rank."""
    mgr.wait()

    def candidates() -> list[int]:
        if step is not None:
            check_step(step)
            return [step]
        return mgr._restore_candidates(select)     # newest first; thinned steps only when they hold select

    found, got = mgr._ranks.restore(candidates, lambda s: mgr._load(s, map_location, select, into),
                                    mgr._corrupt.add, explicit=step is not None)
    if found is None:
        if got:
            raise CorruptCheckpointError(
                f"{mgr.directory}: none of the {len(got)} committed step(s) verifies on every rank; nothing was "
                "restored:\n  " + "\n  ".join(got), mgr.directory)
        if step is None and mgr.latest_step() is not None:
            from .core import thinned_message
            raise CheckpointError(thinned_message(mgr.directory, [f"step {s}" for s in mgr.steps()]),
                                  mgr.directory)
        return None
    mgr._restored(found)
    return got
