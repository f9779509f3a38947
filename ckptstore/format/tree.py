"""State tree <-> node table.

A checkpoint's structure is a flat table of JSON nodes; node 0 is the root and
every container names its children by index. Children always come after
their parent, and each node has exactly one parent, so decoding walks the
table backwards and never recurses: a state nested ten thousand levels deep
costs no more stack than a flat one.

Bulk data (tensor storages, numpy arrays, bytes, pickles) is not in the table:
a node points at a *blob*, and blobs are written to data files by the writer.
Tensors that share a storage point at the same blob, which is how tied
weights, views and transposes come back sharing memory.

Nothing here unpickles unless the caller allowed it, and nothing here does
I/O. The node kinds are specified in docs/format.md; this module is the only
one that builds or reads them.
"""

from __future__ import annotations

import collections
import math
import struct
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from ..errors import (
    ArgumentError, CorruptCheckpointError, DeviceUnavailableError, UnsafeCheckpointError, UnsupportedObjectError,
    not_stored, record_checks,
)
from . import shards
from .dtypes import NAME_OF, dtype_from_name, dtype_name
from .manifest import BYTES, NDARRAY, PICKLE, STORAGE, Manifest
from .walk import DICT, LIST, ODICT, TUPLE, render_path, typename, walk

_MAX_JSON_INT = 2 ** 53          # dict keys up to this are written inline as JSON numbers
_DECIMAL = re.compile(r"-?[0-9]{1,4300}")   # Python's int-from-str limit: longer is refused
_HEX = re.compile(r"-?0x[0-9a-f]+")


@dataclass
class Blob:
    """A run of bytes to store, and where it comes from."""

    kind: str
    nbytes: int          # bytes in the stream (a compressed blob's stored size)
    source: Any          # UntypedStorage | np.ndarray | bytes (| a tensor, for a shard)
    device: str = "cpu"  # where a storage lives (cuda storages are staged through host memory)
    #: set when the blob is stored compressed: ``source`` is then a uint8 array of its stored bytes
    frames: Any = None


# ---------------------------------------------------------------- node builders

def contiguous_strides(shape: list[int]) -> list[int]:
    """The strides torch gives a contiguous tensor of ``shape``."""
    out, acc = [0] * len(shape), 1
    for i in range(len(shape) - 1, -1, -1):
        out[i] = acc
        acc *= max(shape[i], 1)
    return out


def tensor_node(blob: int | None, dtype: str, shape: list[int], stride: list[int] | None = None,
                offset: int = 0, requires_grad: bool = False, parameter: bool = False) -> list:
    """``["tensor", blob, dtype, shape]``, plus an object of whatever differs from the defaults."""
    node = ["tensor", blob, dtype, shape]
    extra: dict[str, Any] = {}
    if stride is not None and stride != contiguous_strides(shape):
        extra["stride"] = stride
    if offset:
        extra["offset"] = offset
    if requires_grad:
        extra["grad"] = True
    if parameter:
        extra["param"] = True
    if extra:
        node.append(extra)
    return node


def bytes_node(blob: int) -> list:
    return ["bytes", blob]


