"""What a load reads, decided from the commit record before a byte of data moves.

``ReadPlan.make(manifest, select, into)`` resolves ``select=`` paths to the
nodes to build and the blobs to read, and matches every tensor of ``into=``
with the saved tensor at the same path: same dtype, same shape, or a
``KeyError`` / ``ValueError`` naming the path, all before anything is read
or any ``into`` tensor changes.

A matched tensor whose saved storage is exactly its own elements (offset 0,
contiguous, not shared with another tensor being loaded) is read *directly*
into the target's memory: no buffer of its size exists at any time. Any
other match (a view, a storage shared by tied weights) reads its storage as
usual and is copied into the target afterwards.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .errors import CorruptCheckpointError, PathMismatchError, PathNotFoundError, SelectTypeError
from .format import shards, tree
from .format.dtypes import dtype_name
from .format.manifest import NDARRAY, STORAGE, Manifest
from .format.paths import Selection, Tree, malformed_is_corrupt, normalize, show


def node_blob(node: list, version: int) -> int | None:
    """The blob a leaf node refers to, if any (unchecked: the decoder checks it)."""
    tag = node[0] if type(node) is list and node else None
    try:
        if tag == "tensor":
            b = node[1]["storage"] if version == 1 else node[1]
        elif tag in ("bytes", "pickle"):
            b = node[1]
        elif tag == "ndarray":
            b = node[1]["blob"]
        else:
            return None
    except (TypeError, KeyError, IndexError):
        return None
    return b if type(b) is int else None


def into_leaves(into: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(path, tensor) of every tensor in an ``into=`` tree of dicts, lists and tuples."""
    if isinstance(into, torch.Tensor):
        yield prefix, into
    elif isinstance(into, dict):
        for k, v in into.items():
            yield from into_leaves(v, prefix + (k,))
    elif isinstance(into, (list, tuple)):
        for j, v in enumerate(into):
            yield from into_leaves(v, prefix + (j,))
    elif into is None and prefix:
        return
    else:
        raise SelectTypeError(f"into={show(prefix)}: a tree of tensors (dicts, lists, tuples), "
                              f"got {type(into).__name__}")


@dataclass
class Target:
    path: tuple
    node: int
    tensor: torch.Tensor          # the caller's tensor
    blob: int | None
    direct: bool = False          # read straight into the tensor's memory
    inflate: bool = False         # a compressed blob, decompressed straight into the tensor's memory


@dataclass
class Piece:
    """Part of an ``into=`` tensor filled from one stored shard (or a whole stored tensor)."""

    local: torch.Tensor           # the caller's memory: a local shard, or the whole tensor
    local_at: tuple               # where ``local`` sits in the global tensor
    node: int                     # the stored tensor node
    node_at: tuple                # where that stored tensor sits in the global tensor
    at: tuple                     # the box they share: global offsets and shape
    shape: tuple


@dataclass
class ShardTarget:
    """An ``into=`` tensor filled from a sharded value, or a sharded tensor (DTensor,
    ShardedTensor) filled from any saved tensor: only the stored shards that overlap the
    parts this rank holds are read."""

    path: tuple
    node: int
    tensor: torch.Tensor
    pieces: list


