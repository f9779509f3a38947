"""CheckpointManager: one directory of step checkpoints for a training run.

Layout: ``<directory>/step-<N>/`` is an ordinary ckptstore checkpoint (see
docs/format.md) whose commit record carries ``meta = {"step", "metrics"}``.
A step is *committed* when its directory holds an intact commit record whose
data files are all present; its commit time is the record's mtime.

Retention never removes what it cannot prove committed (a step without an
intact commit record may be a save in flight, here or in another process),
the newest committed step, or the best one. Removing a step removes its
commit records first, so a half-removed step is never taken as committed.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import logging
import math
import re
import threading
import time
from typing import AbstractSet, Any, Iterator, Mapping

import torch

from ..compress import check_compression
from ..errors import (
    CheckpointError, CheckpointExistsError, ClaimHeldError, CorruptCheckpointError, MissingMetricError,
    StorageError, is_corruption,
)
from ..format import tree
from ..format.manifest import SHARED_DIR, FileName, Manifest, commit_generations, commit_name, generation_time
from ..info import CheckpointInfo
from ..incremental import SharedIndex, commit_step, listed_by, sweep
from ..reader import find_commit, load_manifest, open_commit
from ..stores import open_store
from ..stores.base import Store
from ..thin import holds, original_commit, thin_paths, thin_step, thinned_paths
from ..writer import remove_files, write_checkpoint
from .background import SaveHandle, live, snapshot, yield_to_training
from .ranks import Ranks, restore_on_ranks, save_on_ranks, world
from .retention import StepRecord, recency, to_keep, to_thin
from .schedule import Preemption, check_step, signal_numbers

log = logging.getLogger("ckptstore")

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ThinnedStep(Exception):
    """A step restore() found thinned when it read its record (another process thinned it)."""

    def __init__(self, paths: tuple[str, ...]):
        super().__init__(", ".join(paths))
        self.paths = paths


def thinned_message(directory: str, thinned: list[str]) -> str:
    return (f"{directory}: nothing was restored: every committed step was thinned and holds only part of the "
            f"state ({', '.join(thinned)}); restore(select=...) within what they hold takes the newest, and "
            "restore(step=N) returns what step N holds")


def step_dir(step: int) -> str:
    return f"step-{step}"


def step_of(store: Store) -> int:
    """The step of a step directory's store (``<run>/step-<N>``)."""
    return int(store.uri.rstrip("/").rsplit("/", 1)[-1][len("step-"):])