def _plain_str(s: str) -> bool:
    """Whether ``s`` is valid Unicode (no lone surrogates), so any JSON parser reads it back."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def str_node(s: str) -> list:
    return ["str", s] if _plain_str(s) else ["str", [ord(c) for c in s]]


def inline_key(key: Any) -> bool:
    """Keys written in a dict node itself; any other key is a node of its own."""
    t = type(key)
    return (t is str and _plain_str(key)) or (t is int and -_MAX_JSON_INT <= key <= _MAX_JSON_INT)


def flat_dict_nodes(items: list[tuple[str, list]]) -> list:
    """The node table of a dict whose values are leaf nodes: ``items`` of (key, node)."""
    nodes: list = [["dict", [], []]]
    keys, values = nodes[0][1], nodes[0][2]
    for key, node in items:
        if inline_key(key):
            keys.append(key)
        else:
            keys.append([len(nodes)])
            nodes.append(str_node(key))
        values.append(len(nodes))
        nodes.append(node)
    return nodes


# ---------------------------------------------------------------- encoding

class Encoder:
    """Turns a state tree into (nodes, blobs). One use per save."""

    def __init__(self, allow_pickle: bool = False, devices: dict | None = None, sharded: bool = False):
        self.allow_pickle = allow_pickle
        # a rank's part of a multi-rank save: DTensors and ShardedTensors become "sharded" nodes
        # holding the shards this rank has
        self.sharded = sharded
        # data_ptr -> device string, for storages that are host copies of
        # device memory (an async save's snapshot): record where they came from
        self.devices = devices or {}
        self.nodes: list = []
        self.blobs: list[Blob] = []
        self._storages: dict = {}    # storage identity -> blob index

    def encode(self, root: Any) -> tuple[list, list[Blob]]:
        walk(root, self._enter)
        return self.nodes, self.blobs

    def _enter(self, obj: Any, kind: str | None, path: tuple, parent, slot: int):
        nodes = self.nodes
        if parent is not None:
            pnode, pkind = parent
            if pkind in (DICT, ODICT):
                n_items = len(pnode[1])
                if slot < 2 * n_items and slot % 2 == 0:        # a key
                    if kind is None and inline_key(obj):
                        pnode[1][slot // 2] = obj
                        return None
                    pnode[1][slot // 2] = [len(nodes)]
                elif slot < 2 * n_items:
                    pnode[2][slot // 2] = len(nodes)
                else:
                    pnode.append(len(nodes))                      # _metadata
            else:
                pnode[1][slot] = len(nodes)
        if kind is None:
            at = len(nodes)
            nodes.append(None)          # a sharded leaf appends its shards' nodes after its own
            nodes[at] = self._leaf(obj, path)
            return None
        if kind in (LIST, TUPLE):
            node = [kind, [None] * len(obj)]
        else:
            node = [kind, [None] * len(obj), [None] * len(obj)]
        nodes.append(node)
        return node, kind

    def _leaf(self, obj: Any, path: tuple) -> list:
        t = type(obj)
        if t is torch.Tensor or t is torch.nn.Parameter:
            return self._tensor(obj, path)
        if self.sharded and shards.is_sharded(obj):
            return self._sharded(obj, path)
        if obj is None:
            return ["none"]
        if t is bool:
            return ["bool", obj]
        if t is int:
            try:
                return ["int", str(obj)]
            except ValueError:   # past Python's int-to-str limit: hex has none
                return ["int", hex(obj)]
        if t is float:
            if math.isfinite(obj):
                return ["float", obj]
            if obj == obj or struct.pack(">d", obj) == _CANONICAL_NAN:
                return ["float", repr(obj)]
            return ["float", "nan:" + struct.pack(">d", obj).hex()]     # sign and payload kept
        if t is str:
            return str_node(obj)
        if t is bytes:
            return ["bytes", self._add_blob(Blob(BYTES, len(obj), obj))]
        if t is np.ndarray:
            return ["ndarray", self._ndarray(obj, path)]
        if isinstance(obj, np.generic) and plain_numpy_dtype(obj.dtype):
            return ["npscalar", {"dtype": obj.dtype.str, "data": obj.tobytes().hex()}]
        if t is torch.Size:
            return ["size", [int(d) for d in obj]]
        if t is torch.dtype:
            return ["dtype", dtype_name(obj, render_path(path))]
        if t is torch.device:
            return ["device", str(obj)]
        if self.allow_pickle:
            return ["pickle", self._pickle(obj, path)]
        raise UnsupportedObjectError(
            f"{render_path(path)}: {typename(obj)} is not supported by the safe format "
            "(tensors, numpy arrays, numbers, str, bytes, None, torch.Size/dtype/device and "
            "dict/OrderedDict/list/tuple of them); convert it, or pass allow_pickle=True "
            "to store it pickled")

    def _add_blob(self, blob: Blob) -> int:
        self.blobs.append(blob)
        return len(self.blobs) - 1

    def _tensor(self, t: torch.Tensor, path: tuple) -> list:
        # Called once per tensor (10**5 in an optimizer state): attribute reads only.
        name = NAME_OF.get(t.dtype)
        if name is None or t.layout is not torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedObjectError(
                f"{render_path(path)}: a {t.layout} {str(t.dtype).removeprefix('torch.')} tensor is not "
                "supported by the safe format (dense strided tensors of plain dtypes are); convert it "
                "(e.g. .to_dense(), .dequantize()) or pass allow_pickle=True")
        data = t
        if t.is_conj() or t.is_neg():
            # The lazy bits live outside the storage; materialise the values.
            data = t.detach().resolve_conj().resolve_neg()
        shape = list(data.shape)
        stride = list(data.stride())
        if data.is_meta:
            blob = None
        else:
            storage = data.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            # Addresses are unique across devices in one process (CUDA uses unified addressing).
            key = (ptr, nbytes) if ptr else ("empty", id(storage))
            blob = self._storages.get(key)
            if blob is None:
                device = self.devices.get(ptr) if self.devices else None
                if device is None:
                    device = "cpu" if data.is_cpu else str(storage.device)
                blob = len(self.blobs)
                self.blobs.append(Blob(STORAGE, nbytes, storage, device))
                self._storages[key] = blob
        node = ["tensor", blob, name, shape]
        offset = data.storage_offset()
        grad, param = t.requires_grad, type(t) is torch.nn.Parameter
        contiguous = stride == [1] if len(shape) == 1 else stride == contiguous_strides(shape)
        if offset or grad or param or not contiguous:
            node = tensor_node(blob, name, shape, stride, offset, grad, param)
        return node

    def _sharded(self, obj: torch.Tensor, path: tuple) -> list:
        """``["sharded", dtype, shape, [[offsets, node], ...]]``: the shards this rank holds."""
        where = render_path(path)
        name = NAME_OF.get(obj.dtype)
        if name is None:
            raise UnsupportedObjectError(f"{where}: a sharded {obj.dtype} tensor is not supported by the safe format")
        entries: list = []
        node = ["sharded", name, [int(d) for d in obj.shape], entries]
        if obj.requires_grad or isinstance(obj, torch.nn.Parameter):
            node.append({**({"grad": True} if obj.requires_grad else {}),
                         **({"param": True} if isinstance(obj, torch.nn.Parameter) else {})})
        for offsets, local in shards.local_shards(obj, where):
            at = len(self.nodes)
            self.nodes.append(None)
            self.nodes[at] = self._tensor(local, path)
            entries.append([list(offsets), at])
        return node

    def _ndarray(self, a: np.ndarray, path: tuple) -> dict:
        if not plain_numpy_dtype(a.dtype):
            raise UnsupportedObjectError(
                f"{render_path(path)}: numpy array of dtype {a.dtype} is not supported by the safe "
                "format (object and structured dtypes are not); pass allow_pickle=True to store it pickled")
        blob = self._add_blob(Blob(NDARRAY, int(a.nbytes), a))
        return {"dtype": a.dtype.str, "shape": list(a.shape), "blob": blob}

    def _pickle(self, obj: Any, path: tuple) -> int:
        import pickle
        try:
            data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        except Exception as e:
            raise UnsupportedObjectError(
                f"{render_path(path)}: {typename(obj)} cannot be pickled: {e}") from e
        return self._add_blob(Blob(PICKLE, len(data), data))


# A pickled value is Python's plain pickle at this protocol (5, Python 3.8+).
PICKLE_PROTOCOL = 5


def plain_numpy_dtype(dtype: np.dtype) -> bool:
    return not dtype.hasobject and dtype.fields is None and dtype.subdtype is None


def encode(state: Any, allow_pickle: bool = False, devices: dict | None = None,
           sharded: bool = False) -> tuple[list, list[Blob]]:
    """Encode ``state``; raises UnsupportedObjectError before any I/O happens. ``sharded``: a
    rank's part of a multi-rank save (DTensors and ShardedTensors as the shards it holds)."""
    return Encoder(allow_pickle, devices, sharded).encode(state)


