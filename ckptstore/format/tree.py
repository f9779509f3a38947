"""State tree <-> node table.

A checkpoint's structure is a flat table of JSON nodes; node 0 is the root and
every container names its children by index. Children always come after
their parent, so decoding walks the table backwards and never recurses: a
state nested ten thousand levels deep costs no more stack than a flat one.

Bulk data (tensor storages, numpy arrays, bytes, pickles) is not in the table:
a node points at a *blob*, and blobs are written to data files by the writer.
Tensors that share a storage point at the same blob, which is how tied
weights, views and transposes come back sharing memory.

Nothing here unpickles unless the caller allowed it, and nothing here does
I/O. The node kinds are specified in docs/format.md.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedObjectError

# Blob kinds: how a blob's bytes become a Python value again.
STORAGE = "storage"   # torch UntypedStorage, shared by the tensors that view it
NDARRAY = "ndarray"   # one C-contiguous numpy array
BYTES = "bytes"       # a bytes value
PICKLE = "pickle"     # pickled value, only with allow_pickle=True

_DTYPES: dict[str, torch.dtype] = {}
for _name in dir(torch):
    _obj = getattr(torch, _name)
    if isinstance(_obj, torch.dtype):
        _DTYPES[str(_obj).removeprefix("torch.")] = _obj
# Quantized dtypes have no plain byte representation a reader could rebuild.
_UNSAFE_TENSOR_DTYPES = {d for d in _DTYPES.values() if d.is_quantized} if hasattr(torch.dtype, "is_quantized") else set()
_UNSAFE_TENSOR_DTYPES |= {_DTYPES[n] for n in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if n in _DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise CorruptCheckpointError(f"unknown torch dtype {name!r} in the checkpoint; it may need a newer torch")
    return _DTYPES[name]


@dataclass
class Blob:
    """A run of bytes to store, and where it comes from."""

    kind: str
    nbytes: int
    source: Any          # UntypedStorage | np.ndarray | bytes
    device: str = "cpu"  # where a storage lives (cuda storages are staged through host memory)


# ---------------------------------------------------------------- encoding

def _typename(obj: Any) -> str:
    t = type(obj)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def _render_path(path: tuple) -> str:
    parts = []
    while path:
        path, piece = path
        parts.append(piece)
    return "state" + "".join(reversed(parts))


_EXIT = object()


def _key_repr(key: Any) -> str:
    if type(key) is str:
        return '["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return f"[{key!r}]"


class Encoder:
    """Turns a state tree into (nodes, blobs). One use per save."""

    def __init__(self, allow_pickle: bool = False, devices: dict | None = None):
        self.allow_pickle = allow_pickle
        # data_ptr -> device string, for storages that are host copies of
        # device memory (an async save's snapshot): record where they came from
        self.devices = devices or {}
        self.nodes: list = []
        self.blobs: list[Blob] = []
        self._storages: dict = {}    # storage identity -> blob index

    def encode(self, root: Any) -> tuple[list, list[Blob]]:
        nodes = self.nodes
        # Stack entries: (obj, path, parent node, slot in parent's child list);
        # (_EXIT, id) closes a container for the cycle check.
        stack: list = [(root, (), None, 0)]
        open_containers: set[int] = set()
        while stack:
            item = stack.pop()
            if item[0] is _EXIT:
                open_containers.discard(item[1])
                continue
            obj, path, parent, slot = item
            index = len(nodes)
            if parent is not None:
                nodes[parent][1][slot] = index
            children = self._node(obj, path)
            if children is None:
                continue
            if id(obj) in open_containers:
                raise UnsupportedObjectError(
                    f"{_render_path(path)}: {_typename(obj)} contains itself; "
                    "a checkpoint must be a tree, not a cycle")
            open_containers.add(id(obj))
            stack.append((_EXIT, id(obj)))
            for slot_i in range(len(children) - 1, -1, -1):
                child, piece = children[slot_i]
                stack.append((child, (path, piece), index, slot_i))
        return nodes, self.blobs

    def _node(self, obj: Any, path: tuple):
        """Append obj's node; return [(child, path piece)] for containers, else None."""
        t = type(obj)
        nodes = self.nodes
        if obj is None:
            nodes.append(["none"])
        elif t is bool:
            nodes.append(["bool", obj])
        elif t is int:
            nodes.append(["int", str(obj)])
        elif t is float:
            nodes.append(["float", obj if math.isfinite(obj) else repr(obj)])
        elif t is str:
            nodes.append(["str", obj])
        elif t is bytes:
            nodes.append(["bytes", self._add_blob(Blob(BYTES, len(obj), obj))])
        elif t is torch.Tensor or t is torch.nn.Parameter:
            nodes.append(["tensor", self._tensor(obj, path)])
        elif t is np.ndarray:
            nodes.append(["ndarray", self._ndarray(obj, path)])
        elif isinstance(obj, np.generic) and self._plain_numpy_dtype(obj.dtype):
            nodes.append(["npscalar", {"dtype": obj.dtype.str, "data": obj.tobytes().hex()}])
        elif t is torch.Size:
            nodes.append(["size", [int(d) for d in obj]])
        elif t is torch.dtype:
            nodes.append(["dtype", dtype_name(obj)])
        elif t is torch.device:
            nodes.append(["device", str(obj)])
        elif t is dict or t is collections.OrderedDict:
            items = list(obj.items())
            children = []
            for k, v in items:
                children.append((k, f"<key {k!r}>"))
                children.append((v, _key_repr(k)))
            node = ["dict" if t is dict else "odict", [None] * len(children)]
            meta = getattr(obj, "_metadata", None) if t is collections.OrderedDict else None
            if meta is not None:
                # nn.Module.state_dict() keeps per-module versions here, and
                # load_state_dict() needs them to migrate old layouts.
                children.append((meta, "._metadata"))
                node[1].append(None)
                node.append(True)
            nodes.append(node)
            return children
        elif t is list or t is tuple:
            nodes.append(["list" if t is list else "tuple", [None] * len(obj)])
            return [(v, f"[{i}]") for i, v in enumerate(obj)]
        elif self.allow_pickle:
            nodes.append(["pickle", self._pickle(obj, path)])
        else:
            raise UnsupportedObjectError(
                f"{_render_path(path)}: {_typename(obj)} is not supported by the safe format "
                "(tensors, numpy arrays, numbers, str, bytes, None, torch.Size/dtype/device and "
                "dict/OrderedDict/list/tuple of them); convert it, or pass allow_pickle=True "
                "to store it pickled")
        return None

    def _add_blob(self, blob: Blob) -> int:
        self.blobs.append(blob)
        return len(self.blobs) - 1

    @staticmethod
    def _plain_numpy_dtype(dtype: np.dtype) -> bool:
        return not dtype.hasobject and dtype.fields is None and dtype.subdtype is None

    def _tensor(self, t: torch.Tensor, path: tuple) -> dict:
        if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False) \
                or t.dtype in _UNSAFE_TENSOR_DTYPES:
            raise UnsupportedObjectError(
                f"{_render_path(path)}: a {t.layout} {dtype_name(t.dtype)} tensor is not supported by "
                "the safe format (dense strided tensors are); convert it (e.g. .to_dense()) "
                "or pass allow_pickle=True")
        info = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": int(t.storage_offset()),
            "requires_grad": bool(t.requires_grad),
            "parameter": type(t) is torch.nn.Parameter,
            "device": str(t.device),
            "storage": None,
        }
        if self.devices and t.device.type == "cpu":
            info["device"] = self.devices.get(t.untyped_storage().data_ptr(), info["device"])
        data = t.detach()
        if data.is_conj() or data.is_neg():
            # The lazy bits live outside the storage; materialise the values.
            data = data.resolve_conj().resolve_neg()
            info["stride"], info["offset"] = list(data.stride()), int(data.storage_offset())
        if data.device.type == "meta":
            return info
        storage = data.untyped_storage()
        ptr = storage.data_ptr()
        key = (str(storage.device), ptr, storage.nbytes()) if ptr else ("empty", id(storage))
        index = self._storages.get(key)
        if index is None:
            device = self.devices.get(ptr, str(storage.device)) if ptr else str(storage.device)
            index = self._add_blob(Blob(STORAGE, storage.nbytes(), storage, device))
            self._storages[key] = index
        info["storage"] = index
        return info

    def _ndarray(self, a: np.ndarray, path: tuple) -> dict:
        if not self._plain_numpy_dtype(a.dtype):
            raise UnsupportedObjectError(
                f"{_render_path(path)}: numpy array of dtype {a.dtype} is not supported by the safe "
                "format (object and structured dtypes are not); pass allow_pickle=True to store it pickled")
        blob = self._add_blob(Blob(NDARRAY, int(a.nbytes), a))
        return {"dtype": a.dtype.str, "shape": list(a.shape), "blob": blob}

    def _pickle(self, obj: Any, path: tuple) -> int:
        import pickle
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise UnsupportedObjectError(
                f"{_render_path(path)}: {_typename(obj)} cannot be pickled: {e}") from e
        return self._add_blob(Blob(PICKLE, len(data), data))


