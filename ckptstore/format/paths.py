"""Paths into a saved tree, resolved from the node table alone.

A path is a tuple of keys from the top: ``("model", "encoder.layer.0.weight")``
or ``("optimizer", "state", 3, "exp_avg")``; a bare ``str`` or ``int`` is a
one-key path. Keys are never split on dots. A key matches a dict key equal to
it, or, on a list or tuple, the item at that index.

``Selection`` turns paths into what a partial decode needs: the nodes to
build (the selected subtrees whole, the containers on the way to them) and,
for each container on the way, which children it keeps. Nothing here reads
data; every lookup fails with ``KeyError`` naming the path before any does.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

from ..errors import CorruptCheckpointError, PathNotFoundError, SelectTypeError, record_checks
from .walk import DICT, LIST, ODICT, TUPLE

CONTAINER_TAGS = (DICT, ODICT, LIST, TUPLE)


def normalize(select: Any) -> list[tuple] | None:
    """``select=`` as a list of paths (None stays None)."""
    if select is None:
        return None
    if _is_key(select):
        return [(select,)]
    if isinstance(select, tuple):
        return [select]
    if isinstance(select, list):
        out = []
        for p in select:
            if _is_key(p):
                out.append((p,))
            elif isinstance(p, tuple):
                out.append(p)
            else:
                raise SelectTypeError(f"a path is a tuple of keys, a str or an int, got {type(p).__name__}")
        return out
    raise SelectTypeError(f"select= is a path (a tuple of keys, a str or an int) or a list of paths, "
                    f"got {type(select).__name__}")


def _is_key(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def show(path: tuple) -> str:
    return "/".join(str(k) for k in path) if path else "<root>"


def _bad(msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed checkpoint structure: {msg}")


# A record whose structure breaks the code walking it is corrupt, not a Python error; the
# caller's own mistakes (a path that is not there, an ``into`` that does not fit) and the
# machine's errors pass through unchanged. errors.record_checks is the one place deciding it.
malformed_is_corrupt = record_checks


# The live Tree of each node table (by the table's id, which cannot be reused while the
# Tree, holding the table, lives).
_LIVE: "weakref.WeakValueDictionary[tuple[int, int], Tree]" = weakref.WeakValueDictionary()


class Tree:
    """Navigation of a node table: children of containers, keys decoded on demand."""

    def __init__(self, nodes: list, version: int, ranks: Any = None):
        self.nodes, self.version = nodes, version
        # which child a "ranks" node (format 4: a value saved per rank) stands for: the reader's
        # (rank, world size), tree.ALL_RANKS for all of them, or None (a single process: none)
        self.ranks = ranks
        # Trees over one node table (an open view's, and the plan of each read through it) share
        # the keys they decoded and the containers they indexed: reading each of n keys of an
        # open view then indexes the container once, not once per read.
        other = _LIVE.get((id(nodes), version))
        if other is not None and other.nodes is nodes:
            self._keys, self._index, self._key_nodes = other._keys, other._index, other._key_nodes
        else:
            self._keys: dict[int, Any] = {}
            self._index: dict[int, tuple[dict, list]] = {}
            self._key_nodes: dict[int, dict[int, int]] = {}
            _LIVE[(id(nodes), version)] = self

    def key_value(self, kn: int) -> Any:
        """The dict key that node ``kn`` holds (a tuple, a float, ...), decoded once."""
        if kn not in self._keys:
            from .tree import decode_part

            def no_blob(i, kind):
                raise _bad(f"a dict key refers to blob {i!r:.40}")
            # decode_part costs what the key's nodes cost, not the table's length: a dict of
            # 10**5 keys held as nodes is read in O(10**5), not O(10**10)
            self._keys[kn] = decode_part(self.nodes, no_blob, set(self.subtree(kn)), kn, version=self.version)
        return self._keys[kn]

    def node(self, i: int) -> list:
        if type(i) is not int or not 0 <= i < len(self.nodes):
            raise _bad(f"node {i!r:.40} does not exist")
        node = self.nodes[i]
        if type(node) is not list or not node or type(node[0]) is not str:
            raise _bad(f"node {i} is not a tagged list")
        return node

    def tag(self, i: int) -> str:
        return self.node(i)[0]

    def items(self, i: int) -> Iterator[tuple[Any, int, int | None]]:
        """(key, child, key node) of container ``i``: the key is inline (a str, an int, an index of a
        list or tuple) with key node None, or None with the node that holds it (``key_value``)."""
        node = self.node(i)
        tag = node[0]
        try:
            if tag in (LIST, TUPLE):
                for j, c in enumerate(node[1]):
                    yield j, self._child(i, c), None
            elif tag in (DICT, ODICT) and self.version == 1:
                kids = node[1]
                pairs = kids[:-1] if len(node) > 2 and node[2] is True else kids
                for j in range(0, len(pairs) - 1, 2):
                    k = self._child(i, pairs[j])
                    yield None, self._child(i, pairs[j + 1]), k
            elif tag in (DICT, ODICT):
                keys, values = node[1], node[2]
                if type(keys) is not list or type(values) is not list or len(keys) != len(values):
                    raise _bad(f"node {i}: keys and values must be lists of one length")
                for k, v in zip(keys, values):
                    if type(k) is list and len(k) == 1:
                        kn = self._child(i, k[0])
                        yield None, self._child(i, v), kn
                    elif type(k) is str or type(k) is int:
                        yield k, self._child(i, v), None
                    else:
                        raise _bad(f"node {i}: a key must be a string, an int or [node]")
            else:
                return
        except (TypeError, IndexError) as e:
            raise _bad(f"node {i} ({tag:.20}): {type(e).__name__}") from None

    def metadata_child(self, i: int) -> int | None:
        node = self.node(i)
        if node[0] == ODICT and self.version != 1 and len(node) == 4:
            return self._child(i, node[3])
        if node[0] == ODICT and self.version == 1 and len(node) > 2 and node[2] is True:
            return self._child(i, node[1][-1])
        return None

    def _child(self, i: int, c: Any) -> int:
        if type(c) is not int or not i < c < len(self.nodes):
            raise _bad(f"node {i} refers to node {c!r:.40}")
        return c

    def lookup(self, path: tuple) -> list[int]:
        """The nodes from the root to ``path`` (PathNotFoundError, a KeyError, naming it if it is not there)."""
        at, trail = 0, [0]
        at = self._through_ranks(at, trail, ())
        for depth, key in enumerate(path):
            if self.tag(at) not in CONTAINER_TAGS:
                raise PathNotFoundError(f"{show(path)}: {show(path[:depth])} is not a container")
            child = self._find(at, key)
            if child is None:
                raise PathNotFoundError(f"{show(path)}: the checkpoint has no {key!r} in {show(path[:depth])}")
            at = child
            trail.append(at)
            at = self._through_ranks(at, trail, path[:depth + 1])
        return trail

    def _through_ranks(self, at: int, trail: list, path: tuple) -> int:
        """Past a value saved per rank to this reader's own (appended to ``trail``)."""
        while self.version >= 4 and self.tag(at) == "ranks":
            at = self.rank_child(at, path)
            trail.append(at)
        return at

    def rank_children(self, i: int) -> list[int]:
        node = self.node(i)
        kids = node[1] if len(node) == 2 else None
        if type(kids) is not list or len(kids) < 2:
            raise _bad(f"node {i}: malformed ranks node")
        return [self._child(i, c) for c in kids]

    def rank_child(self, i: int, path: tuple) -> int:
        """The child of ranks node ``i`` this reader takes, or ValueError naming ``path``."""
        from .tree import ALL_RANKS, per_rank_error

        kids = self.rank_children(i)
        if self.ranks is not None and self.ranks != ALL_RANKS and self.ranks[1] == len(kids):
            return kids[self.ranks[0]]
        raise per_rank_error(len(kids), None if self.ranks == ALL_RANKS else self.ranks, show(path))

    def _format4_children(self, n: int, tag: str) -> list[int]:
        """The children of a sharded node (its shards) or of a ranks node (the reader's own, or all)."""
        from .tree import ALL_RANKS

        if tag == "ranks":
            if self.ranks == ALL_RANKS:
                return self.rank_children(n)
            return [self.rank_child(n, ())]
        node = self.node(n)
        try:
            return [self._child(n, e[1]) for e in node[3]]
        except (TypeError, IndexError, KeyError):
            raise _bad(f"node {n}: malformed sharded node") from None

    def path_of(self, target: int) -> tuple:
        """The path from the root to node ``target`` (for messages; O(table))."""
        parent: dict[int, tuple[int, Any]] = {}
        for i in range(len(self.nodes)):
            tag = self.tag(i)
            if tag in CONTAINER_TAGS:
                for k, child, kn in self.items(i):
                    parent.setdefault(child, (i, k if kn is None else self.key_value(kn)))
            elif tag in ("ranks", "sharded") and self.version >= 4:
                kids = self.rank_children(i) if tag == "ranks" else self._format4_children(i, tag)
                for r, c in enumerate(kids):
                    parent.setdefault(c, (i, None))
        out: list = []
        while target in parent:
            target, key = parent[target]
            if key is not None:
                out.append(key)
        return tuple(reversed(out))

    def _find(self, at: int, key: Any) -> int | None:
        """The child of container ``at`` under ``key`` (of the same type and equal), the first one
        if a malformed table repeats a key. Each container is indexed on its first lookup, so
        looking up every key of a container of n keys costs O(n), not O(n^2)."""
        if at not in self._index:
            by_key: dict = {}
            unhashable: list = []     # decoded keys a hostile table made unhashable, matched by scan
            for k, child, kn in self.items(at):
                if kn is not None:
                    k = self.key_value(kn)
                try:
                    by_key.setdefault((type(k), k), child)
                except TypeError:
                    unhashable.append((k, child))
            self._index[at] = (by_key, unhashable)
        by_key, unhashable = self._index[at]
        try:
            found = by_key.get((type(key), key))
        except TypeError:
            found = None
        if found is not None:
            return found
        for k, child in unhashable:
            if type(k) is type(key) and k == key:
                return child
        return None

    def key_nodes(self, i: int) -> dict[int, int]:
        """{child: the node holding its key} of container ``i``, for its keys held as nodes;
        built once per container."""
        if i not in self._key_nodes:
            self._key_nodes[i] = {child: kn for _, child, kn in self.items(i) if kn is not None}
        return self._key_nodes[i]

    def subtree(self, i: int) -> Iterator[int]:
        """``i`` and every node below it, each once: O(their number).

        A node reached twice has two parents, which the decoder refuses too; without the check,
        a table of d nodes each naming the next twice would be walked 2**d times."""
        stack = [i]
        seen = {i}
        while stack:
            n = stack.pop()
            yield n
            tag = self.tag(n)
            if self.version >= 4 and tag in ("ranks", "sharded"):
                try:
                    kids = self._format4_children(n, tag)
                except ValueError:       # a per-rank value this reader cannot take: named by its path
                    from .tree import per_rank_error
                    raise per_rank_error(len(self.rank_children(n)), self.ranks, show(self.path_of(n))) from None
                for c in kids:
                    if c in seen:
                        raise _bad(f"node {c} has two parents")
                    seen.add(c)
                    stack.append(c)
            elif tag in CONTAINER_TAGS:
                kids = []
                for _, child, kn in self.items(n):
                    kids.append(child)
                    if kn is not None:
                        kids.append(kn)
                meta = self.metadata_child(n)
                if meta is not None:
                    kids.append(meta)
                for c in kids:
                    if c in seen:
                        raise _bad(f"node {c} has two parents")
                    seen.add(c)
                    stack.append(c)


