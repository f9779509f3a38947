"""Single-file checkpoints other tools wrote: torch.save files and safetensors.

A ``torch.save`` file is a pickle; it is loaded with torch's weights-only
unpickler, which refuses any global outside a small allow-list, so a
malicious ``__reduce__`` raises instead of running. Only ``allow_pickle=True``
lifts that. A safetensors file has no code in it at all and is read here
directly (8-byte header length, JSON header, raw bytes), so reading one from
a bucket needs neither the whole file in memory nor a local copy.
"""

from __future__ import annotations

import errno
import io
import json
import pickle
import pickletools
import struct
import zipfile
from typing import Any

import torch

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
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
            # torch raises this both for a pickle it refuses and for bytes that are no pickle at
            # all: only a well-formed one is worth the advice to unpickle it.
            problem = "" if allow_pickle else malformed_torch_file(store)
            if allow_pickle or problem:
                raise _corrupt(store, problem or str(e)) from None
            raise UnsafeCheckpointError(
                f"{store.uri}: the torch.save file holds objects outside the weights-only allow-list, "
                "and unpickling them could run arbitrary code; pass allow_pickle=True only if you "
                f"trust where it came from. Refused: {str(e).splitlines()[-1] if str(e) else 'pickle'}",
                store.uri) from None
        except CheckpointError:
            raise           # reading the file failed: the store names it
        except OSError:
            # torch's zip reader seeks before the start of a mangled archive (EINVAL);
            # a real read failure fails the check as well and passes through.
            problem = malformed_torch_file(store)
            if problem:
                raise _corrupt(store, problem) from None
            raise
        except Exception as e:  # noqa: BLE001 - see below
            # The weights-only unpickler runs no code, so whatever else it raises
            # on a malformed stream (an IndexError from an empty stack, an
            # AssertionError on a persistent id, ...) is corruption.
            raise _corrupt(store, f"{type(e).__name__}: {e}") from None


def _corrupt(store: Store, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{store.uri}: not a readable torch.save file ({why}); it is damaged "
                                  "or was never one", store.uri)


def malformed_torch_file(store: Store) -> str:
    """Why the file is not a well-formed torch.save file or pickle; "" if it is one.

    Its pickles are parsed with ``pickletools``, which reads opcodes and runs
    nothing: a zip archive's ``data.pkl``, or a pickle at the start of the file
    (a legacy torch.save file's magic number, protocol and header first).
    """
    size = store.file_size()
    with store.open_file() as f:
        if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            f.seek(0)
            try:
                with zipfile.ZipFile(f) as z:
                    names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                    if not names:
                        return "a zip archive without data.pkl"
                    if z.getinfo(names[0]).file_size > size:    # torch stores members uncompressed
                        return "data.pkl claims more bytes than the archive holds"
                    data = z.read(names[0])
            except OSError as e:
                if e.errno != errno.EINVAL:     # a seek before the start: a mangled archive
                    raise
                return "not a readable zip archive"
            except Exception as e:  # noqa: BLE001 - BadZipFile, zlib.error, struct.error, ...
                return f"not a readable zip archive: {type(e).__name__}: {e}"[:200]
            return _pickle_problem(_Bounded(io.BytesIO(data), len(data)), 1)
        f.seek(0)
        return _pickle_problem(_Bounded(f, size), 4)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_LINE = 1 << 20


def _pickle_problem(f, count: int) -> str:
    """Parse up to ``count`` consecutive pickles (more than one only after a legacy magic number)."""
    if f.read(1) != b"\x80":     # torch.save and pickle.dumps both write protocol 2 or later
        return "no pickle protocol header"
    f.seek(0)
    for i in range(count):
        magic = False
        try:
            for op, arg, _ in pickletools.genops(f):
                magic = magic or (op.name == "LONG1" and arg == _LEGACY_MAGIC)
        except OSError:
            raise               # reading failed, not parsing
        except Exception as e:  # noqa: BLE001 - every way a parse of garbage fails
            return f"not a pickle: {type(e).__name__}: {e}"[:200]
        if i == 0 and not magic:
            return ""           # a bare pickle: there is no more to it
    return ""


class _Bounded:
    """A file whose reads never ask for more than it holds (a garbled length must not allocate GiBs)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        # Text opcodes (GLOBAL's module and name) are short lines: a longer one is garbage.
        start, line = self.f.tell(), b""
        while b"\n" not in line and len(line) < _MAX_LINE:
            chunk = self.read(4096)
            if not chunk:
                break
            line += chunk
        end = line.find(b"\n")
        line = line[:end + 1] if end >= 0 else line
        self.f.seek(start + len(line))
        return line

    def seek(self, pos: int) -> int:
        return self.f.seek(pos)

    def tell(self) -> int:
        return self.f.tell()


def _whole(v) -> bool:
    return type(v) is int


def load_safetensors(store: Store, map_location=None) -> dict:
    """Read a safetensors file, checking its header as the format's own reader does.

    Every entry must name a known dtype, a shape of whole numbers and two
    offsets that match it; together the entries must tile the data section
    exactly (no gap, overlap or byte past the end). All of that is checked
    before a byte of tensor memory is allocated, so a lying header costs
    nothing but the header's own size (at most 100 MiB, as in the format).
    """
    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{store.uri}: not a valid safetensors file: {msg}", store.uri)

    size = store.file_size()
    with store.file_reader() as r:
        size_buf = bytearray(8)
        if r.readinto(0, memoryview(size_buf)) != 8:
            raise bad("shorter than its header")
        (hlen,) = struct.unpack("<Q", size_buf)
        if hlen > _MAX_SAFETENSORS_HEADER or hlen > size - 8:
            raise bad(f"a header of {hlen} bytes in a file of {size}")
        header_buf = bytearray(hlen)
        if r.readinto(8, memoryview(header_buf)) != hlen:
            raise bad("truncated header")
        try:
            header = json.loads(header_buf)
        except RecursionError:
            raise bad("header is nested too deeply") from None
        except ValueError as e:
            raise bad(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and
                                     all(isinstance(v, str) for v in meta.values())):
            raise bad("__metadata__ is not an object of strings")
        base = 8 + hlen
        entries = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise bad(f"tensor {name!r}: malformed entry")
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
            if dtype is None:
                raise bad(f"tensor {name!r}: unsupported or missing dtype {info.get('dtype')!r:.40}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(_whole(d) and 0 <= d < 2 ** 62 for d in shape):
                raise bad(f"tensor {name!r}: shape is not a list of whole numbers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(x) for x in offsets)):
                raise bad(f"tensor {name!r}: data_offsets is not two whole numbers")
            begin, end = offsets
            numel = 1
            for d in shape:
                numel *= d
            if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
                raise bad(f"tensor {name!r}: offsets do not match its shape and dtype")
            entries.append((begin, end, name, dtype, shape))
        entries.sort(key=lambda e: (e[0], e[1]))
        at = 0
        for begin, end, name, _, _ in entries:
            if begin != at:
                raise bad(f"tensor {name!r}: data starts at {begin}, not at {at} where the previous ends")
            at = end
        if at != size - base:
            raise bad(f"tensors cover {at} bytes of a data section of {size - base}")
        out = {}
        for begin, end, name, dtype, shape in entries:
            nbytes = end - begin
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
            out[name] = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, shape)
        # Keep the order the writer listed the tensors in.
        return {k: out[k] for k in header}
