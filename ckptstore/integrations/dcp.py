"""Storage for ``torch.distributed.checkpoint`` (DCP) on any ckptstore backend.

    import torch.distributed.checkpoint as dcp
    from ckptstore.integrations.dcp import StoreReader, StoreWriter

    dcp.save(state, storage_writer=StoreWriter("s3://bucket/run1/step-100"))
    dcp.load(state, storage_reader=StoreReader("s3://bucket/run1/step-100"))

The result is an ordinary ckptstore checkpoint (docs/format.md), written by
all ranks together:

1. The coordinator picks one generation id while DCP plans the save and
   hands it, with a slot number, to every rank.
2. Each rank streams its own items (tensor shards, and the few values DCP
   serializes itself) into its own data files, ``<gen>-<n>.bin`` with ``n``
   from ``slot * 10**6``, computing CRC-32Cs on the way, and checks what the
   backend stored (read back, or the CRC the backend reports) before it
   reports success.
3. Only when every rank has reported does DCP call ``finish`` on the
   coordinator, which checks that every data file is present with its size
   and then commits one record listing them all, with the backend's commit
   strategy (rename or marker). A rank that dies or fails before that leaves
   data files no record vouches for: leftovers ``ckptstore gc`` removes; the
   previous checkpoint at the URI stays the committed one.

DCP's metadata (which chunk of which tensor lives where) is stored as JSON in
the commit record, never pickled. The node table holds every item, so
``ckptstore.verify`` checks the result like any checkpoint, and
``ckptstore.load`` returns a flat dict: ``"<fqn>"`` for a tensor saved whole,
``"<fqn>@<o0>,<o1>,..."`` for a shard at those offsets, and ``bytes`` for
values DCP serialized with ``torch.save``.

Those ``bytes`` values are the one place DCP itself unpickles: its default
load planner calls ``torch.load(..., weights_only=False)`` on them. The
reader therefore first loads each such value with torch's weights-only
unpickler (as ``ckptstore.load`` reads a ``.pt`` file) and refuses, with
``UnsafeCheckpointError``, exactly what that refuses, unless it was built
with ``allow_pickle=True``.

The writer takes the keywords of DCP's ``FileSystemWriter`` so that one can
replace the other: ``overwrite`` and ``cache_staged_state_dict`` mean what
they mean there; the tuning knobs of DCP's own file layout are accepted and
have no effect here (see ``StoreWriter``). Like ``FileSystemWriter`` it is
its own ``AsyncStager``, so ``dcp.async_save`` copies the state to host
memory before it returns.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import crc32c
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner, WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..datafiles import blob_table, plan as layout, write_files
from ..errors import (
    CheckpointError, CheckpointExistsError, CorruptCheckpointError, UnsafeCheckpointError, UnsupportedObjectError,
)
from ..format.dtypes import dtype_from_name, dtype_name
from ..format.manifest import ALIGN, BYTES, STORAGE, FileEntry, Manifest, commit_name
from ..format.tree import Blob, bytes_node, flat_dict_nodes, tensor_node, tensors
from ..ranges import Range, StreamReader
from ..reader import open_commit, shallow_problems
from ..stores import open_store
from ..stores.base import Store
from ..writer import Generation, has_commit, writer_fields

__all__ = ["StoreWriter", "StoreReader"]

# Rank slot s numbers its data files from s * SLOT_FILES; a rank may write
# fewer files than that (16 TiB at the default part size of object stores).
SLOT_FILES = 10 ** 6
# What the commit record's ``meta`` says about a DCP checkpoint.
META_KEY = "dcp"


def _location(checkpoint_id: Any) -> str:
    if isinstance(checkpoint_id, os.PathLike):
        return os.fspath(checkpoint_id)
    if not isinstance(checkpoint_id, str):
        raise TypeError(f"a checkpoint id must be a path or a URL string, not {type(checkpoint_id).__name__}")
    return checkpoint_id


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _can_pin() -> bool:
    """Whether pinned host memory can be had (it needs an accelerator)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


# ---------------------------------------------------------------- what travels between ranks

@dataclass(frozen=True)
class _Slot:
    """The coordinator's word to one rank: the generation, and where its file numbers start."""

    generation: str
    slot: int