# ---------------------------------------------------------------- reading the table

class TensorNode(NamedTuple):
    blob: int | None
    dtype: str
    shape: tuple
    stride: tuple
    offset: int
    requires_grad: bool
    parameter: bool


def tensor_info(node: list, version: int) -> TensorNode:
    """A tensor node's fields, in either version's form (not yet checked against its blob)."""
    if version == 1:
        info = node[1]
        shape = tuple(info["shape"])
        return TensorNode(info["storage"], info["dtype"], shape, tuple(info["stride"]), info["offset"],
                          bool(info.get("requires_grad")), bool(info.get("parameter")))
    if len(node) not in (4, 5):
        raise _bad("a tensor node has 4 or 5 elements")
    extra = node[4] if len(node) == 5 else {}
    if type(extra) is not dict or type(node[3]) is not list:
        raise _bad("malformed tensor node")
    shape = tuple(node[3])
    stride = extra.get("stride")
    return TensorNode(node[1], node[2], shape,
                      tuple(stride) if stride is not None else tuple(contiguous_strides(list(shape))),
                      extra.get("offset", 0), extra.get("grad", False) is True, extra.get("param", False) is True)


def tensors(m: Manifest) -> Iterator[tuple[int, TensorNode]]:
    """(node index, fields) of every tensor node; a malformed one raises CorruptCheckpointError."""
    for i, node in enumerate(m.nodes):
        if type(node) is list and node and node[0] == "tensor":
            with record_checks(f"node {i} (tensor)"):
                info = tensor_info(node, m.version[0])
            yield i, info