class CheckpointManager:
    """Saves, finds, restores and prunes the step checkpoints of one training run."""

    def __init__(self, directory: Any, *, keep_last: int | None = None, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min", keep_every: int | None = None,
                 max_age: float | None = None, async_save: bool = False,
                 storage_options: Mapping[str, Any] | None = None, incremental: bool = False,
                 save_interval_steps: int | None = None,
                 save_interval_seconds: float | None = None, preemption_signals: Any = None,
                 grace_seconds: float | None = None, allow_pickle: bool = False,
                 compression: str | None = None, thin_after: int | None = None, thin_select: Any = None,
                 upload_settle_seconds: float | None = 300.0, collective_timeout: float = 600.0,
                 _probe: bool = True, _collective: bool = True):
        v: Any
        for name, v in (("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every),
                        ("save_interval_steps", save_interval_steps)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive whole number or None, got {v!r}")
        for name, v in (("max_age", max_age), ("save_interval_seconds", save_interval_seconds),
                        ("grace_seconds", grace_seconds), ("upload_settle_seconds", upload_settle_seconds),
                        ("collective_timeout", collective_timeout)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number of seconds or None, got {v!r}")
        if type(incremental) is not bool:
            raise ValueError(f"incremental must be True or False, got {incremental!r}")
        if type(allow_pickle) is not bool:
            raise ValueError(f"allow_pickle must be True or False, got {allow_pickle!r}")
        self.allow_pickle = allow_pickle
        check_compression(compression)
        self.compression = compression
        # thinning: steps no longer among the thin_after newest keep only thin_select (thin.py)
        if (thin_after is None) != (thin_select is None):
            raise ValueError("thin_after and thin_select go together: thin_after=N thins the steps older than the "
                             "N newest to hold only thin_select (e.g. thin_after=2, thin_select='model')")
        if thin_after is not None and (isinstance(thin_after, bool) or not isinstance(thin_after, int)
                                       or thin_after < 1):
            raise ValueError(f"thin_after must be a positive whole number or None, got {thin_after!r}")
        self.thin_after = thin_after
        self.thin_select: list[tuple] | None = None if thin_select is None else thin_paths(thin_select)
        self._thin_lock = threading.Lock()                # one thinning at a time, none while restoring
        self._thin_skip: set[tuple[int, str]] = set()     # (step, generation) thinning left as it is, said once
        self.incremental = incremental
        self._index: SharedIndex | None = None   # the run's bytes, built at the first incremental save
        self._manifests: dict[int, Manifest] = {}   # step -> its commit record, as read or written here
        self._sweep_due = False                      # a save replaced a generation: its files may be unlisted
        signals = signal_numbers(preemption_signals)
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_best is not None and not best_metric:
            raise ValueError("keep_best needs best_metric (the key of metrics to rank steps by)")
        self.keep_last, self.keep_best, self.best_metric = keep_last, keep_best, best_metric
        self.best_mode, self.keep_every, self.max_age = best_mode, keep_every, max_age
        self.async_save = async_save
        self._store: Store = open_store(directory, storage_options)
        self.directory = self._store.uri
        self._records: dict[tuple[int, str], StepRecord] = {}   # (step, record name) -> what it said
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._pending: cf.Future | None = None
        self._pending_step: int | None = None
        self._executor: cf.ThreadPoolExecutor | None = None
        self._closed = False
        # the save schedule (see should_save)
        self.save_interval_steps, self.save_interval_seconds = save_interval_steps, save_interval_seconds
        self.grace_seconds = grace_seconds
        self.upload_settle_seconds = upload_settle_seconds
        self._last_start = time.monotonic()   # when the last save started (or the manager was made)
        self._saved: set[int] | None = None   # steps committed or in flight, read from the directory at first need
        self._floor: int | None = None        # no save below it without force (the newest step, or the one restored)
        self._corrupt: set[int] = set()       # steps restore() found corrupt: a save may replace them
        self._signals_at_start = 0            # preemption signals received when the last save started
        # several ranks of a torch.distributed job: the same manager on each, agreeing (ranks.py)
        where = world() if _collective else None
        self._ranks: Ranks | None = None
        if where is not None:
            self._ranks = Ranks(self.directory, float(collective_timeout), *where)
            self._ranks.join({"directory": self.directory, "keep_last": keep_last, "keep_best": keep_best,
                              "best_metric": best_metric, "best_mode": best_mode, "keep_every": keep_every,
                              "max_age": max_age, "async_save": async_save, "incremental": incremental,
                              "save_interval_steps": save_interval_steps,
                              "save_interval_seconds": save_interval_seconds, "allow_pickle": allow_pickle,
                              "compression": compression, "thin_after": thin_after,
                              "thin_select": [list(p) for p in self.thin_select or ()] or None},
                             self._probe_shared)
        elif _probe:
            self._probe()
        self._preemption = Preemption(signals, self.directory)
        live.add(self)

    # -- setup

    def _probe(self, keep: bool = False) -> str:
        """Prove the directory writable now, not at the first save hours into training; returns
        the probe's name (``keep``: the probe stays, for the ranks to look for)."""
        store = self._store
        name = f".ckptstore-probe-{time.time_ns():x}"
        try:
            with store.errors("probe a write to"):
                store.makedirs()
                store.put(name, b"ckptstore write probe\n")
                if not keep:
                    store.remove([name])
        except CheckpointError as e:
            raise StorageError(
                f"{self.directory} is not writable for checkpoints: {e}", self.directory,
                errno=getattr(e, "errno", None)) from None
        return name

    def _probe_shared(self, check: str | None = None, remove: str | None = None):
        """Rank 0 writes a probe (returns its name); each rank checks it sees it; rank 0 removes it."""
        if remove is not None:
            with self._store.errors("remove a probe from"):
                self._store.remove([remove])
            return None
        if check is not None:
            return check in (self._store.list() or {})
        return self._probe(keep=True)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r})"

    # -- the schedule

    @property
    def preempted(self) -> bool:
        """True once one of ``preemption_signals`` has arrived (on any rank, in a multi-rank job,
        once this rank has heard of it)."""
        return self._preemption.count > 0 or (self._ranks is not None and self._ranks.preempted)

    @property
    def last_signal(self) -> int | None:
        """The last preemption signal that arrived, or None."""
        return self._preemption.last

    @property
    def pending_step(self) -> int | None:
        """The step of the async save in flight, if any."""
        return self._pending_step

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due for a save: a multiple of ``save_interval_steps``, at least
        ``save_interval_seconds`` since the last save started (or the manager was created), or a
        preemption signal since the last save started. Never for a step already saved."""
        check_step(step)
        if self._ranks is not None:
            return self._should_save_ranks(step)
        if step in self._known_steps():
            return False
        if self._preemption.count > self._signals_at_start:
            return True
        if self.save_interval_steps is not None and step % self.save_interval_steps == 0:
            return True
        return self.save_interval_seconds is not None and \
            time.monotonic() - self._last_start >= self.save_interval_seconds

    def _should_save_ranks(self, step: int) -> bool:
        """should_save on one rank of several: the same answer on every rank (ranks.py)."""
        r = self._ranks
        assert r is not None
        if self._preemption.count > self._signals_at_start:
            r.raise_event(preempt=True)
        elif r.rank == 0 and self.save_interval_seconds is not None and \
                time.monotonic() - self._last_start >= self.save_interval_seconds:
            r.raise_event(preempt=False)
        due = r.due(step)
        if step in self._known_steps():
            return False
        return due or (self.save_interval_steps is not None and step % self.save_interval_steps == 0)

    # -- discovery

    def _scan(self, read: bool = False, listings: dict | None = None) -> list[StepRecord]:
        """Every step directory, from one listing of the run.

        Without ``read``, a step counts as committed when it holds a commit
        record, and its commit time is the record's mtime: no request per
        step (a record read before is used as read; else ``exact`` is False:
        a thinned step's record gives an earlier time, see ``_newest_first``).
        With ``read``, each step's newest intact commit record is read (once
        per manager: a record never changes; thinning commits a new one) to
        prove the commit and get its metrics. ``listings`` receives the
        listing of each step directory.
        """
        tree = self._store.tree()
        if listings is not None:
            listings.update(tree)
        out = []
        for d, listing in tree.items():
            m = _STEP_DIR.match(d)
            if not m:
                continue
            step = int(m.group(1))
            gens = commit_generations(listing)
            if not gens:
                out.append(StepRecord(step, False, None))
                continue
            if not read:
                known = self._records.get((step, commit_name(gens[0])))
                if known is not None:
                    out.append(known)
                    continue
                entry = listing[commit_name(gens[0])]
                out.append(StepRecord(step, True, entry.mtime, None, generation_time(gens[0]), exact=False))
                continue
            key = (step, commit_name(gens[0]))
            rec = self._records.get(key)
            if rec is None:
                rec = self._read_record(step, listing)
                if rec.committed:
                    self._records[key] = rec
            out.append(rec)
        return sorted(out, key=lambda r: r.step)

    def _read_record(self, step: int, listing: dict) -> StepRecord:
        store = self._store.child(step_dir(step))
        try:
            found = find_commit(store, listing)
        except CheckpointError as e:
            log.warning("%s: cannot read step %d: %s", self.directory, step, e)
            return StepRecord(step, False, None)
        m: Manifest | None = found.manifest
        if m is None:
            return StepRecord(step, False, None)
        entry = listing.get(commit_name(m.generation))
        when = entry.mtime if entry is not None and entry.mtime is not None else m.created
        order = generation_time(m.generation)
        thinned = thinned_paths(m.meta)
        if thinned is not None:
            # thinning is not a commit: the step keeps the place of the commit that held everything
            first = original_commit(m.meta)
            if first is not None:
                when, order = first[0], generation_time(first[1])
        return StepRecord(step, True, when, dict(m.meta.get("metrics") or {}), order, thinned=thinned,
                          generation=m.generation)

    def _newest_first(self, records: list[StepRecord], listings: dict) -> Iterator[StepRecord]:
        """The committed ``records``, most recently committed first, reading a record only when
        its place is in question.

        A record of the listing alone (not ``exact``) has its record's mtime as its time. A
        thinned step's record is newer than the commit that held everything, whose time it
        gives (thin.py); its generation id sorts where that commit's did. So a step's place is
        in question only where the two clocks disagree: its record's mtime is later than that
        of a step whose generation began later (saves of a run commit one after another, so
        without thinning they agree and nothing is read). The listing's time bounds the true
        one from above: a step in question is read when its bound comes first, and yielded
        once its true time is known and no other step's bound is later; one whose record
        cannot be read goes at its listing's place (loading it says what is wrong).
        """
        committed = [r for r in records if r.committed]
        doubt: set[int] = set()
        earliest = math.inf     # the earliest commit time of the steps whose generations began later
        for r in sorted(committed, key=lambda r: (r.order, r.step), reverse=True):
            if not r.exact and (r.time or 0.0) > earliest:
                doubt.add(r.step)
                earliest = -math.inf    # its true time is not known: every step before it is in question
            earliest = min(earliest, r.time or 0.0)
        heap = [(tuple(-x for x in recency(r)), n, r) for n, r in enumerate(committed)]
        heapq.heapify(heap)
        while heap:
            _, n, r = heapq.heappop(heap)
            if r.exact or r.step not in doubt:
                yield r
                continue
            listing = listings.get(step_dir(r.step)) or {}
            gens = commit_generations(listing)
            rec = self._read_record(r.step, listing) if gens else StepRecord(r.step, False, None)
            if not rec.committed:
                yield r
                continue
            self._records[(r.step, commit_name(gens[0]))] = rec
            heapq.heappush(heap, (tuple(-x for x in recency(rec)), n, rec))

    def steps(self) -> list[int]:
        """Committed steps, ascending (one listing of the run; rank 0's, on every rank)."""
        if self._ranks is not None:
            return self._ranks.share("listing the steps", self._local_steps)
        return self._local_steps()

    def _local_steps(self) -> list[int]:
        return [r.step for r in self._scan() if r.committed]

    def latest_step(self) -> int | None:
        """The most recently committed step (by commit time), or None (rank 0's, on every rank)."""
        if self._ranks is not None:
            return self._ranks.share("finding the latest step", self._local_latest)
        return self._local_latest()

    def _local_latest(self) -> int | None:
        listings: dict = {}
        newest = next(self._newest_first(self._scan(listings=listings), listings), None)
        return None if newest is None else newest.step

    # -- saving

    def _known_steps(self) -> set[int]:
        """Steps committed (one listing of the run, at first need) or saved by this manager."""
        if self._saved is None:
            with self._lock:
                in_flight = set(self._in_flight)
            committed = set(self._local_steps())
            self._saved = (committed - self._corrupt) | in_flight
            if self._floor is None and committed:
                self._floor = max(committed)
        return self._saved

    def save(self, step: int, state: Any, *, metrics: Mapping[str, Any] | None = None,
             force: bool = False):
        """Save ``state`` as ``step``. Returns a CheckpointInfo, or with ``async_save`` a
        handle whose ``result()`` gives it, once the state has been copied away.

        Refused before anything is written, unless ``force``: a step already committed or in
        flight (CheckpointExistsError), and a step below the newest committed one (ValueError:
        a run restarted from scratch must not replace what it would resume from; ``restore``
        first, and saves after the restored step are accepted). A value the safe format cannot
        hold raises UnsupportedObjectError here, async or not. An error of an earlier async
        save is raised here.
        """
        if self._closed:
            raise CheckpointError(f"{self.directory}: the manager is closed")
        if self._ranks is not None:
            return save_on_ranks(self, step, state, metrics, force)
        metrics, replace = self._admit(step, metrics, force)
        start = time.monotonic()
        self.wait()   # at most one save in flight; raises the previous one's error
        return self._save_admitted(step, state, metrics, replace, force, start)

    def _admit(self, step: int, metrics, force: bool) -> tuple[dict | None, bool]:
        """The checks a save passes before anything is written: (metrics, replace)."""
        check_step(step)
        metrics = self._check_metrics(metrics)
        if metrics is not None and self.best_metric is not None and self.best_metric not in metrics:
            raise MissingMetricError(
                f"{self.directory}: step {step}: metrics lack best_metric {self.best_metric!r} (given: "
                f"{', '.join(map(repr, sorted(metrics))) or 'none'}); pass it, or metrics=None for a step "
                "without one", self.best_metric)
        if not force and self._pending is not None and self._pending_step == step and not self._pending.done():
            raise CheckpointExistsError(f"{self.directory}: step {step} is being saved already (async, in flight); "
                                        "pass force=True to replace it", self.directory)
        known = self._known_steps()
        replace = force or step in self._corrupt
        if not replace and step in known:
            raise CheckpointExistsError(
                f"{self.directory}: step {step} is already committed; pass force=True to replace it", self.directory)
        if not force and self._floor is not None and step < self._floor:
            raise ValueError(
                f"{self.directory}: step {step} is lower than step {self._floor}, the newest committed step here; "
                "a run that starts over would overwrite or prune what it could resume from. Call restore() first "
                "to resume, use another directory, or pass force=True to save it anyway")
        if step in self._corrupt and not force:
            log.warning("%s: step %d did not verify when restored; this save replaces it", self.directory, step)
        return metrics, replace

    def _save_admitted(self, step: int, state: Any, metrics: dict | None, replace: bool, force: bool,
                       start: float):
        known = self._known_steps()
        self._last_start, self._signals_at_start = start, self._preemption.count
        known.add(step)
        self._floor = step if self._floor is None else max(self._floor, step)
        if not self.async_save or self.preempted:
            # Preempted: the process is about to go, so this save is committed before save returns.
            try:
                info = self._write(step, state, metrics, replace, None)
            except BaseException:
                known.discard(step)
                raise
            took = time.monotonic() - start
            log.info("%s: step %d saved in %.2f s%s", self.directory, step, took,
                     " (preempted: blocking)" if self.preempted else "")
            self._check_grace(step, took)
            if not self.async_save:
                return info
            done: cf.Future = cf.Future()
            done.set_result(info)
            return SaveHandle(step, done)
        try:
            copied, devices = snapshot(state)
            # encoded here, so a value the safe format refuses raises from save itself
            encoded = tree.encode(copied, allow_pickle=self.allow_pickle, devices=devices)
        except BaseException:
            known.discard(step)
            raise
        if self._executor is None:
            self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptstore-async-save",
                                                   initializer=yield_to_training)
        with self._lock:
            self._in_flight.add(step)
        self._pending_step = step
        self._pending = self._executor.submit(self._write_timed, step, encoded, metrics, replace, devices)
        log.info("%s: step %d: save() blocked training %.2f s (the copy); writing in the background",
                 self.directory, step, time.monotonic() - start)
        return SaveHandle(step, self._pending)

    def _write_timed(self, step: int, encoded: tuple, metrics: dict | None, force: bool, devices: dict | None):
        start = time.monotonic()
        try:
            info = self._write(step, None, metrics, force, devices, encoded)
        except BaseException:
            if self._saved is not None:
                self._saved.discard(step)     # not saved: should_save may ask for it again
            raise
        took = time.monotonic() - start
        log.info("%s: step %d written in the background in %.2f s", self.directory, step, took)
        self._check_grace(step, took)
        return info

    def _check_grace(self, step: int, took: float) -> None:
        """Warn when a save would not fit the grace window a preemption leaves."""
        if self.grace_seconds is not None and took > self.grace_seconds:
            log.warning("%s: saving step %d took %.1f s, longer than grace_seconds=%g: a save after a "
                        "preemption signal may not finish before the machine goes", self.directory, step,
                        took, self.grace_seconds)

    @staticmethod
    def _check_metrics(metrics) -> dict | None:
        if metrics is None:
            return None
        out = {}
        for k, v in metrics.items():
            if not isinstance(k, str):
                raise TypeError(f"metrics keys must be str, got {k!r}")
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if hasattr(v, "item") and not isinstance(v, (int, float, str, bool)):
                v = v.item()   # numpy scalars
            if v is not None and not isinstance(v, (int, float, str, bool)):
                raise TypeError(f"metrics[{k!r}] must be a number, str, bool or None, got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                v = None   # JSON cannot hold nan or inf; such a metric ranks as absent
            out[k] = v
        return out

    def _write(self, step: int, state: Any, metrics: dict | None, force: bool, devices: dict | None,
               encoded: tuple | None = None) -> CheckpointInfo:
        store = self._store.child(step_dir(step))
        with self._lock:
            self._in_flight.add(step)
        try:
            with store.errors("save to"):
                meta = {"step": step, "metrics": metrics or {}}
                if self.incremental:
                    info = self._write_incremental(store, state, force, meta, devices, encoded)
                else:
                    info = write_checkpoint(store, state, overwrite=force, meta=meta, devices=devices,
                                            allow_pickle=self.allow_pickle, encoded=encoded,
                                            compression=self.compression)
        except ClaimHeldError as e:
            raise ClaimHeldError(f"{self.directory}: step {step}: {e}", self.directory) from e
        except CheckpointExistsError as e:
            raise CheckpointExistsError(
                f"{self.directory}: step {step} is already committed; pass force=True to replace it",
                self.directory) from e
        finally:
            with self._lock:
                self._in_flight.discard(step)
        self._retain_after(step)
        return info

    def _retain_after(self, step: int) -> None:
        """Retention once ``step`` is committed (a failure of it harms nothing else: logged)."""
        try:
            self._prune(check_metric=False)
        except CheckpointError as e:
            log.warning("%s: retention after step %d failed (nothing else is affected): %s",
                        self.directory, step, e)

    # -- incremental steps

    def _shared(self) -> Store:
        return self._store.child(SHARED_DIR)

    def _committed_manifests(self) -> dict[int, Manifest]:
        """The commit record of every committed step: one listing of the run, and a read of
        each record this manager has not read or written itself (records never change; a step
        replaced with force=True here updates the cache)."""
        out = {}
        for step in self._local_steps():
            m = self._manifests.get(step)
            if m is None:
                try:
                    m, _ = open_commit(self._store.child(step_dir(step)))
                except CheckpointError:
                    continue
                self._manifests[step] = m
            out[step] = m
        for step in set(self._manifests) - set(out):
            del self._manifests[step]
        return out

    def _write_incremental(self, store: Store, state: Any, force: bool, meta: dict,
                           devices: dict | None, encoded: tuple | None = None) -> CheckpointInfo:
        m, info = commit_step(store, state, self._shared_index(), overwrite=force, meta=meta, devices=devices,
                              allow_pickle=self.allow_pickle, encoded=encoded, compression=self.compression,
                              apart=self.thin_select)
        self._committed_incremental(step_of(store), m)
        return info

    def _shared_index(self) -> SharedIndex:
        """The run's bytes, built from its committed records at the first incremental save."""
        if self._index is None:
            self._index = SharedIndex()
            for m in self._committed_manifests().values():
                self._index.add(m)
        return self._index

    def _committed_incremental(self, step: int, m: Manifest) -> None:
        """An incremental ``step`` committed as ``m``: a generation it replaced may leave files unlisted."""
        self._sweep_due = self._sweep_due or step in self._manifests
        self._manifests[step] = m

    def _sweep_shared(self, dry_run: bool = False) -> list[str]:
        """Remove the shared data files no committed step lists and no save in flight may list."""
        def live() -> set[str]:
            return listed_by(self._committed_manifests().values())
        dead = sweep(self._store, live, dry_run=dry_run)
        if dead and not dry_run and self._index is not None:
            self._index.forget(set(dead))
        return dead

    def wait(self) -> None:
        """Block until the save in flight is committed; re-raise its error."""
        fut = self._pending
        if fut is None:
            return
        try:
            fut.result()
        finally:
            if self._pending is fut:
                self._pending = None
                self._pending_step = None

    # -- restoring

    def restore(self, step: int | None = None, *, map_location=None, select: Any = None, into: Any = None) -> Any:
        """The state of ``step``; without one, of the newest step that verifies.

        Only corruption of what is stored (errors.is_corruption: a failed checksum, size or
        structure check, missing bytes) makes it pass a step over, with a warning naming it;
        every other error (a ``map_location`` this machine cannot serve, an ``into`` that does
        not fit, out of memory, a backend failure) raises at once, as from ``load``. Returns
        None only when no step is committed; when steps are and none verifies, raises
        CorruptCheckpointError naming each. ``select`` and ``into`` mean what they mean for
        ``ckptstore.load``; a step that fails its checksums part-way through filling ``into``
        is passed over for the one before it, which fills the same tensors again. Saves of
        steps after the restored one are accepted from then on.

        A thinned step (``thin_after``) is taken only when it holds everything asked for
        (``select`` inside what it kept); one passed over for that is named in a warning. When
        every step is thinned and none holds it, it raises ``CheckpointError`` saying so (not
        None: steps exist, and a run must not start again from scratch over them).
        ``restore(step=N)`` returns what step N holds, thinned or not.
        """
        if self._ranks is not None:
            return restore_on_ranks(self, step, map_location, select, into)
        if step is not None:
            check_step(step)
            with self._thin_lock:
                state = self._load(step, map_location, select, into)
            self._restored(step)
            return state
        problems: list[str] = []
        thinned: list[str] = []
        with self._thin_lock:      # no thinning here meanwhile: a step read is the step chosen
            listings: dict = {}
            for r in self._newest_first(self._scan(listings=listings), listings):
                if r.thinned is not None and not holds(r.thinned, select):
                    thinned.append(self._skip_thinned(r.step, r.thinned))
                    continue
                try:
                    state = self._load(r.step, map_location, select, into, whole=True)
                except ThinnedStep as e:     # thinned by another process since the listing
                    thinned.append(self._skip_thinned(r.step, e.paths))
                    continue
                except Exception as e:
                    if not is_corruption(e):
                        raise
                    log.warning("%s: step %d does not verify, falling back to an older step: %s",
                                self.directory, r.step, e)
                    problems.append(f"step {r.step}: {e}")
                    self._corrupt.add(r.step)
                    continue
                self._restored(r.step)
                return state
        also = f"\n  (and {len(thinned)} thinned step(s) that hold only part of the state: " \
               f"{', '.join(thinned)})" if thinned else ""
        if problems:
            raise CorruptCheckpointError(
                f"{self.directory}: none of the {len(problems)} committed step(s) verifies; nothing was "
                "restored:\n  " + "\n  ".join(problems) + also, self.directory)
        if thinned:
            raise CheckpointError(thinned_message(self.directory, thinned), self.directory)
        return None

    def _skip_thinned(self, step: int, paths: tuple[str, ...]) -> str:
        what = f"step {step} (thinned to {', '.join(paths)})"
        log.warning("%s: step %d was thinned to %s; skipped (it does not hold everything restore() was asked "
                    "for; restore(step=%d) returns what it holds)", self.directory, step, ", ".join(paths), step)
        return what

    def _restore_candidates(self, select: Any) -> list[int]:
        """The steps ``restore()`` tries, newest first: those that hold what ``select`` asks for
        (the thinned ones passed over before the first of them are named in a warning). Every
        step's record is read (once per manager), to know which are thinned."""
        listings: dict = {}
        out: list[int] = []
        for r in self._newest_first(self._scan(listings=listings), listings):
            if not r.exact:
                listing = listings.get(step_dir(r.step)) or {}
                read = self._read_record(r.step, listing)
                if read.committed:
                    self._records[(r.step, commit_name(commit_generations(listing)[0]))] = read
                    r = read
            if r.thinned is not None and not holds(r.thinned, select):
                if not out:
                    self._skip_thinned(r.step, r.thinned)
                continue
            out.append(r.step)
        return out

    def _restored(self, step: int) -> None:
        """Training resumes after ``step``: saves from there on are not a restart from scratch,
        and the corrupt steps passed over are due again."""
        self._floor = step
        if self._saved is not None:
            self._saved -= self._corrupt

    def _load(self, step: int, map_location, select: Any = None, into: Any = None, whole: bool = False) -> Any:
        """The state of ``step``; ``whole``: ThinnedStep, before any data is read, when the step is
        thinned and does not hold all of ``select``."""
        store = self._store.child(step_dir(step))
        ranks = (self._ranks.rank, self._ranks.world) if self._ranks is not None else None
        with store.errors("restore"):
            m, _ = open_commit(store)
        kept = thinned_paths(m.meta)
        if whole and kept is not None and not holds(kept, select):
            raise ThinnedStep(kept)
        with store.errors("restore"):
            return load_manifest(store, m, map_location=map_location, select=select, into=into,
                                 allow_pickle=self.allow_pickle, ranks=ranks)

    # -- retention

    def prune(self, *, dry_run: bool = False) -> list[int]:
        """Remove the steps the retention policy does not keep; returns them.

        ``dry_run=True`` only says which steps it would remove. With ``best_metric``, a run
        whose steps hold metrics but never that one raises MissingMetricError naming the
        metrics they hold (a typo would otherwise rank no step best, and keep none for it).
        With ``thin_after``, the kept steps older than the ``thin_after`` newest are then
        thinned to ``thin_select`` (not with ``dry_run``).
        """
        if self._ranks is not None:
            return self._ranks.share("pruning", lambda: self._prune(dry_run=dry_run))
        return self._prune(dry_run=dry_run)

    def _prune(self, *, dry_run: bool = False, check_metric: bool = True) -> list[int]:
        return self._prune_and_thin(dry_run=dry_run, check_metric=check_metric)[0]

    def _has_policy(self) -> bool:
        return not (self.keep_last is None and self.keep_best is None and self.keep_every is None
                    and self.max_age is None)

    def _prune_and_thin(self, *, dry_run: bool = False, check_metric: bool = True) -> tuple[list[int], list[int]]:
        """Retention, then thinning: (steps removed, steps thinned), or with ``dry_run`` the
        steps each would touch now. One listing of the run serves the whole pass."""
        removed: list[int] = []
        thinned: list[int] = []
        if self._has_policy() or self.thin_after is not None:
            listings: dict = {}
            records = self._scan(read=True, listings=listings)
            plan = self._plan_prune(records, check_metric)
            if dry_run:
                return plan, [step for step, _ in self._plan_thin(records, removed=set(plan))]
            for step in plan:
                self._remove_step(step)
                removed.append(step)
            thinned = self._thin_old(records, removed=set(removed))
            self._retire_settled(listings, skip=set(removed) | set(thinned))
        if (removed or self._sweep_due) and (self.incremental or self._shared().list() is not None):
            # the bytes only the removed steps (or replaced generations) listed; also from a manager
            # that only prunes an incremental run (`ckptstore prune`)
            self._sweep_due = False
            self._sweep_shared()
        if removed:
            log.info("%s: retention removed steps %s", self.directory, removed)
        return removed, thinned

    def _retire_settled(self, listings: dict, skip: AbstractSet[int]) -> None:
        """On a mount that uploads in the background, a step's older generation (the whole
        state a thinning rewrote, or a step replaced with force=True) is kept while its newer
        one may not have reached the remote (``writer.Generation.retire_older``). Once the
        newer record has had ``upload_settle_seconds`` to get there, the older one goes, so
        thinning frees its bytes on a Drive too. Only behind a newest record that is intact,
        never in a step being saved. ``listings``: the run's, from this pass's scan; the steps in
        ``skip`` it removed or rewrote since."""
        if not self._store.keep_previous or self.upload_settle_seconds is None:
            return
        now = time.time()
        with self._lock:
            in_flight = set(self._in_flight)
        for d, listing in listings.items():
            m = _STEP_DIR.match(d)
            if not m or int(m.group(1)) in in_flight or int(m.group(1)) in skip:
                continue
            gens = commit_generations(listing)
            if len(gens) < 2:
                continue
            committed = listing[commit_name(gens[0])].mtime
            if committed is None or now - committed < self.upload_settle_seconds:
                continue
            store = self._store.child(d)
            try:
                found = find_commit(store, listing)
                if found.manifest is None or found.manifest.generation != gens[0]:
                    continue
                remove_files(store, [n for n in listing if (f := FileName.parse(n)) is not None
                                     and f.gen < gens[0]])
            except CheckpointError as e:
                log.warning("%s: could not remove the superseded generations of %s (nothing else is "
                            "affected): %s", self.directory, d, e)

    # -- thinning

    def _plan_thin(self, records: list[StepRecord], removed: AbstractSet[int] = frozenset()
                   ) -> list[tuple[int, str | None]]:
        """(step, generation) of each committed step of ``records`` thinning would rewrite now,
        those in ``removed`` gone (thin.py)."""
        if self.thin_after is None:
            return []
        with self._lock:
            in_flight = set(self._in_flight)
        steps = set(to_thin(records, thin_after=self.thin_after, in_flight=in_flight, removed=removed))
        return [(r.step, r.generation) for r in records if r.step in steps
                and (r.step, r.generation or "") not in self._thin_skip]

    def _thin_old(self, records: list[StepRecord], removed: AbstractSet[int]) -> list[int]:
        """Thin every kept step older than the ``thin_after`` newest to ``thin_select``; returns them.

        Each step is rewritten as a new generation of its directory (thin.py): a kill at any
        instant leaves it whole or thinned. A step that cannot be thinned (it holds none of
        ``thin_select``, its bytes fail their checksums) is left as it is, with a warning,
        once. An incremental step's record then lists fewer shared files: what only the
        dropped values held is swept, and the run's index of reusable bytes is rebuilt.
        """
        if self.thin_after is None or self.thin_select is None:
            return []
        done: list[int] = []
        with self._thin_lock:
            for step, gen in self._plan_thin(records, removed):
                store = self._store.child(step_dir(step))
                try:
                    out = thin_step(store, self.thin_select, expect=gen)
                except CorruptCheckpointError as e:
                    log.warning("%s: step %d was not thinned (it stays whole): %s", self.directory, step, e)
                    self._thin_skip.add((step, gen or ""))
                    continue
                m = out.manifest
                if m is None:
                    if out.skipped != "it changed meanwhile":
                        log.warning("%s: step %d was not thinned (it stays as it is): %s", self.directory, step,
                                    out.skipped)
                        self._thin_skip.add((step, gen or ""))
                    continue
                if out.missing:
                    log.warning("%s: step %d was thinned to %s; it holds no %s", self.directory, step,
                                ", ".join(m.meta["thinned"]), ", ".join("/".join(map(str, p)) for p in out.missing))
                done.append(step)
                self._records = {k: v for k, v in self._records.items() if k[0] != step}
                if m.files[0].dir == SHARED_DIR:
                    # its record lists fewer shared files: sweep them, and reuse none of their bytes
                    self._manifests[step] = m
                    self._index = None
                    self._sweep_due = True
                else:
                    self._manifests.pop(step, None)
        if done:
            log.info("%s: thinned steps %s to %s", self.directory, done,
                     ", ".join("/".join(map(str, p)) for p in self.thin_select))
        return done

    def _plan_prune(self, records: list[StepRecord], check_metric: bool = False) -> list[int]:
        """The committed steps of ``records`` the policy would remove now, ascending."""
        if not self._has_policy():
            return []
        if check_metric and self.best_metric is not None:
            held = set().union(*(r.metrics or {} for r in records if r.committed))
            if held and self.best_metric not in held:
                raise MissingMetricError(
                    f"{self.directory}: no step holds the metric {self.best_metric!r} to rank by (the steps hold: "
                    f"{', '.join(map(repr, sorted(held)))}); nothing was removed", self.best_metric)
        with self._lock:
            in_flight = set(self._in_flight)
        keep = to_keep(records, now=time.time(), keep_last=self.keep_last, keep_best=self.keep_best,
                       best_metric=self.best_metric, best_mode=self.best_mode, keep_every=self.keep_every,
                       max_age=self.max_age, in_flight=in_flight,
                       settle=self.upload_settle_seconds if self._store.keep_previous else None)
        return [r.step for r in records if r.committed and r.step not in keep]

    def _remove_step(self, step: int) -> None:
        """Commit records first, then data: a half-removed step is never taken as committed.

        Only files of committed or superseded generations listed now are
        removed; files of a save that another process is writing into the same
        step stay (it commits later, or gc removes them after its grace period).
        """
        store = self._store.child(step_dir(step))
        listing = store.list() or {}
        gens = commit_generations(listing)
        if not gens:
            return
        remove_files(store, [n for n in listing if (f := FileName.parse(n)) is not None and f.gen <= gens[0]])
        store.remove_dir()
        self._records = {k: v for k, v in self._records.items() if k[0] != step}

    # -- lifetime

    def close(self) -> None:
        """Wait for the save in flight (re-raising its error) and release the writer thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._preemption.uninstall()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._ranks is not None:
                self._ranks.release()
            live.discard(self)

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as e:  # noqa: BLE001 - the exception already propagating matters more
            log.error("%s: the pending save failed while handling another error: %s", self.directory, e)