@dataclass(frozen=True)
class _Stored:
    """Where a rank put one item (the ``storage_data`` of its WriteResult)."""

    slot: int
    start: int         # offset in this rank's stream (its files, concatenated)
    nbytes: int
    crc32c: int
    kind: str          # STORAGE for tensors, BYTES for serialized values
    dtype: str | None  # tensor items: dtype name and chunk shape
    shape: tuple | None
    files: tuple       # this rank's data files (FileEntry, ...), shared by its items


# ---------------------------------------------------------------- DCP metadata <-> JSON

def _encode_value(v: Any, where: str) -> Any:
    """Planner data as JSON with tuples, lists and dicts told apart; nothing else."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return {"i": str(v)}
    if isinstance(v, float):
        return {"f": repr(v)}
    if isinstance(v, tuple):
        return {"t": [_encode_value(x, where) for x in v]}
    if isinstance(v, list):
        return {"l": [_encode_value(x, where) for x in v]}
    if isinstance(v, dict):
        return {"d": [[_encode_value(k, where), _encode_value(x, where)] for k, x in v.items()]}
    raise UnsupportedObjectError(
        f"{where} holds a {type(v).__module__}.{type(v).__qualname__}; StoreWriter stores planner data "
        "made of None, bool, int, float, str, tuple, list and dict only")


def _decode_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "i":
            return int(x)
        if tag == "f":
            return float(x)
        if tag == "t":
            return tuple(_decode_value(y) for y in x)
        if tag == "l":
            return [_decode_value(y) for y in x]
        if tag == "d":
            return {_decode_value(k): _decode_value(y) for k, y in x}
    raise CorruptCheckpointError(f"malformed DCP planner data in the commit record: {v!r:.80}")


def _torch_attr(name: str, kind: type) -> Any:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, kind):
        raise CorruptCheckpointError(f"unknown torch {kind.__name__} {name!r} in the commit record")
    return value


def _encode_metadata(md: Metadata, index_of: dict[MetadataIndex, int]) -> dict:
    entries = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            entries[fqn] = {"kind": "bytes"}
            continue
        p = item.properties
        entries[fqn] = {
            "kind": "tensor", "dtype": dtype_name(p.dtype), "layout": str(p.layout),
            "requires_grad": bool(p.requires_grad), "memory_format": str(p.memory_format),
            "pin_memory": bool(p.pin_memory), "size": list(item.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks],
        }
    storage = [[i.fqn, None if i.offset is None else list(i.offset), i.index, blob]
               for i, blob in index_of.items()]
    sm = md.storage_meta
    return {
        "version": md.version,
        "state_dict": entries,
        "planner_data": _encode_value(md.planner_data, "the DCP planner data"),
        "storage": storage,
        "save_id": sm.save_id if sm is not None else None,
        "modules": list(sm.modules) if sm is not None else [],
    }


def _decode_metadata(doc: dict, generation: str) -> Metadata:
    try:
        entries: dict[str, Any] = {}
        for fqn, e in doc["state_dict"].items():
            if e["kind"] == "bytes":
                entries[fqn] = BytesStorageMetadata()
                continue
            props = TensorProperties(
                dtype=dtype_from_name(e["dtype"]), layout=_torch_attr(e["layout"], torch.layout),
                requires_grad=bool(e["requires_grad"]),
                memory_format=_torch_attr(e["memory_format"], torch.memory_format),
                pin_memory=bool(e["pin_memory"]))
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in e["chunks"]]
            entries[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(e["size"]), chunks=chunks)
        storage = {}
        for fqn, offset, index, blob in doc["storage"]:
            key = MetadataIndex(fqn=fqn, offset=None if offset is None else torch.Size(offset), index=index)
            storage[key] = (generation, int(blob))
        md = Metadata(state_dict_metadata=entries, planner_data=_decode_value(doc.get("planner_data")),
                      storage_data=storage)
        md.storage_meta = StorageMeta(save_id=doc.get("save_id"), modules=list(doc.get("modules") or []))
        if doc.get("version") is not None:
            md.version = doc["version"]
        return md
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"malformed DCP metadata in the commit record: {e}") from None


def _item_key(index: MetadataIndex, full: bool) -> str:
    """The key of an item in the state ``ckptstore.load`` returns."""
    if full or index.offset is None:
        return index.fqn
    return f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"


# ---------------------------------------------------------------- what writer and reader share

class _OnStore:
    """The URL a DCP storage works on, its options, and the store opened from them on first use."""

    _call = "dcp.save"   # named in the error for a missing URI

    def __init__(self, uri: str | os.PathLike | None, storage_options: Mapping[str, Any] | None) -> None:
        self.uri = None if uri is None else _location(uri)
        self.storage_options = dict(storage_options or {})
        self._store: Store | None = None

    def _reset_uri(self, checkpoint_id: str | os.PathLike | None) -> None:
        """DCP's ``reset``: a new checkpoint, perhaps at another URI; the store is reopened."""
        if checkpoint_id is not None:
            self.uri = _location(checkpoint_id)
        self._store = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    @property
    def store(self) -> Store:
        if self._store is None:
            if self.uri is None:
                raise CheckpointError(f"{type(self).__name__}: no URI (give one, or pass checkpoint_id to "
                                      f"{self._call})")
            self._store = open_store(self.uri, self.storage_options)
        return self._store


