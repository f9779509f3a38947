"""Finding and removing what interrupted or superseded saves left behind.

In a checkpoint directory everything that is ours (named by generation, see
format/manifest.py) belongs either to the newest committed generation, which
is kept, or is garbage: older generations a later save superseded, and newer
ones from saves that died before their commit. Those newer ones are removed
only once older than a grace period, because a save still running in another
process looks exactly like a dead one until it commits. Files whose names are
not ours are never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .errors import FormatTooNewError
from .format.manifest import SHARED_DIR, FileName, generation_time
from .incremental import listed_by, run_records, sweep
from .reader import find_commit
from .stores.base import Store
from .writer import remove_files

log = logging.getLogger("ckptstore")

DEFAULT_GRACE = 3600.0  # seconds; longer than any single save is expected to take


@dataclass
class Leftover:
    store: Store
    name: str
    size: int
    reason: str

    @property
    def uri(self) -> str:
        return self.store.uri.rstrip("/") + "/" + self.name


def leftovers_in(store: Store, grace: float = DEFAULT_GRACE, now: float | None = None,
                 young: list[Leftover] | None = None) -> list[Leftover]:
    """Garbage in one checkpoint directory (not recursive). Uncommitted files the grace period
    still protects are appended to ``young``, if given."""
    listing = store.list()
    if not listing:
        return []
    now = time.time() if now is None else now
    ours = {n: FileName.parse(n) for n in listing}
    ours = {n: f for n, f in ours.items() if f is not None}
    if not ours:
        return []
    try:
        found = find_commit(store, listing)
    except FormatTooNewError as e:
        log.warning("%s: left alone: %s", store.uri, e)   # a newer ckptstore's files: nothing here is ours to judge
        return []
    committed = found.manifest.generation if found.manifest else None
    out = []
    for name, f in sorted(ours.items()):
        if f.gen == committed and f.role != "tmp":
            continue
        if committed is not None and f.gen < committed:
            out.append(Leftover(store, name, listing[name].size, "superseded by a newer commit"))
            continue
        mtime = listing[name].mtime or generation_time(f.gen)
        if now - mtime >= grace:
            out.append(Leftover(store, name, listing[name].size,
                                "left by a save that never committed"))
        elif young is not None:
            young.append(Leftover(store, name, listing[name].size,
                                  f"not committed, written {max(0, now - mtime):.0f} s ago"))
    return out


def walk(store: Store):
    """The store's directory and every directory below it (an incremental run's shared
    directory is not a checkpoint: ``shared_leftovers`` judges it)."""
    stack = [store]
    while stack:
        s = stack.pop()
        yield s
        stack.extend(s.child(n) for n in reversed(s.subdirs()) if n != SHARED_DIR)


def listed_by_steps(run: Store) -> set[str]:
    """The shared files the committed incremental steps directly under ``run`` list."""
    return listed_by(run_records(run).values())


def shared_leftovers(run: Store, grace: float = DEFAULT_GRACE, dry_run: bool = False,
                     young: list[Leftover] | None = None) -> list[Leftover]:
    """The shared files of incremental run ``run`` that no committed step and no save in flight
    lists, removed unless ``dry_run`` (see docs/format.md, "Removing steps"). Those only a save
    in flight (announced less than ``grace`` ago) lists are appended to ``young``, if given."""
    shared = run.child(SHARED_DIR)
    sizes = {n: e.size for n, e in (shared.list() or {}).items()}
    live: set[str] = set()

    def live_of() -> set[str]:
        live.clear()
        live.update(listed_by_steps(run))
        return live

    try:
        names = sweep(run, live_of, grace=grace, dry_run=dry_run)
    except FormatTooNewError as e:
        log.warning("%s: left alone: %s", run.uri, e)
        return []
    if young is not None:
        # Neither listed by a committed step nor removed: an announced save still protects them.
        data = [n for n in sizes if (f := FileName.parse(n)) is not None and f.role == "data"]
        young.extend(Leftover(shared, n, sizes[n], "listed by a save in flight")
                     for n in sorted(set(data) - live - set(names)))
    return [Leftover(shared, n, sizes.get(n, 0), "listed by no committed step") for n in names]


def collect(store: Store, grace: float = DEFAULT_GRACE, dry_run: bool = False,
            young: list[Leftover] | None = None) -> list[Leftover]:
    """Remove (or with dry_run, only find) leftovers under ``store``, recursively. What the grace
    period keeps (a save may still be writing it) is appended to ``young``, if given."""
    found: list[Leftover] = []
    for s in walk(store):
        if SHARED_DIR in s.subdirs():
            found.extend(shared_leftovers(s, grace, dry_run=dry_run, young=young))
        garbage = leftovers_in(s, grace, young=young)
        if not garbage:
            continue
        found.extend(garbage)
        if not dry_run:
            remove_files(s, [g.name for g in garbage])
    return found
