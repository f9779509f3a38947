"""``ckptstore.open``: a lazy, read-only view of a checkpoint that has read only its commit record.

A ``Checkpoint`` is positioned at a container of the saved tree (the top, or
a sub-view). Its keys, sizes and tensor descriptions come from the record;
``view[key]`` of a leaf, and ``view.load(...)``, read just the bytes of what
they return, through the same engine as ``load(select=, into=)``.

Every walk here costs time linear in what it visits: a path is kept as
linked (parent, key) pairs and made a tuple only where one is handed out
(a tensor's path, a sub-view's read), so a record nested 10**5 levels deep
costs what a flat one of as many nodes does, and a node table that names a
node twice (which would make a walk exponential) is refused as corrupt, as
``load`` refuses it.

torch.save and safetensors files have no record to read lazily: opening one
loads it, and the view walks the loaded value.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from .commit import choose
from .errors import CorruptCheckpointError, PathNotFoundError
from .format import tree
from .format.dtypes import dtype_from_name
from .format.manifest import STORAGE, Manifest
from .format.paths import CONTAINER_TAGS, Tree, malformed_is_corrupt, normalize, show
from .info import CheckpointInfo
from .plan import select_value
from .reader import load_manifest, stream_blobs
from .stores.base import Store


@dataclass(frozen=True)
class TensorInfo:
    """A saved tensor, described from the commit record (no data read)."""

    dtype: torch.dtype
    shape: torch.Size
    nbytes: int


# A linked path: None for the top, else (parent's link, key). Extending one is O(1);
# ``_unlink`` makes the tuple, O(depth), only for what is handed out.
Link = tuple | None


def _unlink(link: Link) -> tuple:
    keys = []
    while link is not None:
        link, key = link
        keys.append(key)
    keys.reverse()
    return tuple(keys)


def _link_of(path: Iterable) -> Link:
    link: Link = None
    for key in path:
        link = (link, key)
    return link


class Checkpoint:
    """A read-only lazy view of a checkpoint (see ``ckptstore.open``)."""

    def __init__(self, store: Store, manifest: Manifest | None, *, verify: bool = True, allow_pickle: bool = False,
                 prefix: tuple = (), node: int = 0, nav: Tree | None = None, value: Any = None,
                 info: CheckpointInfo | None = None, link: Link = None):
        self._store, self._m = store, manifest
        self._verify, self._allow_pickle = verify, allow_pickle
        # Where this view sits, as a linked path (``link``, or ``prefix`` given whole): stepping
        # down d containers one key at a time then costs O(d), not the O(d**2) of a tuple each.
        self._link: Link = link if link is not None else _link_of(prefix)
        self._path: tuple | None = tuple(prefix) if link is None else None
        self._node = node
        self._nav = nav if nav is not None or manifest is None else Tree(manifest.nodes, manifest.version[0])
        self._value = value          # a loaded file's value (torch.save / safetensors), else None
        self._info = info
        self._closed = False

    @property
    def _prefix(self) -> tuple:
        """The path of this view from the top (made once, when first needed)."""
        if self._path is None:
            self._path = _unlink(self._link)
        return self._path

    # -- what it is
    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            m = self._m
            self._info = CheckpointInfo(uri=self._store.uri, nbytes=m.nbytes, seconds=0.0,
                                        strategy=choose(self._store, self._store.location.commit).name,
                                        generation=m.generation, created=m.created, files=len(m.files),
                                        meta=dict(m.meta), logical_nbytes=m.logical)
        return self._info

    def __repr__(self) -> str:
        where = f" at {show(self._prefix)}" if self._link is not None else ""
        return f"<ckptstore.Checkpoint {self._store.uri}{where}: {len(self)} keys>"

    # -- the container at this position
    def _items(self):
        with malformed_is_corrupt():
            return self._items_unchecked()

    def _items_unchecked(self):
        if self._m is None:
            v = self._value
            return list(v.items()) if isinstance(v, dict) else list(enumerate(v))
        out = []
        for k, child, kn in self._nav.items(self._node):
            out.append((self._nav.key_value(kn) if kn is not None else k, child))
        return out

    def _child(self, key: Any) -> tuple[bool, Any]:
        """(found, child): the child node (a record) or value (a loaded file) under ``key``."""
        if self._m is None:
            for k, child in self._items():
                if type(k) is type(key) and k == key:
                    return True, child
            return False, None
        with malformed_is_corrupt():
            # indexed once per container: looking up each of its n keys costs O(n) in all
            child = self._nav._find(self._node, key)
        return child is not None, child

    def keys(self) -> list:
        return [k for k, _ in self._items()]

    def __iter__(self) -> Iterator:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items())

    def __contains__(self, key: Any) -> bool:
        return self._child(key)[0]

    def __getitem__(self, key: Any) -> Any:
        found, child = self._child(key)
        if not found:
            raise PathNotFoundError(f"{show(self._prefix + (key,))}: the checkpoint has no {key!r} in "
                                    f"{show(self._prefix)}")
        link = (self._link, key)
        if self._m is None:
            if isinstance(child, (dict, list, tuple)):
                return Checkpoint(self._store, None, link=link, value=child, info=self._info)
            return child
        with malformed_is_corrupt():
            container = self._nav.tag(child) in CONTAINER_TAGS
        if container:
            return Checkpoint(self._store, self._m, verify=self._verify, allow_pickle=self._allow_pickle,
                              link=link, node=child, nav=self._nav, info=self._info)
        path = self._prefix + (key,)
        return self._read([path], None, None, path)

    def tensors(self) -> Iterator[tuple[tuple, TensorInfo]]:
        """(path, TensorInfo) of every tensor below this view, paths relative to it; reads no data.

        Time linear in the record's nodes plus the length of the paths handed out."""
        for path, _, info in self.walk(kinds=("tensor",)):
            yield path, info

    def walk(self, kinds: Iterable[str] | None = None) -> Iterator[tuple[tuple, str, TensorInfo | None]]:
        """(path, kind, TensorInfo or None) of every value below this view, containers before what
        they hold, in saved order; ``kind`` is "dict", "odict", "list", "tuple", "tensor", "str", ...
        Reads no data.

        ``kinds``: yield only values of those kinds (the others are still walked through). A path
        is built only for a value yielded, so the walk costs O(nodes + total length of the paths
        yielded): every container of a chain d deep has a path, d**2 / 2 keys in all, while
        ``kinds=("tensor",)`` over it costs O(d)."""
        wanted = None if kinds is None else frozenset(kinds)
        if self._m is None:
            yield from _walk_loaded(self._value, wanted)
            return
        with malformed_is_corrupt():
            yield from self._walk_record(wanted)

    def _walk_record(self, wanted: frozenset | None):
        nav, version = self._nav, self._m.version[0]
        # Each node is entered at most once: a table naming a node twice (a DAG, which load
        # refuses) would otherwise make the walk exponential in its depth.
        entered = {self._node}
        stack: list[tuple[Link, int]] = [(None, self._node)]
        while stack:
            link, i = stack.pop()
            node = nav.node(i)
            kind = node[0]
            if kind == "tensor":
                if wanted is None or kind in wanted:
                    path = _unlink(link)
                    t = tree.tensor_info(node, version)
                    dtype = dtype_from_name(t.dtype)
                    shape = torch.Size(_whole_numbers(t.shape, path))
                    yield path, kind, TensorInfo(dtype, shape, math.prod(shape) * dtype.itemsize)
                continue
            if kind == tree.SHARDED:
                # saved as shards by several ranks: to a reader, the global tensor they form
                if wanted is None or "tensor" in wanted:
                    dtype, shape_list, _, _ = tree.sharded_info(i, node)
                    shape = torch.Size(shape_list)
                    yield _unlink(link), "tensor", TensorInfo(dtype, shape, math.prod(shape) * dtype.itemsize)
                continue
            if wanted is None or kind in wanted:
                yield _unlink(link), kind, None
            if kind in CONTAINER_TAGS:
                kids = [((nav.key_value(kn) if kn is not None else k), c) for k, c, kn in nav.items(i)]
                for k, c in reversed(kids):
                    if c in entered:
                        raise CorruptCheckpointError(f"malformed checkpoint structure: node {c} has two parents")
                    entered.add(c)
                    stack.append(((link, k), c))

    # -- reading
    def stream_tensors(self, paths: list[tuple], write) -> None:
        """Hand the bytes of the tensors at ``paths`` (relative to this view) to ``write``, in order.

        ``write`` runs on one helper thread while later bytes are read and checked
        (see ``reader.stream_blobs``); it must be done with each memoryview when it returns.
        Runs of tensors that are exactly their storage (contiguous, offset 0, the
        storage's size) go straight from storage, read windows in flight across tensor
        boundaries; any other tensor (a view of a larger storage) is loaded alone and its
        bytes handed over. A blob's CRC-32C is complete only with its last byte, so
        ``write`` gets bytes of a blob before the blob is known intact: treat them as
        provisional until this returns (the exporter writes under a temporary name).
        """
        if self._closed:
            raise ValueError("the checkpoint view is closed")
        run: list[int] = []
        with _WriteBehind(write) as out:
            def flush() -> None:
                if run:
                    with self._store.errors("read"):
                        stream_blobs(self._store, self._m, run, out.put, self._verify,
                                     held=WRITE_BEHIND, stop=lambda: out.failed)
                    run.clear()
            for path in paths:
                b = self._whole_storage(tuple(path)) if self._m is not None else None
                if b is not None:
                    run.append(b)
                    continue
                flush()
                if out.failed:
                    break               # leaving the block raises the write's error
                t = self.load(select=[tuple(path)])
                for k in path:
                    t = t[k]
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    # waits until it is written: one such tensor in memory at a time
                    out.put(memoryview(t.reshape(-1).view(torch.uint8).numpy()), wait=True)
                del t
            flush()

    def _whole_storage(self, path: tuple) -> int | None:
        """The blob of the tensor at ``path`` where the tensor is exactly that storage, else None."""
        with malformed_is_corrupt():
            node = self._nav.lookup(self._prefix + path)[-1]
            raw = self._nav.node(node)
            if raw[0] != "tensor":
                return None
            t = tree.tensor_info(raw, self._m.version[0])
            shape = _whole_numbers(t.shape, path)
            b = t.blob
            table = self._m.blobs
            if type(b) is not int or not 0 <= b < len(table) or table.kind(b) != STORAGE or t.offset != 0 \
                    or tuple(t.stride) != tuple(tree.contiguous_strides(shape)):
                return None
            if table.logical_size(b) != math.prod(shape) * dtype_from_name(t.dtype).itemsize:
                return None
        return b

    def load(self, *, select: Any = None, into: Any = None, map_location=None) -> Any:
        """The value of this view (or ``select``-ed paths of it, relative to it), as ``ckptstore.load``."""
        paths = normalize(select)
        absolute = [self._prefix] if paths is None else [self._prefix + p for p in paths]
        return self._read(absolute, into, map_location, self._prefix)

    def _read(self, paths: list, into: Any, map_location, at: tuple) -> Any:
        if self._closed:
            raise ValueError("the checkpoint view is closed")
        if self._m is None:
            rel = [p[len(self._prefix):] for p in paths]
            return select_value(self._value, rel, into) if (rel != [()] or into is not None) else self._value
        with self._store.errors("load"):
            got = load_manifest(self._store, self._m, map_location=map_location, verify=self._verify,
                                allow_pickle=self._allow_pickle, select=paths, into=into, into_prefix=self._prefix)
        for k in at:
            got = got[k]
        return got

    # -- lifetime
    def close(self) -> None:
        """Nothing stays open between reads; a closed view refuses further reads."""
        self._closed = True

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _whole_numbers(shape: Any, path: tuple) -> list[int]:
    if type(shape) not in (list, tuple) or not all(type(d) is int and 0 <= d < 2 ** 62 for d in shape):
        raise CorruptCheckpointError(f"malformed checkpoint structure: the tensor at {show(path)} has shape "
                                     f"{shape!r:.60}")
    return list(shape)