def encode(state: Any, allow_pickle: bool = False, devices: dict | None = None) -> tuple[list, list[Blob]]:
    """Encode ``state``; raises UnsupportedObjectError before any I/O happens."""
    return Encoder(allow_pickle, devices).encode(state)


# ---------------------------------------------------------------- decoding

def restore_location(storage: torch.UntypedStorage, location: str, map_location) -> torch.UntypedStorage:
    """Where torch.load would put a storage saved on ``location``."""
    if callable(map_location):
        result = map_location(storage, location)
        if result is not None:
            return getattr(result, "_untyped_storage", result)
        target = location
    elif map_location is None:
        target = location
    elif isinstance(map_location, dict):
        target = map_location.get(location, location)
    else:
        target = str(map_location)
    device = torch.device(target)
    if device.type == "cpu":
        return storage
    if device.type == "meta":
        return torch.UntypedStorage(storage.nbytes(), device="meta")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"the checkpoint holds tensors saved on {location}, but CUDA is not available here; "
            "pass map_location='cpu' to load them into host memory")
    return storage.to(device=device)


def uses_pickle(nodes: list) -> bool:
    return any(isinstance(n, list) and n and n[0] == "pickle" for n in nodes)


def refuse_pickle(nodes: list) -> None:
    """UnsafeCheckpointError if the structure holds pickled values."""
    if uses_pickle(nodes):
        raise UnsafeCheckpointError(
            "the checkpoint holds pickled objects, and unpickling can run arbitrary code; "
            "load it with allow_pickle=True only if you trust where it came from")


