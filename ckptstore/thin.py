"""Thinning: a committed checkpoint rewritten, atomically, to hold only some of its values.

A training run keeps its old steps for their weights; their optimizer state,
often twice the size of the model, is what makes them expensive. Thinning
rewrites a step to hold only the selected paths (``thin_select``, e.g.
``"model"``) as a new generation of the same checkpoint directory, through
the one generation transaction (``writer.Generation``): a kill at any instant
leaves the old generation or the new one, never neither.

The new record keeps the step's ``created`` time, its format version, its
``writer`` and its ``meta``, plus two entries of its own (docs/format.md):

- ``meta["thinned"]``: the paths it still holds, keys joined by ``/``
  (``["model"]``); the record of a full state has no such entry;
- ``meta["thinned_from"]``: ``{"generation": G, "time": T}``, the generation
  that held the whole state and its commit time (its record's modification
  time, as the manager reads commit times), so a thinned step keeps its place
  in the order of recency: thinning is not a new commit. The new generation's
  id sorts right after G (not at the clock), so even a listing, which sees
  only the new record's modification time, orders the generations' clocks
  as the commits were made (``CheckpointManager._newest_first``).

Its node table holds the selected values, the containers on the way to them
with only the keys on the way (a list or tuple keeps its length, other items
``None``; an ordered dict on the way drops its ``_metadata``), exactly what
``load(select=...)`` of the full step returns; its blob table only the blobs
those values use.

An incremental step (its data in the run's ``.shared/`` directory) is
rewritten without writing any data: the new record lists the shared files
it still needs, and the bytes only the dropped values held are freed by the
run's sweep. A self-contained step's kept blobs are copied, as stored
(compressed ones stay compressed), into new data files of the new
generation, each checked against its CRC-32C on the way, in chunks: memory
stays at a few chunks whatever the step's size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import crc32c
import numpy as np

from .datafiles import plan, write_files
from .errors import ArgumentError, CheckpointError, CorruptCheckpointError, PathNotFoundError
from .format.manifest import SHARED_DIR, Manifest, commit_name
from .format.paths import CONTAINER_TAGS, Selection, Tree, normalize, show
from .format.tree import ALL_RANKS, Blob
from .format.walk import DICT, LIST, ODICT, TUPLE
from .ranges import COALESCE, READ_BACK, Range, StreamReader
from .plan import node_blob
from .reader import find_commit, structure_problems
from .stores.base import Store
from .writer import Generation

THINNED = "thinned"            # meta: the paths a thinned step holds, keys joined by "/"
THINNED_FROM = "thinned_from"  # meta: {"generation", "time"} of the record that held everything


# ---------------------------------------------------------------- what a record says

class Spelled(tuple):
    """A path as the command line spells it (``ckptstore prune --thin-select a/b/0``): each key a
    str, or an int where the checkpoint has no such str key but that int (a list index, an int
    key), decided per checkpoint."""


def spelled(text: str) -> Spelled:
    """``a/b/0`` as a Spelled path; ValueError for one that names no key."""
    keys = [k for k in text.split("/") if k != ""]
    if not keys:
        raise ValueError(f"--thin-select {text!r} names no key (keys joined by '/', e.g. model)")
    return Spelled(keys)


def _resolve(tree: Tree, path: tuple) -> tuple:
    """A Spelled path's keys as this checkpoint has them (other paths as they are)."""
    if not isinstance(path, Spelled):
        return path
    out: list = []
    at: int | None = 0
    for key in path:
        if at is None or tree.tag(at) not in CONTAINER_TAGS:
            out.append(key)
            at = None
            continue
        number = int(key) if key.lstrip("-").isdigit() else None
        found: tuple | None = None
        for k, child, kn in tree.items(at):
            if kn is None and type(k) is str and k == key:
                found = (k, child)
                break
            if kn is None and found is None and number is not None and type(k) is int and k == number:
                found = (k, child)
        if found is None:
            out.append(key)
            at = None
        else:
            out.append(found[0])
            at = found[1]
    return tuple(out)


def thin_paths(select: Any) -> list[tuple]:
    """``thin_select=`` as a list of paths (as ``select=`` takes them); ValueError if it selects nothing."""
    try:
        paths = normalize(select)
    except TypeError as e:
        raise ValueError(f"thin_select: {e}") from None
    if not paths:
        raise ValueError("thin_select must name at least one path to keep (e.g. thin_select='model')")
    for p in paths:
        if not p:
            raise ValueError("thin_select: the empty path is the whole state; name what a thinned step keeps "
                             "(e.g. thin_select='model')")
        for k in p:
            if not (isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))):
                raise ValueError(f"thin_select: a key is a str or an int, got {k!r} in {p!r}")
    return paths