def uses_pickle(nodes: list) -> bool:
    return any(type(n) is list and n and n[0] == "pickle" for n in nodes)


def refuse_pickle(nodes: list) -> None:
    """UnsafeCheckpointError if the structure holds pickled values."""
    if uses_pickle(nodes):
        raise UnsafeCheckpointError(
            "the checkpoint holds pickled objects, and unpickling can run arbitrary code; "
            "load it with allow_pickle=True only if you trust where it came from")


def describe(m: Manifest) -> dict[str, Any]:
    """A summary fit for `ckptstore info`, from the record alone."""
    return {
        "format": ".".join(map(str, m.version)),
        "generation": m.generation,
        "created": m.created,
        "nbytes": m.nbytes,
        "logical": m.logical,
        "stored": m.stored,
        "compressed": len(m.blobs.codec or {}),
        "codec": "zstd, byte-grouped" if m.blobs.codec else None,
        "files": [{"name": f.name, "nbytes": f.nbytes, "crc32c": f"{f.crc32c:08x}", **({"dir": f.dir} if f.dir else {})}
                  for f in m.files],
        "tensors": m.tensors,
        "blobs": m.blobs.count(),
        "pickled": m.pickled,
        "writer": m.writer,
        "meta": m.meta,
    }


# ---------------------------------------------------------------- decoding

def is_placement_function(map_location) -> bool:
    """Whether ``map_location`` is a function ``(storage, location) -> storage`` (torch.load's form)."""
    return callable(map_location) and not isinstance(map_location, (str, torch.device))


def target_device(location: str, map_location) -> torch.device | None:
    """Where a storage saved on ``location`` goes, as torch.load decides it; None when
    ``map_location`` is a function (only calling it tells).

    A ``map_location`` that names no device is the caller's ``ArgumentError``; a recorded
    ``location`` that names none is a malformed record.
    """
    if is_placement_function(map_location):
        return None
    if map_location is None:
        target = location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    else:
        target = map_location
    if target is location:
        try:
            return torch.device(location)
        except (RuntimeError, TypeError, ValueError):
            raise _bad(f"the recorded device {location!r:.40} is not a device") from None
    try:
        return torch.device(target)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArgumentError(f"map_location={map_location!r:.80} does not name a device ({e}); "
                            "pass e.g. 'cpu', 'cuda', 'cuda:1' or torch.device(...)") from None


def check_device(device: torch.device, location: str) -> None:
    """DeviceUnavailableError, naming the device and the fix, when this machine lacks ``device``."""
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (device.index is None or device.index < count):
            return
        have = f"this machine has {count} CUDA device(s)" if count else "CUDA is not available here"
    else:
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        try:
            if available is not None and available():
                return
        except Exception:  # noqa: BLE001 - a backend that cannot even say is not available
            pass
        have = f"{device.type} is not available here"
    saved = f"saved on {location}, to be placed on {device}" if str(device) != location else f"saved on {location}"
    raise DeviceUnavailableError(
        f"the checkpoint holds tensors {saved}, but {have}; pass map_location='cpu' (or a device this "
        "machine has) to load them there")


