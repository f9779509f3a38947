"""``ckptstore.open``: a lazy, read-only view of a checkpoint that has read only its commit record.

A ``Checkpoint`` is positioned at a container of the saved tree (the top, or
a sub-view). Its keys, sizes and tensor descriptions come from the record;
``view[key]`` of a leaf, and ``view.load(...)``, read just the bytes of what
they return, through the same engine as ``load(select=, into=)``.

torch.save and safetensors files have no record to read lazily: opening one
loads it, and the view walks the loaded value.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any, Iterator

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


class Checkpoint:
    """A read-only lazy view of a checkpoint (see ``ckptstore.open``)."""

    def __init__(self, store: Store, manifest: Manifest | None, *, verify: bool = True, allow_pickle: bool = False,
                 prefix: tuple = (), node: int = 0, nav: Tree | None = None, value: Any = None,
                 info: CheckpointInfo | None = None):
        self._store, self._m = store, manifest
        self._verify, self._allow_pickle = verify, allow_pickle
        self._prefix, self._node = prefix, node
        self._nav = nav if nav is not None or manifest is None else Tree(manifest.nodes, manifest.version[0])
        self._value = value          # a loaded file's value (torch.save / safetensors), else None
        self._info = info
        self._closed = False

    # -- what it is
    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            m = self._m
            self._info = CheckpointInfo(uri=self._store.uri, nbytes=m.nbytes, seconds=0.0,
                                        strategy=choose(self._store, self._store.location.commit).name,
                                        generation=m.generation, created=m.created, files=len(m.files),
                                        meta=dict(m.meta))
        return self._info

    def __repr__(self) -> str:
        where = f" at {show(self._prefix)}" if self._prefix else ""
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

    def keys(self) -> list:
        return [k for k, _ in self._items()]

    def __iter__(self) -> Iterator:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._items())

    def __contains__(self, key: Any) -> bool:
        return any(type(k) is type(key) and k == key for k in self.keys())

    def __getitem__(self, key: Any) -> Any:
        for k, child in self._items():
            if type(k) is type(key) and k == key:
                break
        else:
            raise PathNotFoundError(f"{show(self._prefix + (key,))}: the checkpoint has no {key!r} in "
                                    f"{show(self._prefix)}")
        path = self._prefix + (key,)
        if self._m is None:
            if isinstance(child, (dict, list, tuple)):
                return Checkpoint(self._store, None, prefix=path, value=child, info=self._info)
            return child
        with malformed_is_corrupt():
            container = self._nav.tag(child) in CONTAINER_TAGS
        if container:
            return Checkpoint(self._store, self._m, verify=self._verify, allow_pickle=self._allow_pickle,
                              prefix=path, node=child, nav=self._nav, info=self._info)
        return self._read([path], None, None, path)

    def tensors(self) -> Iterator[tuple[tuple, TensorInfo]]:
        """(path, TensorInfo) of every tensor below this view, paths relative to it; reads no data."""
        for path, kind, info in self.walk():
            if info is not None:
                yield path, info

    def walk(self) -> Iterator[tuple[tuple, str, TensorInfo | None]]:
        """(path, kind, TensorInfo or None) of every value below this view, containers before what
        they hold, in saved order; ``kind`` is "dict", "odict", "list", "tuple", "tensor", "str", ...
        Reads no data."""
        if self._m is None:
            yield from _walk_loaded(self._value, ())
            return
        with malformed_is_corrupt():
            yield from self._walk_record()

    def _walk_record(self):
        version = self._m.version[0]
        stack = [((), self._node)]
        while stack:
            path, i = stack.pop()
            node = self._nav.node(i)
            if node[0] == "tensor":
                t = tree.tensor_info(node, version)
                dtype = dtype_from_name(t.dtype)
                shape = torch.Size(_whole_numbers(t.shape, path))
                yield path, "tensor", TensorInfo(dtype, shape, shape.numel() * dtype.itemsize)
                continue
            yield path, node[0], None
            if node[0] in CONTAINER_TAGS:
                kids = [((self._nav.key_value(kn) if kn is not None else k), c) for k, c, kn in self._nav.items(i)]
                for k, c in reversed(kids):
                    stack.append((path + (k,), c))

    # -- reading
    def stream_tensors(self, paths: list[tuple], write) -> None:
        """Hand the bytes of the tensors at ``paths`` (relative to this view) to ``write``, in order.

        Runs of tensors that are exactly their storage (contiguous, offset 0, the
        storage's size) go straight from storage through one reader, a read window at
        a time, reads in flight across tensor boundaries, each checked against its
        CRC-32C once it has passed (see ``reader.stream_blobs``); any other tensor (a
        view of a larger storage) is loaded alone and its bytes handed over."""
        if self._closed:
            raise ValueError("the checkpoint view is closed")
        run: list[int] = []

        def flush() -> None:
            if run:
                with self._store.errors("read"):
                    stream_blobs(self._store, self._m, run, write, verify=self._verify)
                run.clear()
        for path in paths:
            b = self._whole_storage(tuple(path)) if self._m is not None else None
            if b is not None:
                run.append(b)
                continue
            flush()
            t = self.load(select=[tuple(path)])
            for k in path:
                t = t[k]
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
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
            if int(table.sizes[b]) != math.prod(shape) * dtype_from_name(t.dtype).itemsize:
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


def _walk_loaded(v: Any, path: tuple) -> Iterator[tuple[tuple, str, TensorInfo | None]]:
    if isinstance(v, torch.Tensor):
        yield path, "tensor", TensorInfo(v.dtype, v.shape, v.numel() * v.element_size())
    elif isinstance(v, dict):
        yield path, "odict" if isinstance(v, collections.OrderedDict) else "dict", None
        for k, x in v.items():
            yield from _walk_loaded(x, path + (k,))
    elif isinstance(v, (list, tuple)):
        yield path, "list" if isinstance(v, list) else "tuple", None
        for j, x in enumerate(v):
            yield from _walk_loaded(x, path + (j,))
    else:
        yield path, type(v).__name__, None
