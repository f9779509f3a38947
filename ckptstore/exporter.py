"""``ckptstore.export``: the selected part of a checkpoint in the format inference tools read.

safetensors (one file, or the Hugging Face sharded layout with
``model.safetensors.index.json``) is written by streaming: the header is
built from the commit record alone, then the tensors' bytes are streamed
from storage in order (``Checkpoint.stream_tensors``): the store reads ahead
while a window is checked against its CRC-32C and earlier windows are
written by a helper thread, so the export runs at the pace of the slower of
reading and writing, and memory stays at a few read windows whatever the
checkpoint's size. ``format="torch"`` writes a file
``torch.load(weights_only=True)`` reads back equal; torch.save needs the
objects, so that export holds the selection in memory once.

The output appears whole or not at all: on local disk it is written under a
temporary name, made durable, renamed only once every blob in it has passed
its CRC-32C check, and its directory synced; object stores publish an object
when its upload completes; a sharded export writes its index last.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

from .errors import PathNotFoundError, UnsupportedObjectError
from .foreign import SAFETENSORS_DTYPES
from .format.paths import normalize, show
from .stores import open_store
from .url import parse_size

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def python_select(keys: list) -> str:
    """How a caller of ``ckptstore.export`` spells a selection."""
    return " or ".join(f"select={k!r}" for k in keys)


def export(uri: Any, dst: Any, *, select: Any = None, format: str | None = None, storage_options=None,
           dst_options=None, max_shard_size: Any = None, spell_select=python_select) -> list[str]:
    """Write the selected part of the checkpoint at ``uri`` to ``dst``; returns the files written.

    ``spell_select(keys)`` words the advice to select one of ``keys`` (the CLI says ``--select``).
    """
    from .api import open as open_view
    dst = os.fspath(dst) if isinstance(dst, os.PathLike) else dst
    if not isinstance(dst, str) or not dst:
        raise TypeError(f"dst must be a path or URL, got {type(dst).__name__}")
    base = dst.split("?", 1)[0].rstrip("/")
    fmt = format or ("safetensors" if base.endswith(".safetensors") or max_shard_size is not None else
                     "torch" if base.endswith(TORCH_SUFFIXES) else None)
    if fmt not in ("safetensors", "torch"):
        raise ValueError(f"export to {base}: cannot tell the format from the name; pass "
                         "format='safetensors' or format='torch'" if fmt is None else
                         f"format= must be 'safetensors' or 'torch', got {fmt!r}")
    shard = None
    if max_shard_size is not None:
        if fmt != "safetensors":
            raise ValueError("max_shard_size= applies to safetensors exports")
        shard = parse_size(max_shard_size)
        if shard <= 0:
            raise ValueError(f"max_shard_size= must be positive, got {max_shard_size!r}")
    paths = normalize(select)
    view = open_view(uri, storage_options=storage_options)
    with view:
        if fmt == "torch":
            return [_export_torch(view, paths, dst, dst_options)]
        try:
            tensors = _flat_tensors(view, paths)
        except UnsupportedObjectError as e:
            if paths is not None:
                raise
            raise UnsupportedObjectError(f"{e}. {_what_to_select(view, spell_select)}", e.uri) from None
        if shard is None:
            return [_write_safetensors_file(view, tensors, dst, dst_options)]
        return _write_sharded(view, tensors, dst, dst_options, shard)


# ---------------------------------------------------------------- what goes out, from the record

def _flat_tensors(view, paths: list[tuple] | None) -> list[tuple[str, tuple, Any]]:
    """(name, absolute path, TensorInfo) of every tensor selected, names joined with '.'.

    The selection must be mappings of str down to tensors; anything else is
    named in an UnsupportedObjectError. With one selected path, names are
    relative to it; with several, relative to the top.
    """
    roots = paths if paths is not None else [()]
    relative_to_root = len(roots) == 1
    found = {r: False for r in roots}
    out: list = []
    seen: dict[str, tuple] = {}
    for path, kind, info in view.walk():
        root = next((r for r in roots if path[:len(r)] == r), None)
        if root is None:
            continue
        found[root] = True
        if kind in ("dict", "odict"):
            continue
        rel = path[len(root):] if relative_to_root else path
        if not rel:
            rel = path[-1:]            # a selected tensor itself: its own key names it
        if any(not isinstance(k, str) for k in rel):
            raise UnsupportedObjectError(f"export to safetensors: {show(path)} has a key that is not a "
                                         "str; safetensors names tensors by strings")
        if kind != "tensor":
            raise UnsupportedObjectError(f"export to safetensors: {show(path)} is a {kind}, not a tensor; "
                                         "select only mappings of tensors")
        if info.dtype not in SAFETENSORS_NAMES:
            raise UnsupportedObjectError(f"export to safetensors: {show(path)} has dtype {info.dtype}, "
                                         "which safetensors cannot hold")
        name = ".".join(rel)
        if name in seen:
            raise UnsupportedObjectError(f"export to safetensors: {show(path)} and {show(seen[name])} "
                                         f"both flatten to the name {name!r}")
        seen[name] = path
        out.append((name, path, info))
    for r, ok in found.items():
        if not ok:
            raise PathNotFoundError(f"{show(r)}: the checkpoint has no such path")
    if not out:
        raise UnsupportedObjectError("export to safetensors: the selection holds no tensors")
    return out


def _what_to_select(view, spell_select) -> str:
    """The top level's keys, naming those that hold only str -> tensor mappings (what a whole-model
    export wants), from the record alone: "... holds model (a state_dict of 4 tensors), step: pass ..."."""
    order: list = []
    tensors: dict = {}
    unfit: set = set()
    for path, kind, info in view.walk():
        if not path:
            continue
        top = path[0]
        if len(path) == 1:
            order.append(top)
            if kind not in ("dict", "odict"):
                unfit.add(top)
        elif top not in unfit:
            if not isinstance(path[-1], str) or kind not in ("dict", "odict", "tensor") or \
                    (kind == "tensor" and info.dtype not in SAFETENSORS_NAMES):
                unfit.add(top)
            elif kind == "tensor":
                tensors[top] = tensors.get(top, 0) + 1
    fit = [k for k in order if k not in unfit and tensors.get(k)]
    held = ", ".join(f"{k} (a state_dict of {tensors[k]} tensor{'s' * (tensors[k] != 1)})" if k in fit else str(k)
                     for k in order)
    if not fit:
        return f"The checkpoint's top level holds {held}; none of them is a mapping of names to tensors"
    return f"The checkpoint's top level holds {held}: pass {spell_select(fit)}"


def _header(tensors: list, metadata: dict | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """The safetensors header (padded with spaces to a multiple of 8) and each tensor's offsets."""
    head: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets, at = [], 0
    for name, _, info in tensors:
        head[name] = {"dtype": SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
                      "data_offsets": [at, at + info.nbytes]}
        offsets.append((at, at + info.nbytes))
        at += info.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