def thinned_paths(meta: dict) -> tuple[str, ...] | None:
    """The paths (keys joined by "/") a thinned record holds, or None for a record of a whole state."""
    v = meta.get(THINNED)
    if not isinstance(v, list) or not v:
        return None
    return tuple(p for p in v if isinstance(p, str))


def original_commit(meta: dict) -> tuple[float, str] | None:
    """(commit time, generation) of the whole record a thinned one was made from, if it says."""
    v = meta.get(THINNED_FROM)
    if not isinstance(v, dict):
        return None
    t, g = v.get("time"), v.get("generation")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 1e11 \
            or not isinstance(g, str) or len(g) < 16:
        return None
    try:
        int(g[:16], 16)
    except ValueError:
        return None
    return float(t), g


def holds(thinned: Sequence[str], select: Any) -> bool:
    """Whether a step thinned to ``thinned`` holds everything ``select`` asks for (None: the whole
    state, which it does not)."""
    paths = normalize(select)
    if paths is None:
        return False
    for p in paths:
        text = show(p)
        if not p or not any(text == t or text.startswith(t + "/") for t in thinned):
            return False
    return True


# ---------------------------------------------------------------- the node table

@dataclass
class Thinned:
    """A node table cut down to some paths."""

    nodes: list            # the new node table
    blobs: list[int]       # new blob j is the record's blob blobs[j] (ascending)
    kept: list[tuple]      # the paths it holds (none inside another)
    missing: list[tuple]   # the paths asked for that the record does not hold


def thin_nodes(m: Manifest, paths: list[tuple]) -> Thinned:
    """The node table of ``m`` holding only ``paths`` (those of them it has).

    Raises CorruptCheckpointError for a malformed table. Node indices are
    renumbered in their old order, so every child still follows its parent;
    an item a list or tuple on the way does not keep becomes a ``none`` node
    at the end of the table.
    """
    if m.version[0] < 2:
        raise ValueError("a version 1 record cannot be thinned")
    tree = Tree(m.nodes, m.version[0], ranks=ALL_RANKS)
    kept, missing = [], []
    for p in paths:
        p = _resolve(tree, p)
        try:
            tree.lookup(p)
        except (PathNotFoundError, ArgumentError):
            # not there, or only inside values saved per rank (which child would it be?)
            missing.append(p)
            continue
        kept.append(p)
    # a path inside another kept one adds nothing
    kept = [p for p in kept if not any(q != p and p[:len(q)] == q for q in kept)]
    kept = list(dict.fromkeys(kept))
    if not kept:
        return Thinned([], [], [], missing)
    sel = Selection(tree, kept)
    order = sorted(sel.needed)
    new = {old: i for i, old in enumerate(order)}
    refs = sorted({b for i in order if (b := node_blob(tree.node(i), m.version[0])) is not None})
    blob = {old: j for j, old in enumerate(refs)}
    fillers: list[list] = []

    def filler() -> int:
        fillers.append(["none"])
        return len(order) + len(fillers) - 1

    out: list[list] = []
    for i in order:
        node = tree.node(i)
        tag = node[0]
        keep = sel.partial.get(i)
        if tag in (DICT, ODICT):
            keys, values = [], []
            for k, v in zip(node[1], node[2]):
                if keep is not None and v not in keep:
                    continue
                keys.append([new[k[0]]] if type(k) is list else k)
                values.append(new[v])
            row: list = [tag, keys, values]
            if len(node) == 4 and keep is None:
                row.append(new[node[3]])       # _metadata: of an ordered dict kept whole only
        elif tag in (LIST, TUPLE):
            row = [tag, [new[c] if keep is None or c in keep else filler() for c in node[1]]]
        elif tag == "tensor":
            row = list(node)
            if type(node[1]) is int:
                row[1] = blob[node[1]]
        elif tag == "ndarray":
            row = [tag, {**node[1], "blob": blob[node[1]["blob"]]}] + list(node[2:])
        elif tag in ("bytes", "pickle"):
            row = [tag, blob[node[1]]] + list(node[2:])
        elif tag == "sharded":
            row = [tag, node[1], node[2], [[e[0], new[e[1]]] + list(e[2:]) for e in node[3]]] + list(node[4:])
        elif tag == "ranks":
            row = [tag, [new[c] for c in node[1]]] + list(node[2:])
        else:
            row = node
        out.append(row)
    return Thinned(out + fillers, refs, kept, missing)


