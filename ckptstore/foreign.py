"""Single-file checkpoints other tools wrote: torch.save files and safetensors.

A ``torch.save`` file is a pickle; it is loaded with torch's weights-only
unpickler, which refuses any global outside a small allow-list, so a
malicious ``__reduce__`` raises instead of running. Only ``allow_pickle=True``
lifts that. A safetensors file has no code in it at all and is read here
directly (8-byte header length, JSON header, raw bytes), so reading one from
a bucket needs neither the whole file in memory nor a local copy.
"""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .stores.base import CHUNK, Store
from .format.tree import restore_location

ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100 << 20

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


def sniff(head: bytes, name: str) -> str | None:
    """'torch', 'safetensors' or None, from the first bytes and the name."""
    if head.startswith(ZIP_MAGIC):
        return "torch"
    if name.endswith(".safetensors"):
        return "safetensors"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" or name.rsplit(".", 1)[-1] in ("pt", "pth", "bin", "ckpt", "pkl", "tar"):
        return "torch"  # legacy (pre-zip) torch.save files start with a pickle
    return None


def load_file(store: Store, map_location=None, allow_pickle: bool = False) -> Any:
    with store.file_reader() as r:
        head = bytearray(16)
        n = r.readinto(0, memoryview(head))
    kind = sniff(bytes(head[:n]), store.location.path)
    if kind == "safetensors":
        return load_safetensors(store, map_location)
    if kind == "torch":
        return load_torch(store, map_location, allow_pickle)
    raise CorruptCheckpointError(
        f"{store.uri} is a file, but neither a ckptstore checkpoint, a torch.save file nor a "
        "safetensors file", store.uri)


def load_torch(store: Store, map_location=None, allow_pickle: bool = False) -> Any:
    with store.open_file() as f:
        try:
            return torch.load(f, map_location=map_location, weights_only=not allow_pickle)
        except pickle.UnpicklingError as e:
            if allow_pickle:
                raise CorruptCheckpointError(f"{store.uri}: not a loadable torch.save file: {e}", store.uri) from None
            raise UnsafeCheckpointError(
                f"{store.uri}: the torch.save file holds objects outside the weights-only allow-list, "
                "and unpickling them could run arbitrary code; pass allow_pickle=True only if you "
                f"trust where it came from. Refused: {str(e).splitlines()[-1] if str(e) else 'pickle'}",
                store.uri) from None
        except (RuntimeError, EOFError, ValueError, KeyError, struct.error) as e:
            raise CorruptCheckpointError(f"{store.uri}: not a loadable torch.save file: {e}", store.uri) from None


def load_safetensors(store: Store, map_location=None) -> dict:
    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{store.uri}: not a valid safetensors file: {msg}", store.uri)

    with store.file_reader() as r:
        size_buf = bytearray(8)
        if r.readinto(0, memoryview(size_buf)) != 8:
            raise bad("shorter than its header")
        (hlen,) = struct.unpack("<Q", size_buf)
        if hlen > _MAX_SAFETENSORS_HEADER:
            raise bad(f"header of {hlen} bytes")
        header_buf = bytearray(hlen)
        if r.readinto(8, memoryview(header_buf)) != hlen:
            raise bad("truncated header")
        try:
            header = json.loads(header_buf)
        except ValueError as e:
            raise bad(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        header.pop("__metadata__", None)
        base = 8 + hlen
        entries = []
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as e:
                raise bad(f"tensor {name!r}: unsupported or missing {e}") from None
            except (TypeError, ValueError):
                raise bad(f"tensor {name!r}: malformed entry") from None
            numel = 1
            for d in shape:
                numel *= d
            if any(d < 0 for d in shape) or begin < 0 or end - begin != numel * dtype.itemsize:
                raise bad(f"tensor {name!r}: offsets do not match its shape and dtype")
            entries.append((begin, name, dtype, shape, end - begin))
        out = {}
        for begin, name, dtype, shape, nbytes in sorted(entries):
            storage = torch.UntypedStorage(nbytes)
            if nbytes:
                view = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
                done = 0
                while done < nbytes:
                    got = r.readinto(base + begin + done, view[done:done + CHUNK])
                    if got <= 0:
                        raise bad(f"tensor {name!r} runs past the end of the file")
                    done += got
            storage = restore_location(storage, "cpu", map_location)
            t = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, shape)
            out[name] = t
        # Keep the order the writer listed the tensors in.
        return {k: out[k] for k in header}