# ---------------------------------------------------------------- writing

class _Output:
    """One file at a URL, appearing whole or not at all."""

    def __init__(self, url: str, options):
        base, q, query = url.partition("?")
        scheme, sep, path = base.partition("://") if "://" in base else ("", "", base)
        parent, slash, self.name = path.rstrip("/").rpartition("/")
        if not self.name:
            raise ValueError(f"export: {base} names no file")
        bare = not (parent or slash or sep)
        # A bare name lies in the current directory, "/name" in "/", "memory://name" in that root.
        directory = "." if bare else parent or slash
        self.store = open_store(scheme + sep + directory + (q + query if q else ""), options)
        uri = self.store.uri
        self.shown = self.name if bare else uri + ("" if uri.endswith("/") else "/") + self.name
        self.temp = self.name + ".partial" if self.store.atomic_rename else self.name
        self.store.makedirs()
        self.writer = self.store.open_writer(self.temp)
        self.written = 0

    def write(self, data: memoryview) -> None:
        self.writer.write(data)
        self.written += len(data)

    def close(self) -> str:
        self.writer.close()
        if self.temp != self.name:
            self.store.rename(self.temp, self.name)
            self.store.sync_dir()
        return self.shown

    def abort(self) -> None:
        self.writer.abort()


def _write_safetensors_file(view, tensors: list, url: str, options, metadata: dict | None = None) -> str:
    header, _ = _header(tensors, metadata)
    out = _Output(url, options)
    try:
        with out.store.errors("export", out.name):
            out.write(memoryview(header))
            view.stream_tensors([p for _, p, _ in tensors], out.write)
            return out.close()
    except BaseException:
        out.abort()
        raise


def _write_sharded(view, tensors: list, url: str, options, shard: int) -> list[str]:
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        n = item[2].nbytes
        if shards[-1] and size + n > shard:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    count = len(shards)
    base, q, query = url.partition("?")
    base = base.rstrip("/")
    suffix = q + query if q else ""
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    written = [_write_safetensors_file(view, part, f"{base}/{name}{suffix}", options)
               for part, name in zip(shards, names)]
    index = {"metadata": {"total_size": sum(i.nbytes for _, _, i in tensors)},
             "weight_map": {n: names[k] for k, part in enumerate(shards) for n, _, _ in part}}
    out = _Output(f"{base}/model.safetensors.index.json{suffix}", options)
    try:
        with out.store.errors("export", out.name):
            out.write(memoryview(json.dumps(index, indent=2).encode()))
            written.append(out.close())
    except BaseException:
        out.abort()
        raise
    return written


class _Sink:
    """The write-only file torch.save streams into (no seek, no buffer of the whole file)."""

    def __init__(self, out: _Output):
        self.out = out

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.out.write(view)
        return len(view)

    def flush(self) -> None:
        pass


def _export_torch(view, paths: list[tuple] | None, url: str, options) -> str:
    value = view.load() if paths is None else view.load(select=paths)
    if paths is not None and len(paths) == 1:
        for k in paths[0]:
            value = value[k]
    out = _Output(url, options)
    try:
        with out.store.errors("export", out.name):
            torch.save(value, _Sink(out))
            return out.close()
    except BaseException:
        out.abort()
        raise

