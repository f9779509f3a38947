"""Retention as a pure function: which committed steps a policy keeps. No I/O.

``to_keep`` takes what the manager knows of each step (``StepRecord``) and the
policy, and returns the steps to keep: the union of the rules, plus, always,
the newest committed step, the best one, saves in flight and every step not
proven committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import AbstractSet as Set


@dataclass
class StepRecord:
    """What retention knows of one step."""

    step: int
    committed: bool           # an intact commit record was read
    time: float | None        # commit time (mtime of the record), seconds since the epoch
    metrics: dict | None = None
    order: float = 0.0        # the generation's own clock: breaks ties of coarse mtimes (S3: 1 s)
    # A thinned step (thin.py) holds only these paths (keys joined by "/"); None: the whole state.
    # Its time and order are those of the commit that held everything: thinning is not a commit.
    thinned: tuple[str, ...] | None = None
    generation: str | None = None   # the generation read, when the record was read
    exact: bool = True        # False: time and order from the listing alone, which a thinned step's
                              # record corrects (never upwards: see CheckpointManager._newest_first)


def recency(r: StepRecord) -> tuple[float, float, int]:
    """The order of commit: time, then the generation's clock, then the step."""
    return (r.time or 0.0, r.order, r.step)


def metric_of(r: StepRecord, name: str | None) -> float | None:
    if name is None or not r.metrics or name not in r.metrics:
        return None
    v = r.metrics[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def best_steps(records: list[StepRecord], best_metric: str | None, best_mode: str, n: int) -> list[int]:
    """The ``n`` committed steps with the best ``metrics[best_metric]``, best first."""
    scored = [(m, r.step) for r in records if r.committed and (m := metric_of(r, best_metric)) is not None]
    scored.sort(key=lambda x: (x[0] if best_mode == "min" else -x[0], -x[1]))
    return [s for _, s in scored[:n]]


def to_keep(records: list[StepRecord], *, now: float, keep_last: int | None, keep_best: int | None,
            best_metric: str | None, best_mode: str, keep_every: int | None, max_age: float | None,
            in_flight: Set[int] = frozenset(), settle: float | None = None) -> set[int]:
    """Steps retention keeps. With no policy, all of them.

    The union of the ``keep_last`` most recently committed, the ``keep_best``
    best, every step divisible by ``keep_every`` and everything committed less
    than ``max_age`` seconds ago; plus, always, the newest committed step, the
    best one, saves in flight, and every step not proven committed with a
    known commit time.

    ``settle`` (on a mount that uploads in the background) is how long after
    its commit a step is taken to have reached the remote: the newest step
    that old is kept too, and the oldest step after it (the next to become that
    old), so a machine that dies with the newer steps still uploading leaves
    one behind, and that one is never more than about ``2 * settle`` old.
    """
    every = {r.step for r in records}
    if keep_last is None and keep_best is None and keep_every is None and max_age is None:
        return every
    committed = [r for r in records if r.committed and r.time is not None]
    times = {r.step: r.time for r in committed if r.time is not None}   # every committed step's, known
    keep = {r.step for r in records if not (r.committed and r.time is not None)} | set(in_flight)
    by_time = sorted(committed, key=lambda r: (r.time, r.order, r.step), reverse=True)
    if by_time:
        keep.add(by_time[0].step)                                   # the newest, always
    if keep_last:
        keep.update(r.step for r in by_time[:keep_last])
    best = best_steps(committed, best_metric, best_mode, max(keep_best or 0, 1))
    if best:
        keep.add(best[0])                                           # the best, always
        if keep_best:
            keep.update(best[:keep_best])
    if keep_every:
        keep.update(r.step for r in committed if r.step % keep_every == 0)
    if max_age is not None:
        keep.update(r.step for r in committed if now - times[r.step] < max_age)
    if settle is not None and by_time:
        # The net under the uploads: the newest step old enough to have reached the
        # remote, and the oldest step after it, kept until it is that old in turn
        # (so the net moves on however fast saves come and go).
        # by_time is newest first, so the steps that old are a suffix of it, from index k
        k = next((i for i, r in enumerate(by_time) if now - times[r.step] >= settle), len(by_time))
        if k < len(by_time):
            keep.add(by_time[k].step)
        if k > 0:
            keep.add(by_time[k - 1].step)
    return keep & every


def to_thin(records: list[StepRecord], *, thin_after: int | None, in_flight: Set[int] = frozenset(),
            removed: Set[int] = frozenset()) -> list[int]:
    """Steps thinning rewrites now, ascending: every committed step (of a known commit time, not
    ``removed``) that is not among the ``thin_after`` most recently committed, is not thinned yet,
    and is not being saved. A thinned step keeps its place in the order (its record says when the
    whole state was committed), so thinning never makes a step newer."""
    if thin_after is None:
        return []
    committed = [r for r in records if r.committed and r.time is not None and r.step not in removed]
    by_time = sorted(committed, key=recency, reverse=True)
    return sorted(r.step for r in by_time[thin_after:] if r.thinned is None and r.step not in in_flight)