# ---------------------------------------------------------------- rewriting a step

@dataclass
class Outcome:
    """What ``thin_step`` did: the committed record, or why nothing was done."""

    manifest: Manifest | None = None
    skipped: str | None = None       # why the step was left as it is
    kept: list[tuple] | None = None
    missing: list[tuple] | None = None


def thin_step(store: Store, paths: list[tuple], *, expect: str | None = None, verify: bool = True) -> Outcome:
    """Rewrite the checkpoint at ``store`` to hold only ``paths``, as a new generation.

    ``expect``: the generation the caller decided to thin; if another has been
    committed since, nothing is done. A step already thinned, one that holds
    none of ``paths``, and kinds of records thinning does not rewrite
    (version 1, a distributed save's ``meta.dcp``) are skipped (``Outcome.skipped``
    says why). A blob whose bytes fail their CRC-32C raises CorruptCheckpointError
    and nothing is committed.
    """
    with store.errors("thin"):
        listing = store.list() or {}
        m = find_commit(store, listing).manifest
        if m is None:
            return Outcome(skipped="nothing is committed there")
        if expect is not None and m.generation != expect:
            return Outcome(skipped="it changed meanwhile")
        if thinned_paths(m.meta) is not None:
            return Outcome(skipped="it is thinned already")
        if m.version[0] < 2:
            return Outcome(skipped="it was written by ckptstore 0.1 (format 1), which thinning does not rewrite")
        if "dcp" in m.meta:
            return Outcome(skipped="it was written by torch.distributed.checkpoint, whose metadata names "
                                   "blobs by index")
        t = thin_nodes(m, paths)
        if not t.kept:
            return Outcome(skipped="it holds none of " + ", ".join(show(p) for p in paths) + _top_keys(m),
                           kept=[], missing=t.missing)
        entry = listing.get(commit_name(m.generation))
        when = entry.mtime if entry is not None and entry.mtime is not None else m.created
        meta = dict(m.meta)
        meta[THINNED] = [show(p) for p in t.kept]
        meta[THINNED_FROM] = {"generation": m.generation, "time": when}
        if m.files and all(f.dir == SHARED_DIR for f in m.files):
            new = _thin_shared(store, m, t, meta)
        else:
            new = _thin_own(store, m, t, meta, verify)
        return Outcome(new, kept=t.kept, missing=t.missing)


def _top_keys(m: Manifest) -> str:
    """`` (it holds: a, b)``, the state's top-level keys, for a thin_select that names none of them."""
    try:
        nav = Tree(m.nodes, m.version[0], ALL_RANKS)
        keys = [k for k, _, _ in nav.items(0)] if nav.tag(0) in (DICT, ODICT) else []
    except (CheckpointError, KeyError, TypeError, ValueError, IndexError):
        return ""
    return f" (it holds: {', '.join(map(str, keys[:10]))}{', ...' if len(keys) > 10 else ''})" if keys else ""


def _check(new: Manifest, where: str) -> Manifest:
    """The new record as a reader will take it: intact, its layout and structure sound."""
    try:
        back = Manifest.from_bytes(new.to_bytes(), where)
        problems = structure_problems(back)
    except (CorruptCheckpointError, ValueError) as e:
        problems = [str(e)]
    if problems:
        raise CheckpointError(f"{where}: internal error: the thinned record does not check, nothing was "
                              f"changed: {'; '.join(problems)}")
    return back


def _thin_shared(store: Store, m: Manifest, t: Thinned, meta: dict) -> Manifest:
    """An incremental step: a new record listing the shared files the kept blobs lie in. No data."""
    sub = m.blobs.subset(t.blobs)
    old_starts = m.file_starts()
    used: set[int] = set()
    for j in range(len(sub)):
        n = int(sub.sizes[j])
        if n:
            s = int(sub.starts[j])
            first = bisect.bisect_right(old_starts, s) - 1
            last = bisect.bisect_left(old_starts, s + n) - 1
            used.update(range(first, last + 1))
    if not used:
        # a record lists at least one file: the smallest, when no kept blob has bytes
        used.add(min(range(len(m.files)), key=lambda k: m.files[k].nbytes))
    keep = sorted(used)
    files = [m.files[k] for k in keep]
    shift: dict[int, int] = {}
    pos = 0
    for k in keep:
        shift[k] = pos - old_starts[k]
        pos += m.files[k].nbytes
    starts = []
    for j in range(len(sub)):
        s = int(sub.starts[j])
        k = min(bisect.bisect_right(old_starts, s) - 1, len(m.files) - 1)
        if k in shift:
            starts.append(s + shift[k])
        else:
            starts.append(pos)     # an empty blob whose file went: at the stream's end, aligned
    sub.starts = np.asarray(starts, dtype=np.int64)
    with Generation.begin(store, after=m.generation) as gen:
        new = m.replace(generation=gen.id, files=files, blobs=sub, nodes=t.nodes, raw_nodes=None, counts=None,
                        meta=meta)
        new = _check(new, f"{store.uri}/{commit_name(gen.id)}")
        gen.commit(new)
    return new