@dataclass
class ReadPlan:
    needed: set | None = None                  # nodes to build (None: all)
    partial: dict = field(default_factory=dict)
    blobs: set | None = None                   # blobs to read into fresh buffers (None: all)
    targets: list = field(default_factory=list)
    shard_targets: list = field(default_factory=list)
    shard_blobs: set = field(default_factory=set)   # blobs read for shard_targets (placed where they go)
    ranks: Any = None                          # the reader's (rank, world size), for values saved per rank

    @property
    def direct(self) -> dict[int, Target]:
        return {t.blob: t for t in self.targets if t.direct}

    @property
    def inflate(self) -> dict[int, Target]:
        """Compressed blobs decompressed straight into their target's memory."""
        return {t.blob: t for t in self.targets if t.inflate}

    @classmethod
    def make(cls, m: Manifest, select: Any = None, into: Any = None, into_prefix: tuple = (),
             ranks: Any = None) -> "ReadPlan":
        with malformed_is_corrupt():
            return cls._make(m, select, into, into_prefix, ranks)

    @classmethod
    def _make(cls, m: Manifest, select: Any, into: Any, into_prefix: tuple, ranks: Any = None) -> "ReadPlan":
        paths = normalize(select)
        version = m.version[0]
        if version >= 4 and paths is None:
            paths = [()]      # values saved per rank: decided here, naming the path, before reading
        if paths is None and into is None:
            return cls()
        nav = Tree(m.nodes, version, ranks)
        plan = cls(ranks=ranks)
        if paths is not None:
            sel = Selection(nav, paths)
            plan.needed, plan.partial = sel.needed, sel.partial
        if into is not None:
            seen: dict[int, tuple] = {}
            for path, dst in into_leaves(into, into_prefix):
                trail = nav.lookup(path)
                node = trail[-1]
                if paths is not None and node not in plan.needed:
                    raise PathMismatchError(f"into={show(path)} lies outside select=")
                if node in seen:
                    # Two paths to one node: a node with two parents, which no writer makes.
                    raise CorruptCheckpointError(f"malformed checkpoint structure: {show(path)} and "
                                                 f"{show(seen[node])} are the same node {node}")
                seen[node] = path
                if nav.tag(node) == "sharded" or shards.is_sharded(dst):
                    plan.shard_targets.append(_shard_target(m, nav, path, node, dst, version))
                else:
                    plan.targets.append(_target(m, nav, path, node, dst, version))
        for st in plan.shard_targets:
            # the stored shards are read where they go, the others not at all
            if plan.needed is not None:
                plan.needed.difference_update(set(nav.subtree(st.node)) - {st.node})
            for piece in st.pieces:
                b = node_blob(m.nodes[piece.node], version)
                if b is not None:
                    plan.shard_blobs.add(b)
        nodes = range(len(m.nodes)) if plan.needed is None else plan.needed
        users: dict[int, int] = {}
        blobs = set()
        for i in nodes:
            b = node_blob(m.nodes[i], version)
            if b is not None:
                if not 0 <= b < len(m.blobs):
                    raise CorruptCheckpointError(f"malformed checkpoint structure: node {i} refers to blob "
                                                 f"{b}, which does not exist")
                blobs.add(b)
                users[b] = users.get(b, 0) + 1
        # A storage several nodes use (tied weights) is read straight into the target memory only
        # when every one of its users is a target and they are all that same memory (a model
        # whose weights are tied too); otherwise it is read once, then copied into each.
        by_blob: dict[int, list[Target]] = {}
        for t in plan.targets:
            if t.direct:
                by_blob.setdefault(t.blob, []).append(t)
            if t.inflate and users.get(t.blob, 0) != 1:
                t.inflate = False     # read once, then copied into each user
        for b, ts in by_blob.items():
            first = ts[0].tensor
            if users.get(b, 0) != len(ts) or any(
                    x.tensor.device != first.device or x.tensor.data_ptr() != first.data_ptr() for x in ts[1:]):
                for x in ts:
                    x.direct = False
        plan.blobs = (blobs - {t.blob for t in plan.targets if t.direct}) | plan.shard_blobs
        return plan


def _target(m: Manifest, nav: Tree, path: tuple, node: int, dst: torch.Tensor, version: int) -> Target:
    raw = nav.node(node)
    if raw[0] != "tensor":
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds {raw[0]!r:.20} there, not a tensor")
    info = tree.tensor_info(raw, version)
    try:
        saved = tuple(int(d) for d in info.shape)
    except (TypeError, ValueError):
        saved = info.shape
    if info.dtype != dtype_name(dst.dtype):
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds {info.dtype}, the tensor is "
                                f"{dtype_name(dst.dtype)}")
    if saved != tuple(dst.shape):
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds shape {list(saved)}, the tensor "
                                f"has {list(dst.shape)}")
    if dst.device.type == "meta":
        raise PathMismatchError(f"into={show(path)}: a meta tensor has no memory to load into")
    if info.blob is None:
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds a meta tensor there (no data to load)")
    b = info.blob if type(info.blob) is int else None
    if b is not None and (not 0 <= b < len(m.blobs) or m.blobs.kind(b) != STORAGE):
        raise CorruptCheckpointError(f"malformed checkpoint structure: tensor node {node} refers to blob "
                                     f"{b}, which is not a storage")
    n = dst.numel() * dst.element_size()
    whole = (b is not None and info.offset == 0
             and tuple(info.stride) == tuple(tree.contiguous_strides(list(saved)))
             and m.blobs.logical_size(b) == n and dst.is_contiguous() and n > 0)
    compressed = b is not None and m.blobs.frames_of(b) is not None
    return Target(path, node, dst, b, whole and not compressed,
                  whole and compressed and dst.device.type == "cpu")


def _shard_target(m: Manifest, nav: Tree, path: tuple, node: int, dst: torch.Tensor, version: int) -> ShardTarget:
    """Match ``dst`` with the sharded (or whole) tensor saved at ``path``, and find which stored
    shards overlap each part of ``dst`` this process holds."""
    raw = nav.node(node)
    if raw[0] == "sharded":
        dtype, saved, entries, _ = tree.sharded_info(node, raw)
        name = dtype_name(dtype)
        stored = []
        for offsets, child in entries:
            info = tree.tensor_info(nav.node(nav._child(node, child)), version)
            stored.append((child, offsets, tuple(int(d) for d in info.shape)))
    elif raw[0] == "tensor":
        info = tree.tensor_info(raw, version)
        name, saved = info.dtype, [int(d) for d in info.shape]
        if info.blob is None:
            raise PathMismatchError(f"into={show(path)}: the checkpoint holds a meta tensor there (no data to load)")
        stored = [(node, (0,) * len(saved), tuple(saved))]
    else:
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds {raw[0]!r:.20} there, not a tensor")
    if name != dtype_name(dst.dtype):
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds {name}, the tensor is {dtype_name(dst.dtype)}")
    if tuple(saved) != tuple(dst.shape):
        raise PathMismatchError(f"into={show(path)}: the checkpoint holds shape {list(saved)}, the tensor "
                                f"has {list(dst.shape)}")
    pieces = []
    for local_at, local in shards.target_regions(dst):
        if local.device.type == "meta":
            raise PathMismatchError(f"into={show(path)}: a meta tensor has no memory to load into")
        for child, node_at, node_shape in stored:
            o = shards.overlap(local_at, local.shape, node_at, node_shape)
            if o is not None:
                pieces.append(Piece(local, local_at, child, node_at, o[0], o[1]))
    return ShardTarget(path, node, dst, pieces)