def restore_location(storage: torch.UntypedStorage, location: str, map_location) -> torch.UntypedStorage:
    """Where torch.load would put a storage saved on ``location``.

    Errors of the caller's ``map_location`` function and of the device copy are the caller's
    and the machine's, never signs of corruption (errors.not_stored).
    """
    if is_placement_function(map_location):
        try:
            result = map_location(storage, location)
        except BaseException as e:
            raise not_stored(e)
        if result is not None:
            return getattr(result, "_untyped_storage", result)
        map_location = None
    device = target_device(location, map_location)
    if device.type == "cpu":
        return storage
    if device.type == "meta":
        return torch.UntypedStorage(storage.nbytes(), device="meta")
    check_device(device, location)
    try:
        return storage.to(device=device)
    except BaseException as e:
        raise not_stored(e)


def _bad(msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed checkpoint structure: {msg}")


class _Table:
    """The decoder's view of the node table: values built so far, and which nodes have a parent."""

    def __init__(self, nodes: list, blob_value: Callable[[int], Any], ranks: Any = None):
        self.nodes, self.blob_value = nodes, blob_value
        self.values: list = [None] * len(nodes)
        self.claimed = bytearray(len(nodes))
        self.partial: dict = {}
        self.ranks = ranks      # (rank, world size) of the reader, ALL_RANKS, or None (see _decode_ranks)

    def child(self, i: int, c: Any) -> Any:
        if type(c) is not int or not (i < c < len(self.nodes)):
            raise _bad(f"node {i} refers to node {c!r:.40}")
        if self.claimed[c]:
            raise _bad(f"node {c} has two parents")
        self.claimed[c] = 1
        return self.values[c]


def decode(nodes: list, blob_value: Callable[[int], Any], allow_pickle: bool = False, version: int = 2,
           needed: set | None = None, partial: dict | None = None, placed: dict | None = None,
           root: int = 0, ranks: Any = None) -> Any:
    """Rebuild the state from ``nodes``.

    ``blob_value(i, kind)`` returns blob i as loaded, or raises
    CorruptCheckpointError when there is no blob i or it is not of ``kind``:
    an UntypedStorage (already on its final device) for storage blobs, a
    numpy array for ndarray blobs, ``bytes`` for bytes and pickle blobs.

    A partial decode (``paths.Selection``) builds only the ``needed`` nodes;
    a container in ``partial`` keeps only the children named there (a dict
    the selected keys, a list or tuple its length with None elsewhere).
    ``placed`` maps node indices to values built elsewhere (the tensors of
    ``into=``), used as they are. ``root`` is the node whose value is returned.
    ``ranks``: which child a ``ranks`` node (a value saved per rank) stands for: this
    reader's ``(rank, world size)``, or ``ALL_RANKS`` for the list of them all.
    """
    if not isinstance(nodes, list) or not nodes:
        raise _bad("empty node table")
    order = range(len(nodes) - 1, -1, -1) if needed is None else sorted(needed, reverse=True)
    if not allow_pickle:
        if needed is None:
            refuse_pickle(nodes)
        else:
            refuse_pickle([nodes[i] for i in order])
    table = _Table(nodes, blob_value, ranks)
    table.partial = partial or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 warns that it is experimental
        _decode_all(nodes, table, version, order, placed or {})
    return table.values[root]


def _decode_all(nodes: list, table: _Table, version: int, order, placed: dict) -> None:
    at: list = [0, ""]      # the node being decoded, named only if it fails (one check for all nodes)
    with record_checks(lambda: f"node {at[0]} ({at[1]:.20})"):
        for i in order:
            if i in placed:
                table.values[i] = placed[i]
                continue
            node = nodes[i]
            if type(node) is not list or not node or type(node[0]) is not str:
                raise _bad(f"node {i} is not a tagged list")
            tag = at[1] = node[0]
            at[0] = i
            table.values[i] = _decode_node(i, tag, node, table, version)


def _decode_node(i: int, tag: str, node: list, table: _Table, version: int) -> Any:
    if tag in _SCALARS:
        return _SCALARS[tag](i, node)
    if tag == "bytes":
        return bytes(table.blob_value(node[1], BYTES))
    if tag == "tensor":
        return _decode_tensor(tensor_info(node, version), table.blob_value)
    if tag == "ndarray":
        info = node[1]
        dtype = _numpy_dtype(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        arr = table.blob_value(info["blob"], NDARRAY)
        if math.prod(shape) * dtype.itemsize != arr.nbytes or any(d < 0 for d in shape):
            raise _bad(f"node {i}: ndarray of shape {shape} and dtype {dtype} in a blob of {arr.nbytes} bytes")
        return arr.view(dtype).reshape(shape)
    if tag in (DICT, ODICT):
        return (_decode_dict_v1 if version == 1 else _decode_dict)(i, tag, node, table)
    keep = table.partial.get(i)
    if tag == LIST:
        return [table.child(i, c) if keep is None or c in keep else None for c in node[1]]
    if tag == TUPLE:
        return tuple(table.child(i, c) if keep is None or c in keep else None for c in node[1])
    if tag == "pickle":
        import pickle
        return pickle.loads(table.blob_value(node[1], PICKLE))
    if tag == SHARDED:
        return _decode_sharded(i, node, table)
    if tag == RANKS:
        return _decode_ranks(i, node, table)
    raise _bad(f"node {i} has unknown kind {tag!r:.40}; it may need a newer ckptstore")


def _decode_dict(i: int, tag: str, node: list, table: _Table) -> dict:
    if len(node) not in (3, 4) or (len(node) == 4 and tag != ODICT):
        raise _bad(f"node {i}: a {tag} node has 3 elements (4 with _metadata)")
    keys, values = node[1], node[2]
    if type(keys) is not list or type(values) is not list or len(keys) != len(values):
        raise _bad(f"node {i}: keys and values must be lists of one length")
    out = {} if tag == DICT else collections.OrderedDict()
    keep = table.partial.get(i)
    for k, v in zip(keys, values):
        if keep is not None and v not in keep:
            continue
        t = type(k)
        if t is list and len(k) == 1:
            k = table.child(i, k[0])
        elif not (t is str or (t is int and -_MAX_JSON_INT <= k <= _MAX_JSON_INT)):
            raise _bad(f"node {i}: a key must be a string, an int or [node]")
        out[k] = table.child(i, v)
    if len(node) == 4 and keep is None:
        out._metadata = table.child(i, node[3])
    return out


def _decode_dict_v1(i: int, tag: str, node: list, table: _Table) -> dict:
    kids = node[1]
    has_meta = len(node) > 2 and node[2] is True
    pairs = kids[:-1] if has_meta else kids
    if len(pairs) % 2:
        raise _bad(f"node {i}: odd number of dict children")
    out = {} if tag == DICT else collections.OrderedDict()
    keep = table.partial.get(i)
    for j in range(0, len(pairs), 2):
        if keep is not None and pairs[j + 1] not in keep:
            continue
        out[table.child(i, pairs[j])] = table.child(i, pairs[j + 1])
    if has_meta and keep is None:
        out._metadata = table.child(i, kids[-1])
    return out


def _decode_int(i: int, node: list) -> int:
    s = node[1]
    if type(s) is str and _DECIMAL.fullmatch(s):
        return int(s)
    if type(s) is str and _HEX.fullmatch(s):
        return int(s, 16)
    raise _bad(f"node {i}: an int is a decimal string of at most 4300 digits or a 0x hex string")


_CANONICAL_NAN = struct.pack(">d", float("nan"))
_NAN_BITS = re.compile(r"nan:(7ff|fff)[0-9a-f]{13}")


def _decode_float(i: int, node: list) -> float:
    v = node[1]
    if type(v) is str and v in ("nan", "inf", "-inf"):
        return float(v)
    if type(v) is str and _NAN_BITS.fullmatch(v):
        f = struct.unpack(">d", bytes.fromhex(v[4:]))[0]
        if f == f:
            raise _bad(f"node {i}: {v} is not a NaN")
        return f
    if type(v) not in (int, float) or (type(v) is int and abs(v) > 2 ** 1024):
        raise _bad(f"node {i}: bad float")
    return float(v)


def _decode_str(i: int, node: list) -> str:
    v = node[1]
    if type(v) is str:
        return v
    if type(v) is list and all(type(c) is int and 0 <= c <= 0x10FFFF for c in v):
        return "".join(map(chr, v))
    raise _bad(f"node {i}: str expected")


def _decode_bool(i: int, node: list) -> bool:
    if len(node) != 2 or type(node[1]) is not bool:
        raise _bad(f"node {i}: bool expected")
    return node[1]


def _decode_npscalar(i: int, node: list) -> Any:
    dtype = _numpy_dtype(node[1]["dtype"])
    raw = bytes.fromhex(node[1]["data"])
    if len(raw) != dtype.itemsize:
        raise _bad(f"node {i}: numpy scalar of {len(raw)} bytes for {dtype}")
    return np.frombuffer(raw, dtype=dtype)[0]


def _decode_size(i: int, node: list) -> torch.Size:
    # torch.Size holds any int64, negative ones too (torch.Size([-1, 3]) is a valid value)
    if type(node[1]) is not list or not all(type(d) is int and -2 ** 63 <= d < 2 ** 63 for d in node[1]):
        raise _bad(f"node {i}: a size is a list of 64-bit integers")
    return torch.Size(node[1])


def _decode_device(i: int, node: list) -> torch.device:
    if type(node[1]) is not str or len(node[1]) > 64:
        raise _bad(f"node {i}: a device is a short string")
    return torch.device(node[1])


_SCALARS: dict[str, Callable[[int, list], Any]] = {
    "none": lambda i, node: None,
    "bool": _decode_bool,
    "int": _decode_int,
    "float": _decode_float,
    "str": _decode_str,
    "npscalar": _decode_npscalar,
    "size": _decode_size,
    "dtype": lambda i, node: dtype_from_name(node[1]),
    "device": _decode_device,
}


def _numpy_dtype(s: Any) -> np.dtype:
    if type(s) is not str or len(s) > 32:
        raise _bad("numpy dtype must be a short string")
    dtype = np.dtype(s)
    if not plain_numpy_dtype(dtype):
        # An object dtype read from raw bytes would be raw pointers.
        raise _bad(f"numpy dtype {s!r} is not allowed")
    return dtype


def _whole(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v < 2 ** 62:
        raise _bad(f"tensor {what} {v!r:.40} is not a whole number")
    return v


def _decode_tensor(info: TensorNode, blob_value) -> torch.Tensor:
    dtype = dtype_from_name(info.dtype)
    shape = [_whole(d, "size") for d in info.shape]
    stride = [_whole(d, "stride") for d in info.stride]
    offset = _whole(info.offset, "offset")
    if len(shape) != len(stride):
        raise _bad("tensor shape and stride differ in length")
    if info.blob is None:
        t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    else:
        storage = blob_value(info.blob, STORAGE)
        if all(shape):
            last = offset
            for d, st in zip(shape, stride):
                last += (d - 1) * st
            if (last + 1) * dtype.itemsize > storage.nbytes():
                raise _bad("tensor reaches past the end of its storage")
        t = torch.empty(0, dtype=dtype, device=storage.device)
        t.set_(storage, offset, shape, stride)
    if info.parameter:
        return torch.nn.Parameter(t, requires_grad=info.requires_grad)
    if info.requires_grad:
        t.requires_grad_(True)
    return t


# ---------------------------------------------------------------- decoding a few nodes of a large table

SHARDED = "sharded"   # a tensor saved as shards by the ranks that held them (format version 4)
RANKS = "ranks"       # a value saved by each rank, one child per rank (format version 4)
ALL_RANKS = "all"     # decode a ranks node as the list of every rank's value (verify)


def sharded_info(i: int, node: list) -> tuple[torch.dtype, list[int], list[tuple[tuple, Any]], dict]:
    """A sharded node's dtype, global shape, [(offsets, child)] and extra, checked for form."""
    if len(node) not in (4, 5) or type(node[2]) is not list or type(node[3]) is not list:
        raise _bad(f"node {i}: malformed sharded node")
    dtype = dtype_from_name(node[1])
    shape = [_whole(d, "size") for d in node[2]]
    extra = node[4] if len(node) == 5 else {}
    if type(extra) is not dict:
        raise _bad(f"node {i}: malformed sharded node")
    entries = []
    for e in node[3]:
        if type(e) is not list or len(e) != 2 or type(e[0]) is not list or len(e[0]) != len(shape):
            raise _bad(f"node {i}: malformed shard entry")
        entries.append((tuple(_whole(o, "offset") for o in e[0]), e[1]))
    return dtype, shape, entries, extra


def _decode_sharded(i: int, node: list, table: _Table) -> torch.Tensor:
    """The global tensor, assembled from its shards; they must tile it exactly."""
    dtype, shape, entries, extra = sharded_info(i, node)
    parts = []
    covered = 0
    for offsets, c in entries:
        t = table.child(i, c)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != len(shape):
            raise _bad(f"node {i}: shard node {c} is not a {dtype} tensor of {len(shape)} dimensions")
        if any(o + n > d for o, n, d in zip(offsets, t.shape, shape)):
            raise _bad(f"node {i}: shard node {c} lies outside the tensor")
        for o2, t2 in parts:
            if shards.overlap(offsets, t.shape, o2, t2.shape) is not None:
                raise _bad(f"node {i}: two shards overlap")
        parts.append((offsets, t))
        covered += t.numel()
    if covered != math.prod(shape):
        raise _bad(f"node {i}: the shards cover {covered} of the tensor's {math.prod(shape)} elements")
    device = parts[0][1].device if parts else torch.device("cpu")
    out = torch.empty(shape, dtype=dtype, device=device)
    with torch.no_grad():
        for offsets, t in parts:
            shards.box(out, (0,) * len(shape), offsets, t.shape).copy_(t)
    if extra.get("param") is True:
        return torch.nn.Parameter(out, requires_grad=extra.get("grad") is True)
    if extra.get("grad") is True:
        out.requires_grad_(True)
    return out


def _decode_ranks(i: int, node: list, table: _Table) -> Any:
    kids = node[1] if len(node) == 2 else None
    if type(kids) is not list or len(kids) < 2:
        raise _bad(f"node {i}: malformed ranks node")
    if table.ranks == ALL_RANKS:
        return [table.child(i, c) for c in kids]
    if table.ranks is not None and table.ranks[1] == len(kids):
        return table.child(i, kids[table.ranks[0]])
    raise per_rank_error(len(kids), table.ranks, None)


def per_rank_error(world: int, ranks: Any, where: str | None) -> ArgumentError:
    """A value saved per rank, asked for by a reader that is not one of those ranks."""
    at = f"{where}: " if where else ""
    who = "a single process" if ranks is None or ranks[1] == 1 else f"a job of {ranks[1]} ranks"
    return ArgumentError(
        f"{at}this value was saved by each of {world} ranks separately (it differed between them), and "
        f"{who} cannot tell which rank's to take; leave it out with select= (e.g. select='model'), or "
        f"restore on {world} ranks")


class _Sparse(dict):
    """Values (or parent marks) of the nodes decoded so far; a node not there reads as None."""

    def __missing__(self, key: int) -> None:
        return None


class _PartTable(_Table):
    """``_Table`` for a decode of a few nodes: sized by what it decodes, not by the table."""

    def __init__(self, nodes: list, blob_value: Callable[[int], Any]):
        self.nodes, self.blob_value = nodes, blob_value
        self.values = _Sparse()
        self.claimed = _Sparse()
        self.partial = {}
        self.ranks = None


def decode_part(nodes: list, blob_value: Callable[[int], Any], needed: set, root: int, version: int = 2) -> Any:
    """``decode(nodes, blob_value, version=version, needed=needed, root=root)``, pickles refused,
    in time and memory proportional to ``len(needed)`` instead of ``len(nodes)``: what
    ``paths.Tree`` uses to read a dict key held as a node, once per key."""
    if not isinstance(nodes, list) or not nodes:
        raise _bad("empty node table")
    order = sorted(needed, reverse=True)
    refuse_pickle([nodes[i] for i in order])
    table = _PartTable(nodes, blob_value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 warns that it is experimental
        _decode_all(nodes, table, version, order, {})
    return table.values[root]