# ---------------------------------------------------------------- the writer

class StoreWriter(_OnStore, StorageWriter, BlockingAsyncStager):
    """DCP ``StorageWriter`` over a ckptstore URL (local path, ``s3://``, ``gs://``, FUSE mount, ...).

    ``uri`` may be overridden by ``dcp.save(..., checkpoint_id=...)``.
    ``storage_options`` configure the backend like those of
    ``ckptstore.save``; ``verify=True`` has each rank check what the backend
    stored before it reports success. Saving again to the same URI commits a
    new generation and retires the old one, as ``ckptstore.save`` does;
    ``overwrite=False`` refuses instead, on every rank, with
    ``CheckpointExistsError``, when a checkpoint is committed there (as DCP's
    ``FileSystemWriter(overwrite=False)`` refuses an existing one).

    ``dcp.async_save`` stages through the writer, as through
    ``FileSystemWriter``: the state is copied to host memory before
    ``async_save`` returns. ``cache_staged_state_dict=True`` keeps that copy
    for the next ``async_save`` with the same writer (pinned where an
    accelerator is present); wait for a save's future before starting the
    next one, since the next staging overwrites the copy it is writing.

    Accepted for compatibility with ``FileSystemWriter``, with no effect:
    ``single_file_per_rank`` and ``thread_count`` (each rank writes its own
    data files of the backend's ``part_size``, ``concurrency`` of them at a
    time: set those in ``storage_options``), ``per_thread_copy_ahead`` (a
    device tensor is copied to the host one bounded chunk at a time), and
    ``sync_files`` (files are always made durable before the commit, as the
    atomic-commit guarantee needs).
    """

    def __init__(self, uri: str | os.PathLike | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, verify: bool = True,
                 overwrite: bool = True, cache_staged_state_dict: bool = False,
                 single_file_per_rank: bool = True, sync_files: bool = True, thread_count: int = 1,
                 per_thread_copy_ahead: int = 10_000_000) -> None:
        super().__init__(uri, storage_options)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.verify = verify
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self._generation: Generation | None = None

    def __getstate__(self) -> dict:
        # The process-based async_save sends the writer to its checkpointing
        # process: the store is reopened there, and the staged copy travels
        # once, as the state dict itself.
        state = dict(self.__dict__)
        state["_store"] = None
        state["state_dict_cache"] = None
        return state

    # --- DCP's AsyncStager (dcp.async_save)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A host-memory copy of ``state_dict`` that later updates of the training state do not reach."""
        if not self.cache_staged_state_dict:
            return super().stage(state_dict)
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self.state_dict_cache is None:
            # BlockingAsyncStager always pins the cache, which fails on a machine without an accelerator.
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=_can_pin())
        return _copy_state_dict(state_dict, self.state_dict_cache)

    # --- DCP protocol

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._reset_uri(checkpoint_id)
        self._generation = None
        self.save_id = uuid.uuid4().hex

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.store.uri, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # The coordinator's part is prepare_global_plan and finish, which DCP calls on it alone.
        # Without collectives every rank would be a coordinator and commit its own part alone.
        if kwargs.get("use_collectives", True) is False and _world_size() > 1:
            raise CheckpointError(
                f"{self.store.uri}: StoreWriter commits one checkpoint for all ranks and needs DCP's "
                "collectives; call dcp.save without use_collectives=False", self.store.uri)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if not self.overwrite:
            self._refuse_existing()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: one generation for everyone, and a file-number slot per rank."""
        # With overwrite=False, begin checks once more, and the commit takes the exclusive claim.
        self._generation = Generation.begin(self.store, overwrite=self.overwrite)
        return [dataclasses.replace(p, storage_data=_Slot(self._generation.id, i)) for i, p in enumerate(plans)]

    def _refuse_existing(self) -> None:
        """``overwrite=False``: every rank refuses a committed checkpoint, in DCP's words."""
        store = self.store
        if has_commit(store, store.list() or {}):
            raise CheckpointExistsError(
                f"{store.uri}: Checkpoint already exists and overwrite=False; nothing was written. Save "
                "elsewhere, or pass overwrite=True to replace it", store.uri)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        slot: _Slot = plan.storage_data
        if not isinstance(slot, _Slot):
            raise CheckpointError("StoreWriter.write_data: the plan was not prepared by a StoreWriter coordinator")
        store = self.store
        items = list(plan.items)
        blobs, shapes = [], []
        for item in items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())
                blobs.append(Blob(BYTES, len(raw), raw))
                shapes.append((None, None))
                continue
            # Only the projection is stored; a non-contiguous view is compacted
            # by the writer when its turn comes (datafiles.blob_chunks).
            t = data.detach()
            blobs.append(Blob(STORAGE, t.numel() * t.element_size(), t, "cpu"))
            shapes.append((dtype_name(t.dtype), tuple(t.shape)))
        fut: Future = Future()
        if not blobs:
            fut.set_result([])
            return fut
        p = layout(blobs, store.part_bytes, pad_end=True)
        if len(p.sizes) >= SLOT_FILES:
            raise CheckpointError(f"{store.uri}: one rank's share needs {len(p.sizes)} data files; "
                                  f"raise part_size (at most {SLOT_FILES - 1} files per rank)", store.uri)
        gen = Generation.join(store, slot.generation)
        gen.check_space(p.total)
        names = [gen.data_name(slot.slot * SLOT_FILES + j) for j in range(len(p.sizes))]
        try:
            entries, blob_crcs = write_files(store, names, p, verify=self.verify, written=gen.written)
        except BaseException:
            gen.discard()
            raise
        files = tuple(entries)
        results = []
        for k, (blob, start, item, (dtype, shape)) in enumerate(zip(p.blobs, p.starts, items, shapes)):
            stored = _Stored(slot.slot, start, blob.nbytes, blob_crcs[k], blob.kind, dtype, shape, files)
            results.append(WriteResult(index=item.index, size_in_bytes=blob.nbytes, storage_data=stored))
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, once every rank has written and checked its files: the commit."""
        store, gen = self.store, self._generation
        if gen is None:
            raise CheckpointError("StoreWriter.finish: called without prepare_global_plan")
        by_slot: dict[int, tuple] = {}
        flat: list[WriteResult] = []
        for rank_results in results:
            for r in rank_results:
                by_slot.setdefault(r.storage_data.slot, r.storage_data.files)
                flat.append(r)
        files: list[FileEntry] = []
        base: dict[int, int] = {}      # where each rank's stream starts in the whole stream
        for slot in sorted(by_slot):
            base[slot] = sum(f.nbytes for f in files)
            files.extend(by_slot[slot])
        if not files:
            # Nothing to store at all (an empty state): one empty data file keeps the format's shape.
            empty = gen.data_name(0)
            gen.written.append(empty)
            store.put(empty, b"")
            files.append(FileEntry(empty, 0, 0))

        missing = shallow_problems(files, store.list() or {})
        if missing:
            raise CheckpointError(f"{store.uri}: not committing, " + "; ".join(missing), store.uri)

        # Blobs in stream order (slot by slot), as the format lays them out;
        # the state's keys in name order.
        flat.sort(key=lambda r: (r.storage_data.slot, r.storage_data.start))
        index_of = {r.index: b for b, r in enumerate(flat)}
        table = blob_table([Blob(r.storage_data.kind, r.storage_data.nbytes, None) for r in flat],
                           [r.storage_data.crc32c for r in flat])
        expected = [base[r.storage_data.slot] + r.storage_data.start for r in flat]
        if table.starts.tolist() != expected or any(b % ALIGN for b in base.values()):
            raise CheckpointError(f"{store.uri}: internal error: the ranks' streams do not line up", store.uri)
        sizes = {fqn: md.size for fqn, md in metadata.state_dict_metadata.items()
                 if isinstance(md, TensorStorageMetadata)}
        items = []
        for r in sorted(flat, key=lambda r: (r.index.fqn, tuple(r.index.offset or ()))):
            s, b = r.storage_data, index_of[r.index]
            full = s.shape is not None and tuple(sizes.get(r.index.fqn, ())) == tuple(s.shape)
            node = bytes_node(b) if s.kind == BYTES else tensor_node(b, s.dtype, list(s.shape))
            items.append((_item_key(r.index, full), node))
        manifest = Manifest(generation=gen.id, files=files, blobs=table, nodes=flat_dict_nodes(items),
                            meta={META_KEY: _encode_metadata(metadata, index_of)},
                            writer=writer_fields(via="torch.distributed.checkpoint"))
        gen.commit(manifest)


# ---------------------------------------------------------------- the reader

class StoreReader(_OnStore, StorageReader):
    """DCP ``StorageReader`` for checkpoints written by :class:`StoreWriter`.

    Each rank reads only the items its load plan needs, with range reads,
    ``concurrency`` of the backend at a time, and checks each item's CRC-32C
    before handing it to the planner (``verify=False`` skips that).
    Serialized (non-tensor) values must pass torch's weights-only unpickler
    unless ``allow_pickle=True``.
    """

    def __init__(self, uri: str | os.PathLike | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, verify: bool = True,
                 allow_pickle: bool = False) -> None:
        super().__init__(uri, storage_options)
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.load_id = uuid.uuid4().hex
        self._manifest: Manifest | None = None
        self._storage: dict[MetadataIndex, tuple[str, int]] = {}

    _call = "dcp.load"

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._reset_uri(checkpoint_id)
        self._manifest = None
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any) -> Metadata:
        # No **kwargs: DCP then never asks for per-rank metadata, which these checkpoints do not have.
        m, _ = open_commit(self.store)
        doc = m.meta.get(META_KEY)
        if not isinstance(doc, dict):
            raise CheckpointError(
                f"{self.store.uri} was not written by torch.distributed.checkpoint through StoreWriter; "
                "load it with ckptstore.load", self.store.uri)
        self._manifest = m
        md = _decode_metadata(doc, m.generation)
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage = dict(metadata.storage_data or {})
        gens = {v[0] for v in self._storage.values()}
        if len(gens) > 1:
            raise CorruptCheckpointError(f"{self.store.uri}: DCP metadata names several generations")
        if gens and (self._manifest is None or self._manifest.generation not in gens):
            # Metadata read elsewhere: take the very generation it describes.
            gen = gens.pop()
            self._manifest = Manifest.from_bytes(self.store.get(commit_name(gen)),
                                                 f"{self.store.uri}/{commit_name(gen)}")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        m = self._manifest
        if m is None:
            raise CheckpointError("StoreReader.read_data: called before read_metadata")
        store = self.store
        shapes = _tensor_shapes(m)
        by_blob: dict[int, list[ReadItem]] = {}
        for req in plan.items:
            where = self._storage.get(req.storage_index)
            if where is None:
                raise CorruptCheckpointError(f"{store.uri}: no stored item for {req.storage_index.fqn}", store.uri)
            if not 0 <= where[1] < len(m.blobs):
                raise CorruptCheckpointError(f"{store.uri}: DCP metadata names blob {where[1]}", store.uri)
            by_blob.setdefault(where[1], []).append(req)

        blobs = m.blobs

        def ranges():
            # A stored chunk going whole into contiguous CPU memory is read straight into it.
            for b in sorted(by_blob, key=lambda b: int(blobs.starts[b])):
                target = _direct_target(by_blob[b], shapes.get(b), planner)
                into = None if target is None else _bytes_of(target)
                n = int(blobs.sizes[b])
                if into is not None and len(into) != n:
                    raise CorruptCheckpointError(f"{store.uri}: blob {b} has {n} bytes, its tensor {len(into)}",
                                                 store.uri)
                yield Range(int(blobs.starts[b]), n, into, (b, target))

        with StreamReader(store, m.files) as reader:
            for r, buf in reader.fetch(ranges()):
                b, target = r.tag
                if self.verify and crc32c.crc32c(buf) != int(blobs.crcs[b]):
                    raise CorruptCheckpointError(
                        f"{store.uri}: CRC-32C mismatch in blob {b} ({r.nbytes} bytes); the checkpoint is corrupt",
                        store.uri)
                if target is not None:
                    planner.commit_tensor(by_blob[b][0], target)
                    continue
                for req in by_blob[b]:
                    self._place(req, b, buf, shapes, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    # --- helpers

    def _place(self, req: ReadItem, b: int, buf: memoryview, shapes: dict, planner: LoadPlanner) -> None:
        if req.type == LoadItemType.BYTE_IO:
            raw = bytes(buf)
            if not self.allow_pickle:
                self._check_weights_only(raw, req.storage_index.fqn)
            planner.load_bytes(req, io.BytesIO(raw))
            return
        dtype, shape = shapes[b]
        src = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        t = src.view(dtype).reshape(shape)
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            t = t.narrow(dim, int(start), int(length))
        target = planner.resolve_tensor(req).detach()
        if target.size() != t.size():
            raise CorruptCheckpointError(
                f"{self.store.uri}: {req.storage_index.fqn}: stored chunk is {tuple(t.size())}, "
                f"the load plan wants {tuple(target.size())}")
        target.copy_(t)
        planner.commit_tensor(req, target)

    def _check_weights_only(self, raw: bytes, fqn: str) -> None:
        """Refuse a serialized value that torch's weights-only unpickler refuses.

        That unpickler runs no code: it builds only allow-listed types (and
        whatever ``torch.serialization.add_safe_globals`` added), so a value it
        accepts is safe for DCP's own unpickler too, which then loads it.
        """
        uri = self.store.uri
        try:
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "error:" in ln]
            raise UnsafeCheckpointError(
                f"{uri}: the value {fqn!r} holds objects outside torch's weights-only allow-list, and "
                "unpickling them could run arbitrary code; pass allow_pickle=True to StoreReader only if "
                "you trust where it came from, or allow-list a harmless class with "
                "torch.serialization.add_safe_globals. Refused: " + (lines[0][:300] if lines else "pickle"),
                uri) from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - the weights-only unpickler runs no code: anything else is damage
            raise CorruptCheckpointError(
                f"{uri}: the value {fqn!r} is not a readable torch.save stream ({type(e).__name__}: {e})"[:400],
                uri) from None


def _direct_target(reqs: list[ReadItem], stored: tuple | None, planner: LoadPlanner) -> torch.Tensor | None:
    """The destination tensor, when one stored chunk goes whole into contiguous CPU memory of its dtype.

    Then the bytes are read straight into it: no buffer, no copy. Anything
    else (a slice of the chunk, another dtype or device, a strided view of
    a resharded destination) goes through a buffer.
    """
    if len(reqs) != 1 or reqs[0].type != LoadItemType.TENSOR or stored is None:
        return None
    req, (dtype, shape) = reqs[0], stored
    if any(int(o) for o in req.storage_offsets) or tuple(int(n) for n in req.lengths) != tuple(shape):
        return None
    target = planner.resolve_tensor(req).detach()
    if (target.device.type != "cpu" or target.dtype != dtype or tuple(target.shape) != tuple(shape)
            or not target.is_contiguous() or target.numel() == 0):
        return None
    return target


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensor_shapes(m: Manifest) -> dict[int, tuple[torch.dtype, tuple]]:
    """blob -> (dtype, shape) of the tensor node stored in it."""
    return {t.blob: (dtype_from_name(t.dtype), tuple(int(d) for d in t.shape))
            for _, t in tensors(m) if t.blob is not None}