class Selection:
    """The part of a node table that ``paths`` select.

    ``needed``: every node to build. ``partial``: for each container on the
    way to a selection (not itself wholly selected), the children it keeps.
    """

    def __init__(self, tree: Tree, paths: list[tuple]):
        self.tree = tree
        self.paths = paths
        self.ends: dict[tuple, int] = {}
        self.needed: set[int] = set()
        self.partial: dict[int, set[int]] = {}
        whole: set[int] = set()
        trails = []
        for p in paths:
            trail = tree.lookup(p)
            self.ends[p] = trail[-1]
            trails.append(trail)
        # Shorter paths first: a subtree already taken whole is not walked again for each
        # selected path inside it.
        trails.sort(key=len)
        for trail in trails:
            end = trail[-1]
            if end in whole:
                continue
            whole.update(tree.subtree(end))
        for trail in trails:
            for parent, child in zip(trail, trail[1:]):
                if parent in whole:
                    break
                self.partial.setdefault(parent, set()).add(child)
        self.needed = set(whole)
        for parent, kids in self.partial.items():
            self.needed.add(parent)
            # Keys that are nodes (tuple keys) are built with the items they name.
            key_nodes = tree.key_nodes(parent)
            for child in kids:
                kn = key_nodes.get(child)
                if kn is not None:
                    self.needed.update(tree.subtree(kn))
        for parent in list(self.partial):
            if parent in whole:
                del self.partial[parent]