def file_blobs(m: Manifest, path: tuple) -> dict | None:
    """{key: blob} of the dict at ``path`` whose values are 1-D uint8 numpy arrays (None for any
    other value), from the record alone; None if ``path`` is not a dict there."""
    with malformed_is_corrupt():
        nav = Tree(m.nodes, m.version[0])
        try:
            node = nav.lookup(path)[-1]
        except PathNotFoundError:
            return None
        if nav.tag(node) not in ("dict", "odict"):
            return None
        out = {}
        for k, child, kn in nav.items(node):
            key = nav.key_value(kn) if kn is not None else k
            raw = nav.node(child)
            ok = raw[0] == "ndarray" and isinstance(raw[1], dict) and raw[1].get("dtype") == "|u1" \
                and isinstance(raw[1].get("shape"), list) and len(raw[1]["shape"]) == 1
            b = node_blob(raw, m.version[0]) if ok else None
            if b is not None and (not 0 <= b < len(m.blobs) or m.blobs.kind(b) != NDARRAY
                                  or m.blobs.logical_size(b) != raw[1]["shape"][0]):
                raise CorruptCheckpointError(f"malformed checkpoint structure: {show(path + (key,))} does "
                                             "not match its blob")
            out[key] = b
        return out


# ---------------------------------------------------------------- the same on a value already in memory

def select_value(obj: Any, select: Any = None, into: Any = None) -> Any:
    """``select`` and ``into`` applied to a loaded tree (torch.save and safetensors files).

    The same rules as for a checkpoint: containers on the way keep their
    types (dicts only the selected keys, lists and tuples their length with
    None elsewhere); every ``into`` path, dtype and shape is checked before
    any tensor is changed; then each saved tensor is copied into its target,
    which takes its place in the result.
    """
    paths = normalize(select)
    result = obj if paths is None else _pick(obj, paths)
    if into is None:
        return result
    pairs = []
    for path, dst in into_leaves(into):
        if paths is not None and not any(path[:len(p)] == p for p in paths):
            raise PathMismatchError(f"into={show(path)} lies outside select=")
        saved = _get(obj, path)
        if not isinstance(saved, torch.Tensor):
            raise PathMismatchError(f"into={show(path)}: the file holds a {type(saved).__name__} there, not a tensor")
        if saved.dtype != dst.dtype:
            raise PathMismatchError(f"into={show(path)}: the file holds {dtype_name(saved.dtype)}, the tensor is "
                                    f"{dtype_name(dst.dtype)}")
        if tuple(saved.shape) != tuple(dst.shape):
            raise PathMismatchError(f"into={show(path)}: the file holds shape {list(saved.shape)}, the tensor "
                                    f"has {list(dst.shape)}")
        pairs.append((path, saved, dst))
    with torch.no_grad():
        for path, saved, dst in pairs:
            dst.copy_(saved)
            result = _put(result, path, dst)
    return result


def _get(obj: Any, path: tuple) -> Any:
    at = obj
    for depth, key in enumerate(path):
        if isinstance(at, dict):
            if key not in at:
                raise PathNotFoundError(f"{show(path)}: the file has no {key!r} in {show(path[:depth])}")
            at = at[key]
        elif isinstance(at, (list, tuple)) and type(key) is int and 0 <= key < len(at):
            at = at[key]
        else:
            raise PathNotFoundError(f"{show(path)}: the file has no {key!r} in {show(path[:depth])}")
    return at


def _pick(obj: Any, paths: list[tuple]) -> Any:
    for p in paths:
        _get(obj, p)        # every path exists, or nothing is built
    if any(len(p) == 0 for p in paths):
        return obj

    def build(v: Any, wanted: list[tuple]) -> Any:
        if any(len(p) == 0 for p in wanted):
            return v
        heads = {}
        for p in wanted:
            heads.setdefault(p[0], []).append(p[1:])
        if isinstance(v, dict):
            out = collections.OrderedDict() if isinstance(v, collections.OrderedDict) else {}
            for k, item in v.items():
                if k in heads:
                    out[k] = build(item, heads[k])
            return out
        items = [build(item, heads[j]) if j in heads else None for j, item in enumerate(v)]
        return tuple(items) if isinstance(v, tuple) else items
    return build(obj, paths)


def _put(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    key = path[0]
    if isinstance(obj, dict):
        obj[key] = _put(obj[key], path[1:], value)
        return obj
    if isinstance(obj, list):
        obj[key] = _put(obj[key], path[1:], value)
        return obj
    items = list(obj)
    items[key] = _put(items[key], path[1:], value)
    return tuple(items)