def _bad(msg: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"malformed checkpoint structure: {msg}")


def decode(nodes: list, blob_value: Callable[[int], Any], allow_pickle: bool = False) -> Any:
    """Rebuild the state from ``nodes``.

    ``blob_value(i)`` returns blob i as loaded: an UntypedStorage (already on
    its final device) for storage blobs, a numpy array for ndarray blobs,
    ``bytes`` for bytes and pickle blobs.
    """
    if not isinstance(nodes, list) or not nodes:
        raise _bad("empty node table")
    if not allow_pickle:
        refuse_pickle(nodes)
    n = len(nodes)
    values: list = [None] * n

    def child(i: int, c: Any) -> Any:
        if type(c) is not int or not (i < c < n):
            raise _bad(f"node {i} refers to node {c!r}")
        return values[c]

    for i in range(n - 1, -1, -1):
        node = nodes[i]
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise _bad(f"node {i} is not a tagged list")
        tag = node[0]
        try:
            values[i] = _decode_node(i, tag, node, child, blob_value)
        except (CorruptCheckpointError, UnsafeCheckpointError):
            raise
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError, OverflowError) as e:
            raise _bad(f"node {i} ({tag}): {e}") from e
    return values[0]


def _decode_node(i: int, tag: str, node: list, child, blob_value) -> Any:
    if tag == "none":
        return None
    if tag == "bool":
        if type(node[1]) is not bool:
            raise _bad(f"node {i}: bool expected")
        return node[1]
    if tag == "int":
        if not isinstance(node[1], str):
            raise _bad(f"node {i}: int must be a decimal string")
        return int(node[1])
    if tag == "float":
        v = node[1]
        if isinstance(v, str):
            if v not in ("nan", "inf", "-inf"):
                raise _bad(f"node {i}: bad float {v!r}")
            return float(v)
        if type(v) not in (int, float):
            raise _bad(f"node {i}: bad float")
        return float(v)
    if tag == "str":
        if not isinstance(node[1], str):
            raise _bad(f"node {i}: str expected")
        return node[1]
    if tag == "bytes":
        return bytes(blob_value(node[1]))
    if tag == "tensor":
        return _decode_tensor(node[1], blob_value)
    if tag == "ndarray":
        info = node[1]
        arr = blob_value(info["blob"])
        dtype = _numpy_dtype(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        return arr.view(dtype).reshape(shape)
    if tag == "npscalar":
        dtype = _numpy_dtype(node[1]["dtype"])
        raw = bytes.fromhex(node[1]["data"])
        if len(raw) != dtype.itemsize:
            raise _bad(f"node {i}: numpy scalar of {len(raw)} bytes for {dtype}")
        return np.frombuffer(raw, dtype=dtype)[0]
    if tag == "size":
        return torch.Size([int(d) for d in node[1]])
    if tag == "dtype":
        return dtype_from_name(node[1])
    if tag == "device":
        return torch.device(node[1])
    if tag in ("dict", "odict"):
        kids = node[1]
        has_meta = len(node) > 2 and node[2] is True
        pairs = kids[:-1] if has_meta else kids
        if len(pairs) % 2:
            raise _bad(f"node {i}: odd number of dict children")
        out = {} if tag == "dict" else collections.OrderedDict()
        for j in range(0, len(pairs), 2):
            out[child(i, pairs[j])] = child(i, pairs[j + 1])
        if has_meta:
            out._metadata = child(i, kids[-1])
        return out
    if tag == "list":
        return [child(i, c) for c in node[1]]
    if tag == "tuple":
        return tuple(child(i, c) for c in node[1])
    if tag == "pickle":
        import pickle
        return pickle.loads(blob_value(node[1]))
    raise _bad(f"node {i} has unknown kind {tag!r}; it may need a newer ckptstore")


def _numpy_dtype(s: Any) -> np.dtype:
    if not isinstance(s, str):
        raise _bad("numpy dtype must be a string")
    dtype = np.dtype(s)
    if not Encoder._plain_numpy_dtype(dtype):
        # An object dtype read from raw bytes would be raw pointers.
        raise _bad(f"numpy dtype {s!r} is not allowed")
    return dtype


def _decode_tensor(info: dict, blob_value) -> torch.Tensor:
    dtype = dtype_from_name(info["dtype"])
    shape = [int(d) for d in info["shape"]]
    stride = [int(d) for d in info["stride"]]
    offset = int(info["offset"])
    if len(shape) != len(stride) or any(d < 0 for d in shape) or offset < 0:
        raise _bad("tensor shape, stride or offset is invalid")
    if info["storage"] is None:
        t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    else:
        storage = blob_value(info["storage"])
        itemsize = dtype.itemsize
        if any(s < 0 for s in stride):
            raise _bad("negative tensor stride")
        if all(shape):
            last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
            if (last + 1) * itemsize > storage.nbytes():
                raise _bad("tensor reaches past the end of its storage")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex32 warns that it is experimental
            t = torch.empty(0, dtype=dtype, device=storage.device)
        t.set_(storage, offset, shape, stride)
    if info.get("parameter"):
        return torch.nn.Parameter(t, requires_grad=bool(info.get("requires_grad")))
    if info.get("requires_grad"):
        t.requires_grad_(True)
    return t