def _walk_loaded(root: Any, wanted: frozenset | None) -> Iterator[tuple[tuple, str, TensorInfo | None]]:
    """``walk`` over a loaded value: iterative (a value nested deeper than Python's recursion
    limit is fine), paths linked and made tuples only for what is yielded."""
    stack: list[tuple[Link, Any]] = [(None, root)]
    while stack:
        link, v = stack.pop()
        if isinstance(v, torch.Tensor):
            if wanted is None or "tensor" in wanted:
                yield _unlink(link), "tensor", TensorInfo(v.dtype, v.shape, v.numel() * v.element_size())
            continue
        if isinstance(v, dict):
            kind = "odict" if isinstance(v, collections.OrderedDict) else "dict"
            kids = list(v.items())
        elif isinstance(v, (list, tuple)):
            kind = "list" if isinstance(v, list) else "tuple"
            kids = list(enumerate(v))
        else:
            kind, kids = type(v).__name__, None
        if wanted is None or kind in wanted:
            yield _unlink(link), kind, None
        if kids:
            for k, x in reversed(kids):
                stack.append(((link, k), x))


# ---------------------------------------------------------------- streaming tensors out

#: Read windows handed to the writer and not yet written, at most: enough to keep the
#: output busy while the next window is read and checked.
WRITE_BEHIND = 2
class _WriteBehind:
    """Calls ``write`` on each buffer ``put``, in order, from one helper thread.

    The first failed write is raised when the block is left; from then on, and when
    the block is left by an exception, what is still queued is dropped unwritten.
    Leaving the block waits for the thread, so no write runs after it.
    """

    def __init__(self, write):
        self._write = write
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="ckptstore-write-behind", daemon=True)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def put(self, data: memoryview, done=None, wait: bool = False) -> None:
        """Queue ``data``; ``done()`` is called once it is written or dropped.
        ``wait``: return only then."""
        self._queue.put((data, done))
        if wait:
            self._queue.join()

    def _run(self) -> None:
        while True:
            data, done = self._queue.get()
            try:
                if data is None:
                    return
                if self._error is None and not self._dropping:
                    try:
                        self._write(data)
                    except BaseException as e:  # noqa: BLE001 - raised on the caller's thread
                        self._error = e
            finally:
                if done is not None:
                    done()
                self._queue.task_done()

    def __enter__(self) -> "_WriteBehind":
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._dropping = True
        self._queue.put((None, None))
        self._thread.join()
        if exc_type is None and self._error is not None:
            e, self._error = self._error, None
            raise e
