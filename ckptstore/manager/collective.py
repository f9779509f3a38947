"""One step saved by every rank of a torch.distributed job: one commit, after every part is durable.

The sequence of a save (``save_step``), on every rank, over the manager's own
channel (``room.Op``):

1. **plan** (``encode_part``): the rank encodes its own state: DTensor and
   ShardedTensor values as the shards it holds, everything else as it is,
   with an xxh3-128 of every blob. It posts the node table and the blobs'
   sizes and hashes (no data).
2. Rank 0 (the coordinator) merges the ranks' tables into one (``Merger``):
   containers alike on every rank are merged key by key; a leaf equal on
   every rank (same node, same bytes) is kept once; the shards of a sharded
   tensor are gathered from all ranks (a shard held by several ranks, once);
   anything that differs becomes a ``ranks`` node holding each rank's own
   value. Each blob to write gets one writer among the ranks holding it,
   the largest first to the least loaded (so replicated state is spread, not
   all on rank 0); with ``incremental=True`` blobs the run already holds are
   referred to instead. It begins the generation and posts who writes what.
3. **write** (``write_part``): each rank writes its blobs into its own data
   files, ``<gen>-<n>.bin`` with ``n`` from ``rank x 10**6``, checksumming
   on the way, and **verify** (``verify_part``) checks what the backend
   stored; then **commit** (``vote_commit``) reports the files and CRCs.
4. Rank 0, once every rank has voted and before the deadline, publishes one
   commit record (format version 4) with the backend's commit strategy and
   posts the outcome; every rank returns once it reads it.

Any failure on any rank is posted at once; every rank then raises
``CollectiveError`` naming the rank, each removes what it wrote, and rank 0
removes whatever else of the generation is there. A rank that dies or hangs
is named when the deadline (``collective_timeout`` after the save began)
passes. Nothing is committed unless every rank voted.

The functions named in bold above are looked up in this module at each call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ..compress import blob_digest, compress_blobs, compresses, element_sizes
from ..datafiles import plan as layout, write_files
from ..errors import CallerMistake, CheckpointError, UnsupportedObjectError
from ..format import tree
from ..format.manifest import (
    ALIGN, COMPRESSED_MAJOR, DISTRIBUTED_MAJOR, KIND_CODES, KINDS, SHARED_DIR, BlobTable, FileEntry, FileName,
    Manifest, data_name, device_column,
)
from ..format.frames import Frames
from ..format.walk import DICT, LIST, ODICT, TUPLE
from ..incremental import INTENT_SUFFIX, Known, SharedIndex, unusable, worth_keeping, write_intent
from ..info import CheckpointInfo
from ..reader import shallow_problems
from ..stores.base import Store
from ..writer import Generation, info_of, remove_files, writer_fields
from .background import copy_blobs
from .room import CollectiveError, Op

log = logging.getLogger("ckptstore")

SLOT_FILES = 10 ** 6         # rank r numbers its data files from r * SLOT_FILES
CONTAINERS = (DICT, ODICT, LIST, TUPLE)
LEAVES_WITH_BLOBS = ("tensor", "bytes", "ndarray", "pickle")


# ---------------------------------------------------------------- a rank's part

@dataclass
class Part:
    """What one rank saves: its node table, its blobs, and their hashes."""

    nodes: list
    blobs: list            # tree.Blob
    hashes: list[bytes]

    def plan(self, step: int) -> dict:
        return {"step": step, "nodes": self.nodes,
                "blobs": [[KIND_CODES[b.kind], b.nbytes, h.hex(), b.device] for b, h in zip(self.blobs, self.hashes)]}


def encode_part(state: Any, *, allow_pickle: bool = False, copy: bool = False) -> Part:
    """The plan phase: this rank's state encoded (no I/O), each blob hashed. ``copy``: the
    blobs copied off the training tensors (an async save), the hashes taken of the copies."""
    nodes, blobs = tree.encode(state, allow_pickle=allow_pickle, sharded=True)
    if copy:
        blobs = copy_blobs(blobs)
    return Part(nodes, blobs, [blob_digest(b) for b in blobs])


def plan_part(state: Any, *, allow_pickle: bool = False, copy: bool = False) -> Part:
    """``encode_part``, looked up here at each call (the manager's way in: a test may replace it)."""
    return encode_part(state, allow_pickle=allow_pickle, copy=copy)


# ---------------------------------------------------------------- merging the ranks' tables (rank 0)

@dataclass
class MergedBlob:
    kind: str              # a KIND_CODES letter
    nbytes: int
    hash: str
    device: str
    holders: dict = field(default_factory=dict)   # rank -> that rank's blob index
    writer: int | None = None
    known: Known | None = None                    # incremental: bytes the run already holds


class Merger:
    """One node table from every rank's (see the module docstring, step 2)."""

    def __init__(self, plans: list[dict], uri: str):
        self.plans, self.uri = plans, uri
        self.world = len(plans)
        self.nodes: list = []
        self.blobs: list[MergedBlob] = []
        self._blob_of: dict[Any, int] = {}

    def run(self) -> tuple[list, list[MergedBlob]]:
        self._merge([0] * self.world, ())
        return self.nodes, self.blobs

    # -- helpers

    def _node(self, r: int, i: int) -> list:
        return self.plans[r]["nodes"][i]

    def _blob_desc(self, r: int, b: int) -> tuple:
        kind, nbytes, digest, _device = self.plans[r]["blobs"][b]
        return kind, nbytes, digest

    def _merged_blob(self, key: Any, holders: dict[int, int]) -> int:
        at = self._blob_of.get(key)
        if at is None:
            r, b = next(iter(holders.items()))
            kind, nbytes, digest, device = self.plans[r]["blobs"][b]
            at = len(self.blobs)
            self.blobs.append(MergedBlob(kind, nbytes, digest, device, dict(holders)))
            self._blob_of[key] = at
        return at

    def _reserve(self) -> int:
        self.nodes.append(None)
        return len(self.nodes) - 1

    @staticmethod
    def _blob_slot(node: list) -> tuple[Any, Any] | None:
        """(getter, setter) of a leaf node's blob reference."""
        tag = node[0]
        if tag == "tensor":
            return node[1], lambda n, b: n.__setitem__(1, b)
        if tag in ("bytes", "pickle"):
            return node[1], lambda n, b: n.__setitem__(1, b)
        if tag == "ndarray":
            return node[1]["blob"], lambda n, b: n[1].__setitem__("blob", b)
        return None

    @staticmethod
    def _without_blob(node: list) -> str:
        if node[0] == "ndarray":
            return json.dumps([node[0], {k: v for k, v in node[1].items() if k != "blob"}], sort_keys=True)
        return json.dumps([node[0]] + node[2:], sort_keys=True)

    def _canon(self, r: int, i: int) -> str:
        """A rank's subtree as JSON with its blobs replaced by their hashes: equal means equal values."""
        node = self._node(r, i)
        tag = node[0]
        if tag in (LIST, TUPLE):
            return json.dumps([tag, [self._canon(r, c) for c in node[1]]])
        if tag in (DICT, ODICT):
            keys = [k if type(k) is not list else ["node", self._canon(r, k[0])] for k in node[1]]
            meta = self._canon(r, node[3]) if len(node) == 4 else None
            return json.dumps([tag, keys, [self._canon(r, c) for c in node[2]], meta])
        slot = self._blob_slot(node)
        if slot is not None and slot[0] is not None:
            return json.dumps([self._without_blob(node), self._blob_desc(r, slot[0])])
        if tag == tree.SHARDED:
            return json.dumps([tag, node[1:3], [[e[0], self._canon(r, e[1])] for e in node[3]], node[4:]])
        return json.dumps(node)

    # -- the merge

    def _merge(self, idx: list[int], path: tuple) -> int:
        nodes = [self._node(r, i) for r, i in enumerate(idx)]
        tags = {n[0] for n in nodes}
        if len(tags) == 1:
            tag = nodes[0][0]
            if tag in (LIST, TUPLE) and len({len(n[1]) for n in nodes}) == 1:
                at = self._reserve()
                node = [tag, [None] * len(nodes[0][1])]
                self.nodes[at] = node
                for j in range(len(node[1])):
                    node[1][j] = self._merge([n[1][j] for n in nodes], path + (j,))
                return at
            if tag in (DICT, ODICT) and self._same_keys(idx, nodes):
                return self._merge_dict(idx, nodes, path)
            if tag == tree.SHARDED:
                return self._merge_sharded(idx, nodes, path)
            if tag not in CONTAINERS and len({self._canon(r, i) for r, i in enumerate(idx)}) == 1:
                return self._copy(0, idx[0], replicated=idx)
        return self._per_rank(idx, path)

    def _same_keys(self, idx: list[int], nodes: list[list]) -> bool:
        def keys(r: int, n: list) -> list:
            return [k if type(k) is not list else ["node", self._canon(r, k[0])] for k in n[1]] + [len(n) == 4]
        first = keys(0, nodes[0])
        return all(keys(r, n) == first for r, n in enumerate(nodes))

    def _merge_dict(self, idx: list[int], nodes: list[list], path: tuple) -> int:
        at = self._reserve()
        n0 = nodes[0]
        node = [n0[0], [None] * len(n0[1]), [None] * len(n0[2])]
        self.nodes[at] = node
        for j, k in enumerate(n0[1]):
            node[1][j] = [self._copy(0, k[0])] if type(k) is list else k
            node[2][j] = self._merge([n[2][j] for n in nodes], path + (k if type(k) is not list else "?",))
        if len(n0) == 4:
            node.append(self._merge([n[3] for n in nodes], path + ("_metadata",)))
        return at

    def _merge_sharded(self, idx: list[int], nodes: list[list], path: tuple) -> int:
        where = "/".join(map(str, path)) or "<root>"
        if len({json.dumps([n[1], n[2], n[4:]]) for n in nodes}) != 1:
            raise UnsupportedObjectError(f"{self.uri}: {where}: the ranks hold shards of tensors of different "
                                         "dtypes or shapes under one name")
        groups: dict[tuple, dict[int, int]] = {}        # offsets -> {rank: shard node}
        for r, n in enumerate(nodes):
            for offsets, child in n[3]:
                groups.setdefault(tuple(offsets), {})[r] = child
        at = self._reserve()
        entries: list = []
        node = [tree.SHARDED, nodes[0][1], nodes[0][2], entries] + nodes[0][4:]
        self.nodes[at] = node
        covered = 0
        for offsets in sorted(groups):
            holders = groups[offsets]
            canon = {self._canon(r, c) for r, c in holders.items()}
            if len(canon) != 1:
                raise UnsupportedObjectError(
                    f"{self.uri}: {where}: {', '.join(f'rank {r}' for r in sorted(holders))} hold different values "
                    f"for the replicas of the shard at {list(offsets)}; the replicas of a shard must be equal")
            r0 = min(holders)
            shape = self._node(r0, holders[r0])[3]
            covered += math.prod(shape)
            entries.append([list(offsets), self._copy(r0, holders[r0], replicated=holders)])
        if covered != math.prod(nodes[0][2]):
            raise UnsupportedObjectError(
                f"{self.uri}: {where}: the ranks' shards cover {covered} of the tensor's {math.prod(nodes[0][2])} "
                "elements (a sharded tensor must be saved by every rank that holds part of it)")
        return at

    def _per_rank(self, idx: list[int], path: tuple) -> int:
        at = self._reserve()
        kids: list[int] = []
        self.nodes[at] = [tree.RANKS, kids]
        for r, i in enumerate(idx):
            kids.append(self._copy(r, i))
        return at

    def _copy(self, r: int, i: int, replicated: Any = None) -> int:
        """Rank ``r``'s subtree at node ``i``, its blobs written by ``r`` (or, ``replicated``, by one
        of the ranks holding the same bytes: a list of each rank's node, or {rank: node})."""
        src = self._node(r, i)
        tag = src[0]
        at = self._reserve()
        node = json.loads(json.dumps(src))
        self.nodes[at] = node
        if tag in (LIST, TUPLE):
            node[1] = [self._copy(r, c) for c in src[1]]
        elif tag in (DICT, ODICT):
            node[1] = [[self._copy(r, k[0])] if type(k) is list else k for k in src[1]]
            node[2] = [self._copy(r, c) for c in src[2]]
            if len(src) == 4:
                node[3] = self._copy(r, src[3])
        elif tag == tree.SHARDED:
            if replicated is None:
                raise UnsupportedObjectError(
                    f"{self.uri}: a sharded tensor sits inside a value that differs between the ranks; save "
                    "sharded tensors under keys every rank has")
            holders = replicated if isinstance(replicated, dict) else dict(enumerate(replicated))
            node[3] = [[e[0], self._copy(r, e[1], replicated={q: self._node(q, holders[q])[3][k][1]
                                                               for q in holders})]
                       for k, e in enumerate(src[3])]
        else:
            slot = self._blob_slot(src)
            if slot is not None and slot[0] is not None:
                if replicated is None:
                    holders = {r: slot[0]}
                else:
                    pairs = replicated.items() if isinstance(replicated, dict) else enumerate(replicated)
                    holders = {q: _slot_of(self._node(q, n)) for q, n in pairs}
                key = ("own", r, slot[0]) if replicated is None else ("rep", tuple(sorted(holders.items())))
                slot[1](node, self._merged_blob(key, holders))
        return at


def _slot_of(node: list) -> int:
    slot = Merger._blob_slot(node)
    assert slot is not None and slot[0] is not None   # equal canonical forms: a leaf with a blob
    return slot[0]


def assign_writers(blobs: list[MergedBlob], world: int) -> None:
    """One writer per blob to write: the only holder, or for a blob several ranks hold, the
    least loaded of them, the largest blobs first."""
    load = [0] * world
    todo = [b for b in blobs if b.known is None]
    for b in todo:
        if len(b.holders) == 1:
            b.writer = next(iter(b.holders))
            load[b.writer] += b.nbytes
    for b in sorted((b for b in todo if len(b.holders) > 1), key=lambda b: -b.nbytes):
        b.writer = min(b.holders, key=lambda r: (load[r], r))
        load[b.writer] += b.nbytes


# ---------------------------------------------------------------- each rank's writing

@dataclass
class Written:
    """What a rank wrote: its files (in order) and, per blob it wrote, the offset in its stream and the CRC."""

    files: list[FileEntry]
    starts: list[int]
    crcs: list[int]
    sizes: list[int] = field(default_factory=list)     # each blob's stored size
    frames: list = field(default_factory=list)         # [logical, group, frame sizes] of a compressed blob, or None


def write_part(store: Store, gen: str, rank: int, blobs: list, *, verify: bool, written: list[str],
               shared: bool, compression: str | None = None, groups: list[int] | None = None) -> Written:
    """The write phase: ``blobs`` (this rank's share) into ``<gen>-<rank x 10**6 + j>.bin``,
    compressed as ``compression`` says (``groups``: each blob's element size)."""
    if not blobs:
        return Written([], [], [])
    if compresses(compression, store.compression_pays):
        blobs, _ = compress_blobs(blobs, [], compression, store.compression_pays, [b""] * len(blobs),
                                  groups=groups)
    part = store.part_bytes // ALIGN * ALIGN if shared and store.part_bytes else store.part_bytes
    p = layout(blobs, part, pad_end=True)
    if len(p.sizes) >= SLOT_FILES:
        raise CheckpointError(f"{store.uri}: one rank's share needs {len(p.sizes)} data files; raise part_size",
                              store.uri)
    Generation.join(store, gen).check_space(p.total)
    names = [data_name(gen, rank * SLOT_FILES + j) for j in range(len(p.sizes))]
    store.makedirs()
    files, crcs = write_files(store, names, p, verify=verify, written=written)
    return Written(list(files), list(p.starts), list(crcs), [b.nbytes for b in blobs],
                   [None if b.frames is None else [b.frames.logical, b.frames.group, list(b.frames.sizes)]
                    for b in blobs])


def verify_part(store: Store, part: Written) -> None:
    """The verify phase: every file this rank wrote is there with its size (the CRCs were checked
    against what the backend stored while writing, unless ``verify=False``)."""
    if not part.files:
        return
    problems = shallow_problems(part.files, store.list() or {})
    if problems:
        raise CheckpointError(f"{store.uri}: " + "; ".join(problems), store.uri)


def vote_commit(op: Op, part: Written) -> None:
    """The commit phase: this rank's part is durable; it says so, with what the record needs."""
    op.post("vote", {"files": [[f.name, f.nbytes, f.crc32c] for f in part.files],
                     "starts": part.starts, "crcs": part.crcs, "sizes": part.sizes, "frames": part.frames})


# ---------------------------------------------------------------- the whole save

@dataclass
class SaveJob:
    """A step's save as the manager hands it over."""

    step: int
    store: Store               # the step's directory
    shared: Store | None       # the run's shared directory (incremental), else None
    part: Part
    meta: dict
    overwrite: bool
    verify: bool = True
    index: SharedIndex | None = None      # rank 0, incremental: what the run holds
    margin: float = 5.0
    compression: str | None = None


def save_step(op: Op, job: SaveJob) -> tuple[Manifest | None, CheckpointInfo | None]:
    """Every rank's side of one step's save (see the module docstring). Returns, on rank 0, the
    committed record and its info; on the others (None, info)."""
    t0 = time.perf_counter()
    rank, world = op.rank, op.room.world
    gen: Generation | None = None
    gen_id: str | None = None
    mine: list[str] = []
    try:
        op.post("plan", job.part.plan(job.step))
        if rank == 0:
            plans = op.gather("plan", doing="reach this save", readers=0)
            gen, assignment = _coordinate(op, job, plans)
            merged = assignment.pop("_merged")
            op.post("assign", assignment)
        assignment = op.gather("assign", [0], readers=world, doing="plan this save",
                               behind=("plan", "reach this save"))[0]
        gen_id = assignment["gen"]
        target = job.shared if assignment["shared"] and job.shared is not None else job.store
        blobs = [job.part.blobs[b] for b in assignment["writes"][str(rank)]]
        groups = element_sizes(job.part.nodes, job.part.blobs) if job.compression else None
        part = write_part(target, gen_id, rank, blobs, verify=job.verify, written=mine,
                          shared=bool(assignment["shared"]), compression=job.compression,
                          groups=None if groups is None else [groups[b] for b in assignment["writes"][str(rank)]])
        verify_part(target, part)
        vote_commit(op, part)
        if rank == 0:
            votes = op.gather("vote", doing="write its part", readers=0)
            assert gen is not None and target is not None
            m = _commit(op, job, gen, assignment, votes, target, merged)
            op.post("done", {"generation": m.generation, "nbytes": m.nbytes})
            op.forget(["plan", "vote"])
            _hear_acks(op, job)
            return m, info_of(job.store, m, gen.strategy.name, time.perf_counter() - t0)
        # rank 0 is committing once every vote is in: it gets the margin past the deadline
        done = op.gather("done", [0], readers=world - 1, deadline=op.deadline + job.margin,
                         doing="commit this save", behind=("vote", "write its part"))[0]
        op.post("ack", True)
        return None, CheckpointInfo(uri=job.store.uri, nbytes=sum(f.nbytes for f in part.files),
                                    seconds=time.perf_counter() - t0, strategy="collective",
                                    generation=done["generation"], created=time.time(),
                                    files=len(part.files), meta=dict(job.meta))
    except BaseException as e:
        cause: CollectiveError | None = None
        if not isinstance(e, CollectiveError):
            # Another rank failed first, and this error is its consequence (rank 0 removing the
            # failed save's files under this rank's feet): every rank names the first cause.
            with contextlib.suppress(CheckpointError):
                if isinstance(e, Exception) and op.failed():
                    cause = op.failure()
            if cause is None:
                op.fail(e)
        elif rank == 0:
            with contextlib.suppress(CheckpointError):
                if not op.failed():
                    op.relay(e)       # rank 0's own finding (who never came): every rank raises it
        _discard(job, mine, gen, rank, gen_id)
        if rank == 0:
            gone = cause or e
            op.linger(gone.ranks if isinstance(gone, CollectiveError) else (), job.margin)
        if cause is not None:
            raise cause from e
        raise_here(op, e)


def _hear_acks(op: Op, job: SaveJob) -> None:
    """Rank 0, committed: wait until every rank has read the outcome. Rank 0 hosts the store, so a
    program that ends right after its last save must not take the store away from ranks still
    reading it (they would report a committed step as failed)."""
    try:
        op.gather("ack", range(1, op.room.world), deadline=time.monotonic() + job.margin, doing="hear the commit")
    except CollectiveError as e:
        log.warning("%s: step %d is committed; %s", job.store.uri, job.step, e)


def raise_here(op: Op, e: BaseException) -> NoReturn:
    """Re-raise this rank's failure of ``op`` (already posted): a CheckpointError or a caller's
    mistake as it is, anything else as the CollectiveError every other rank raises."""
    if isinstance(e, (CheckpointError, CallerMistake)) or not isinstance(e, Exception):
        raise e
    raise op.failed_here(e) from e


def _discard(job: SaveJob, mine: list[str], gen: Generation | None, rank: int, gen_id: str | None) -> None:
    """After a failure: each rank removes what it wrote; rank 0 also what any other rank left."""
    target = job.shared if job.shared is not None else job.store
    with contextlib.suppress(Exception):
        if mine:
            target.remove(mine)
    if rank != 0:
        return
    with contextlib.suppress(Exception):
        if gen is not None:
            gen.discard()
    gen_id = gen.id if gen is not None else gen_id
    if gen_id is None:
        return
    for where in {id(job.store): job.store, id(target): target}.values():
        with contextlib.suppress(Exception):
            left = [n for n in (where.list() or {}) if (f := FileName.parse(n)) is not None and f.gen == gen_id]
            if job.shared is not None and where is target:
                left.append(gen_id + INTENT_SUFFIX)
            if left:
                remove_files(where, left)
    with contextlib.suppress(Exception):
        if not job.store.list():
            job.store.remove_dir()


def _coordinate(op: Op, job: SaveJob, plans: dict[int, dict]) -> tuple[Generation, dict]:
    # (the assignment's "_merged" stays on rank 0: it is taken out before the assignment is posted)
    """Rank 0: check the ranks agree on the step, merge, begin the generation, assign writers."""
    world = op.room.world
    steps = {r: p["step"] for r, p in plans.items()}
    if len(set(steps.values())) != 1:
        raise CheckpointError(
            f"{job.store.uri}: the ranks are saving different steps ({', '.join(f'rank {r}: {s}' for r, s in sorted(steps.items()))}); "
            "every rank must call save with the same step", job.store.uri)
    merger = Merger([plans[r] for r in range(world)], job.store.uri)
    nodes, blobs = merger.run()
    gen = Generation.begin(job.store, overwrite=job.overwrite)
    shared = job.shared is not None
    if job.shared is not None:
        taken: set = set()
        for b in blobs:
            if b.nbytes and job.index is not None:
                known = job.index.find(b.nbytes, bytes.fromhex(b.hash))
                if known is not None and known not in taken:
                    b.known = known
                    taken.add(known)
        kept = worth_keeping({i: b.known for i, b in enumerate(blobs) if b.known is not None})
        for i, b in enumerate(blobs):
            if i not in kept:
                b.known = None
        wanted = sorted({f.name for b in blobs if b.known is not None for f in b.known.files})
        gen.written.append(gen.id + INTENT_SUFFIX)      # removed with the generation on failure
        job.shared.makedirs()
        write_intent(job.shared, gen.id, wanted)
        if wanted:
            bad = unusable(job.shared, set(wanted))
            for b in blobs:
                if b.known is not None and any(f.name in bad for f in b.known.files):
                    b.known = None
    assign_writers(blobs, world)
    writes: dict[str, list[int]] = {str(r): [] for r in range(world)}
    for b in blobs:
        if b.writer is not None:
            writes[str(b.writer)].append(b.holders[b.writer])
    return gen, {"gen": gen.id, "shared": shared, "writes": writes, "_merged": (nodes, blobs)}


def _order(name: str) -> tuple[str, int]:
    parsed = FileName.parse(name)
    return (parsed.gen, parsed.number) if parsed is not None else (name, 0)


def _commit(op: Op, job: SaveJob, gen: Generation, assignment: dict, votes: dict[int, dict],
            target: Store, merged: tuple[list, list[MergedBlob]]) -> Manifest:
    """Rank 0, every vote in: the record of the whole step, published once."""
    nodes, blobs = merged
    world = op.room.world
    files: list[FileEntry] = []
    shared = SHARED_DIR if assignment["shared"] else None
    # reused bytes first (incremental), grouped by the generation that wrote them, in their order
    base: dict[str, int] = {}
    old = {f.name: f for b in blobs if b.known is not None for f in b.known.files}
    for f in sorted(old.values(), key=lambda f: _order(f.name)):
        base[f.name] = sum(x.nbytes for x in files)
        files.append(FileEntry(f.name, f.nbytes, f.crc32c, shared))
    rank_base: dict[int, int] = {}
    for r in range(world):
        rank_base[r] = sum(x.nbytes for x in files)
        files.extend(FileEntry(n, size, crc, shared) for n, size, crc in votes[r]["files"])
    if not files:
        empty = data_name(gen.id, 0)
        gen.written.append(empty)
        target.put(empty, b"")
        files.append(FileEntry(empty, 0, 0, shared))
    # where each rank's k-th written blob went
    where: dict[tuple[int, int], tuple[int, int, int, Any]] = {}
    for r in range(world):
        v = votes[r]
        for k, local in enumerate(assignment["writes"][str(r)]):
            where[(r, local)] = (rank_base[r] + v["starts"][k], v["crcs"][k], v["sizes"][k], v["frames"][k])
    starts, crcs, sizes = [], [], []
    codec: dict[int, Frames] = {}
    for i, b in enumerate(blobs):
        if b.known is not None:
            starts.append(base[b.known.files[0].name] + b.known.offset)
            crcs.append(b.known.crc32c)
            sizes.append(b.known.nbytes)
            if b.known.frames is not None:
                codec[i] = b.known.frames
        else:
            assert b.writer is not None
            s, c, n, f = where[(b.writer, b.holders[b.writer])]
            starts.append(s)
            crcs.append(c)
            sizes.append(n)
            if f is not None:
                codec[i] = Frames(int(f[0]), int(f[1]), tuple(int(x) for x in f[2]))
    problems = shallow_problems([f for f in files if f.name not in old], target.list() or {})
    if problems:
        raise CheckpointError(f"{target.uri}: not committing step {job.step}: " + "; ".join(problems), target.uri)
    devices, device_index = device_column([b.device for b in blobs])
    table = BlobTable(starts, sizes, crcs, "".join(b.kind for b in blobs), devices,
                      device_index, b"".join(bytes.fromhex(b.hash) for b in blobs), codec or None)
    m = Manifest(generation=gen.id, files=files, blobs=table, nodes=nodes, meta=job.meta,
                 writer=writer_fields(ranks=world), version=(COMPRESSED_MAJOR if codec else DISTRIBUTED_MAJOR, 0),
                 created=time.time())
    Manifest.from_bytes(m.to_bytes(), job.store.uri)      # what readers will check, checked before publishing
    if time.monotonic() > op.deadline:
        raise CheckpointError(f"{job.store.uri}: every rank wrote its part of step {job.step}, but only after "
                              f"collective_timeout={op.timeout:g} s; not committing (the other ranks have given up)",
                              job.store.uri)
    gen.commit(m)
    if job.shared is not None and assignment["shared"]:
        with contextlib.suppress(CheckpointError):
            job.shared.remove([gen.id + INTENT_SUFFIX])
        if job.index is not None:
            job.index.add(m)
    return m


__all__ = ["KINDS", "Merger", "Part", "SaveJob", "encode_part", "save_step", "verify_part", "vote_commit",
           "write_part"]