def _thin_own(store: Store, m: Manifest, t: Thinned, meta: dict, verify: bool) -> Manifest:
    """A self-contained step: the kept blobs' stored bytes copied into new data files, written
    and checked as any save's are (``datafiles.write_files``)."""
    sub = m.blobs.subset(t.blobs)
    with StreamReader(store, m.files) as reader:
        kept = _KeptBytes(reader, m, t.blobs, store.uri)
        layout = plan([Blob(sub.kind(j), int(sub.sizes[j]), SimpleNamespace(stored_chunks=partial(kept.chunks, j)),
                            frames=sub.frames_of(j)) for j in range(len(sub))], store.part_bytes)
        with Generation.begin(store, after=m.generation, nbytes=layout.total) as gen:
            names = [gen.data_name(k) for k in range(len(layout.sizes))]
            files, _ = write_files(store, names, layout, verify=verify, written=gen.written)
            sub.starts = np.asarray(layout.starts, dtype=np.int64)
            new = m.replace(generation=gen.id, files=files, blobs=sub, nodes=t.nodes, raw_nodes=None,
                            counts=None, meta=meta)
            new = _check(new, f"{store.uri}/{commit_name(gen.id)}")
            gen.commit(new)
    return new


class _KeptBytes:
    """The stored bytes of ``m``'s ``blobs``, read in stream order (neighbouring small blobs, a
    model's biases and norms, in one request over the gaps between them) and each checked
    against its CRC-32C before its last piece is handed over. The writer asks for them blob
    by blob, in the same order (``chunks(j)``)."""

    def __init__(self, reader: StreamReader, m: Manifest, blobs: list[int], uri: str):
        self.m, self.blobs, self.uri = m, blobs, uri
        self._pieces = self._read(reader)
        self._held: tuple[int, memoryview, bool] | None = None

    def _ranges(self) -> Iterator[Range]:
        # pieces of at most READ_BACK bytes, as (blob j, offset in the range, size, its last piece)
        t = self.m.blobs
        parts: list[tuple[int, int, int, bool]] = []
        lo = hi = 0
        for j, i in enumerate(self.blobs):
            start, n = int(t.starts[i]), int(t.sizes[i])
            for o in range(0, n, READ_BACK):
                size, at = min(READ_BACK, n - o), start + o
                if parts and hi <= at <= hi + COALESCE and at + size - lo <= READ_BACK:
                    parts.append((j, at - lo, size, o + size == n))
                    hi = at + size
                    continue
                if parts:
                    yield Range(lo, hi - lo, tag=parts)
                parts, lo, hi = [(j, 0, size, o + size == n)], at, at + size
        if parts:
            yield Range(lo, hi - lo, tag=parts)

    def _read(self, reader: StreamReader) -> Iterator[tuple[int, memoryview, bool]]:
        t = self.m.blobs
        crc = 0
        for r, data in reader.fetch(self._ranges(), concurrency=2):
            for j, rel, n, last in r.tag:
                piece = data[rel:rel + n]
                crc = crc32c.crc32c(piece, crc)
                i = self.blobs[j]
                if last:
                    if crc != int(t.crcs[i]):
                        raise CorruptCheckpointError(
                            f"{self.uri}: blob {i} of generation {self.m.generation} fails its CRC-32C "
                            f"({crc:08x}, the record says {int(t.crcs[i]):08x}); the step was not thinned",
                            self.uri)
                    crc = 0
                yield j, piece, last

    def chunks(self, j: int) -> Iterator[memoryview]:
        """Kept blob ``j``'s stored bytes (it is not empty: an empty blob is never asked for)."""
        while True:
            if self._held is None:
                self._held = next(self._pieces)
            k, piece, last = self._held
            if k != j:
                raise CheckpointError(f"{self.uri}: internal error: kept blob {j} asked for while blob {k} "
                                      "is next in the stream")
            self._held = None
            yield piece
            if last:
                return
