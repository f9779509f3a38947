"""The commit record: the one file a reader trusts, and the names of a checkpoint's files.

A checkpoint directory holds data files and commit records. Each save is a
*generation*; its files carry the generation id in their names:

    <gen>.commit          commit record (header line + JSON manifest)
    <gen>-<n>.bin         data file n of that generation
    <gen>.commit.tmp      a commit record not yet renamed into place

A reader takes the newest generation whose commit record is intact. Files
of any other generation are leftovers (an interrupted or superseded save)
and are never read. The record lists every data file with its size and
CRC-32C, and its own bytes are covered by the CRC in its header line, so a
torn, truncated or bit-flipped record is never taken as a commit.

Everything about the record's bytes lives here: ``FileEntry`` and
``BlobTable`` are the typed entries the rest of the package reads, and no
other module parses or builds the JSON. Version 2 stores the blob table as
columns with implied offsets (about 15 bytes a blob instead of 90); version 1
records, written by ckptstore 0.1, are still read.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import crc32c
import numpy as np

from ..errors import CorruptCheckpointError, FormatTooNewError
from .frames import CODEC, FRAME, MAX_FRAME, MIN_FRAME, Frames, check_frames

MAGIC = b"CKPTSTORE"
FORMAT_MAJOR = 2          # what this ckptstore writes
FORMAT_MINOR = 0
INCREMENTAL_MAJOR = 3     # what an incremental step is written as (data in the run's shared directory)
DISTRIBUTED_MAJOR = 4     # what a step saved by several ranks of a torch.distributed job is written as
COMPRESSED_MAJOR = 5      # what a step with compressed blobs is written as (any of the above layouts)
READABLE_MAJORS = (1, 2, 3, 4, 5)  # what it reads
SHARED_DIR = ".shared"    # an incremental run's data files: <run>/.shared/<gen>-<n>.bin
COMMIT_SUFFIX = ".commit"
TMP_SUFFIX = ".tmp"
DATA_SUFFIX = ".bin"
CLAIM_NAME = "create.claim"  # taken by a save that must not replace a checkpoint (overwrite=False)
ALIGN = 64  # blob offsets in the data stream are multiples of this
_MAX_CREATED = 1e11  # seconds since the epoch (the year 5138): a later commit time is a lie

# Generation ids sort in commit order: 16 hex digits of nanoseconds since
# the epoch (bumped past any generation already present), then random bits
# so two writers never pick the same name.
_GEN = r"[0-9a-f]{16}-[0-9a-f]{8}"
_NAME = re.compile(rf"^(?P<gen>{_GEN})(?:(?P<commit>\.commit)(?P<tmp>\.tmp)?|-(?P<k>\d{{5,}})\.bin)$")


def new_generation(existing: list[str] = (), now: int | None = None) -> str:
    """A generation id past every one in ``existing``, at the clock (or at ``now``, in ns)."""
    now = time.time_ns() if now is None else now
    newest = max((int(g[:16], 16) for g in existing), default=0)
    return f"{max(now, newest + 1):016x}-{os.urandom(4).hex()}"


def generation_time(gen: str) -> float:
    return int(gen[:16], 16) / 1e9


def commit_name(gen: str) -> str:
    return gen + COMMIT_SUFFIX


def data_name(gen: str, k: int) -> str:
    return f"{gen}-{k:05d}{DATA_SUFFIX}"


@dataclass(frozen=True)
class FileName:
    """What a name in a checkpoint directory is, if it is ours."""

    gen: str
    role: str  # "commit", "tmp" or "data"
    number: int = -1  # a data file's number

    @staticmethod
    def parse(name: str) -> "FileName | None":
        m = _NAME.match(name) if isinstance(name, str) else None
        if not m:
            return None
        if m.group("commit"):
            return FileName(m.group("gen"), "tmp" if m.group("tmp") else "commit")
        return FileName(m.group("gen"), "data", int(m.group("k")))

    @property
    def is_record(self) -> bool:
        """A commit record, committed or not: removed before any data file of its generation."""
        return self.role in ("commit", "tmp")


def generations(names) -> list[str]:
    """Every generation some file in ``names`` belongs to, oldest first."""
    return sorted({f.gen for f in map(FileName.parse, names) if f is not None})


def commit_generations(names) -> list[str]:
    """Generations that have a commit record (intact or not), newest first."""
    gens = []
    for name in names:
        f = FileName.parse(name)
        if f is not None and f.role == "commit":
            gens.append(f.gen)
    return sorted(gens, reverse=True)


def crc_hex(value: int) -> str:
    return f"{value:08x}"


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# ---------------------------------------------------------------- typed entries

@dataclass(frozen=True)
class FileEntry:
    """One data file of a generation: its name, size and the CRC-32C of all its bytes."""

    name: str
    nbytes: int
    crc32c: int
    dir: str | None = None    # None: the checkpoint's own directory; SHARED_DIR: the run's shared one


# Blob kinds: how a blob's bytes become a Python value again.
STORAGE = "storage"   # torch UntypedStorage, shared by the tensors that view it
NDARRAY = "ndarray"   # one C-contiguous numpy array
BYTES = "bytes"       # a bytes value
PICKLE = "pickle"     # pickled value, only with allow_pickle=True
KIND_CODES = {STORAGE: "s", NDARRAY: "n", BYTES: "b", PICKLE: "p"}
KINDS = {c: k for k, c in KIND_CODES.items()}


class BlobEntry(NamedTuple):
    """One blob: ``nbytes`` bytes at stream offset ``start``, with their own CRC-32C."""

    start: int
    nbytes: int
    crc32c: int
    kind: str
    device: str

    @property
    def end(self) -> int:
        return self.start + self.nbytes


def aligned_starts(sizes) -> np.ndarray:
    """Stream offsets of blobs of ``sizes`` laid out in order, each at the next multiple of ALIGN."""
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(-(-sizes[:-1] // ALIGN) * ALIGN, out=starts[1:])
    return starts


class BlobTable:
    """Every blob of a generation, as columns (a record may hold 10**5 of them).

    ``starts`` and ``sizes`` are int64 arrays of stream offsets and lengths,
    ``crcs`` uint32; ``kinds`` a str of one code letter per blob; ``device``
    an index per blob into ``devices``. ``blob[i]`` gives one ``BlobEntry``.
    """

    __slots__ = ("starts", "sizes", "crcs", "kinds", "devices", "device", "hashes", "codec", "frame")

    def __init__(self, starts, sizes, crcs, kinds: str, devices: list[str], device=None,
                 hashes: bytes | None = None, codec: dict[int, Frames] | None = None, frame: int = FRAME):
        self.starts = np.asarray(starts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.crcs = np.asarray(crcs, dtype=np.uint32)
        self.kinds = kinds
        self.devices = list(devices) or ["cpu"]
        self.device = None if device is None else np.asarray(device, dtype=np.int64)
        #: 16 bytes of xxh3-128 (big-endian) per blob, or None (versions 1 and 2)
        self.hashes = hashes
        #: {blob: Frames} of the blobs stored compressed (version 5); ``sizes`` are their stored sizes
        self.codec = codec or None
        self.frame = frame

    def frames_of(self, i: int) -> Frames | None:
        """How blob ``i`` is compressed, or None when its stored bytes are its bytes."""
        return None if self.codec is None else self.codec.get(i)

    def logical_size(self, i: int) -> int:
        f = self.frames_of(i)
        return int(self.sizes[i]) if f is None else f.logical

    @property
    def logical_sizes(self) -> np.ndarray:
        """Each blob's size once decompressed (its stored size when it is not compressed)."""
        if not self.codec:
            return self.sizes
        out = self.sizes.copy()
        for i, f in self.codec.items():
            out[i] = f.logical
        return out

    def subset(self, indices) -> "BlobTable":
        """The blobs ``indices``, in that order, with every column (starts as they were)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        at = idx.tolist()
        hashes = None if self.hashes is None else b"".join(self.hashes[16 * i:16 * i + 16] for i in at)
        device = None if self.device is None else self.device[idx]
        codec = {j: self.codec[i] for j, i in enumerate(at) if i in self.codec} if self.codec else None
        return BlobTable(self.starts[idx], self.sizes[idx], self.crcs[idx], "".join(self.kinds[i] for i in at),
                         self.devices, device, hashes, codec, self.frame)

    def hash_of(self, i: int) -> bytes | None:
        return None if self.hashes is None else self.hashes[16 * i:16 * i + 16]

    @staticmethod
    def sequential(sizes, crcs, kinds: str, devices: list[str], device=None) -> "BlobTable":
        """Blobs laid out one after the other, each at the next multiple of ALIGN (the writer's layout)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        return BlobTable(aligned_starts(sizes), sizes, crcs, kinds, devices, device)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> BlobEntry:
        d = 0 if self.device is None else int(self.device[i])
        return BlobEntry(int(self.starts[i]), int(self.sizes[i]), int(self.crcs[i]), KINDS[self.kinds[i]],
                         self.devices[d])

    def __iter__(self) -> Iterator[BlobEntry]:
        for i in range(len(self)):
            yield self[i]

    def kind(self, i: int) -> str:
        return KINDS[self.kinds[i]]

    def device_of(self, i: int) -> str:
        """Where blob ``i``'s storage lived when saved."""
        return self.devices[0 if self.device is None else int(self.device[i])]

    @property
    def all_on_cpu(self) -> bool:
        return self.devices == ["cpu"]

    @property
    def end(self) -> int:
        """Where the last blob ends in the stream (0 without blobs)."""
        return int((self.starts + self.sizes).max()) if len(self) else 0

    def is_sequential(self) -> bool:
        if not len(self):
            return True
        return bool(np.array_equal(self.starts, aligned_starts(self.sizes)))

    def count(self) -> dict[str, int]:
        return {KINDS[c]: self.kinds.count(c) for c in sorted(set(self.kinds))}


def device_column(devices: list[str]) -> tuple[list[str], list[int] | None]:
    """(table of distinct devices, an index per blob, or None when all share the first)."""
    table: dict[str, int] = {}
    index = [table.setdefault(d, len(table)) for d in devices]
    return list(table) or ["cpu"], (index if len(table) > 1 else None)


# ---------------------------------------------------------------- the record

def _node_counts(nodes: list) -> tuple[int, bool]:
    """(tensor nodes, whether any node is a pickle) of a node table."""
    tensors, pickled = 0, False
    for n in nodes:
        if type(n) is list and n:
            kind = n[0]
            if kind == "tensor":
                tensors += 1
            elif kind == "pickle":
                pickled = True
    return tensors, pickled


class Manifest:
    """A commit record: what a generation holds and where.

    Read from storage, the node table stays unparsed until ``nodes`` is first
    used: finding, listing and shallow checks of a checkpoint of 10**5
    tensors read only the record's first line. ``tensors`` and ``pickled``
    come from that line (and are checked against the table when it is parsed).
    """

    def __init__(self, generation: str, files: list[FileEntry], blobs: BlobTable, nodes: list | None = None, *,
                 created: float | None = None, meta: dict | None = None,
                 version: tuple = (FORMAT_MAJOR, FORMAT_MINOR), writer: dict | None = None,
                 raw_nodes: bytes | None = None, counts: tuple[int, bool] | None = None, where: str = ""):
        self.generation, self.files, self.blobs = generation, files, blobs
        self.created = time.time() if created is None else created
        self.meta = meta if meta is not None else {}
        self.version, self.writer = version, writer if writer is not None else {}
        self._nodes, self._raw_nodes, self._where = nodes, raw_nodes, where
        self._counts = counts

    def replace(self, **changes: Any) -> "Manifest":
        fields = dict(generation=self.generation, files=self.files, blobs=self.blobs, nodes=self._nodes,
                      created=self.created, meta=self.meta, version=self.version, writer=self.writer,
                      raw_nodes=self._raw_nodes, counts=self._counts, where=self._where)
        fields.update(changes)
        return Manifest(**fields)

    @property
    def nodes(self) -> list:
        if self._nodes is None:
            self._nodes = _parse_nodes(self._raw_nodes or b"", self._where, self._counts)
        return self._nodes

    @property
    def tensors(self) -> int:
        """How many tensor nodes the table has (from the record's first line when read)."""
        return self._summary()[0]

    @property
    def pickled(self) -> bool:
        """Whether the table holds pickled values."""
        return self._summary()[1]

    def _summary(self) -> tuple[int, bool]:
        if self._counts is None:
            self._counts = _node_counts(self.nodes)
        return self._counts

    @property
    def nbytes(self) -> int:
        """Bytes of data this generation wrote (an incremental step's own files only)."""
        return sum(f.nbytes for f in self.files if f.dir is None or f.name.startswith(self.generation))

    @property
    def logical(self) -> int:
        """Bytes of all blobs uncompressed: the checkpoint's size as if it held every byte itself, raw."""
        return int(self.blobs.logical_sizes.sum()) if len(self.blobs) else 0

    @property
    def stored(self) -> int:
        """Bytes of all blobs as stored (compressed where they are)."""
        return int(self.blobs.sizes.sum()) if len(self.blobs) else 0

    def file_starts(self) -> list[int]:
        """Where each data file begins in the data stream, and (last) where the stream ends."""
        starts = [0]
        for f in self.files:
            starts.append(starts[-1] + f.nbytes)
        return starts

    def to_bytes(self) -> bytes:
        """The record, in the version this manifest has (a copied 1.x checkpoint stays 1.x)."""
        doc = {
            "format": "ckptstore",
            "version": list(self.version),
            "generation": self.generation,
            "created": self.created,
            "writer": self.writer,
            "nbytes": self.nbytes,
            "files": [_file_doc(f) for f in self.files],
            "meta": self.meta,
        }
        dump = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
        if self.version[0] == 1:
            doc["blobs"], doc["nodes"] = _blobs_v1(self), self.nodes
            body = dump(doc).encode("ascii")
        else:
            tensors, pickled = self._summary()
            doc["blobs"] = _blobs_v2(self.blobs) if self.version[0] == 2 else _blobs_v3(self.blobs)
            if self.version[0] >= 3:
                doc["logical"] = self.logical
            if self.blobs.codec:
                if self.version[0] < COMPRESSED_MAJOR:
                    raise ValueError(f"compressed blobs need format version {COMPRESSED_MAJOR}")
                doc["blobs"]["codec"] = _codec_doc(self.blobs)
            doc["tensors"], doc["pickled"] = tensors, pickled
            nodes = self._raw_nodes if self._nodes is None else dump(self._nodes).encode("ascii")
            body = dump(doc).encode("ascii") + b"\n" + nodes
        header = b"%s %d %d %s\n" % (MAGIC, self.version[0], len(body), crc_hex(crc32c.crc32c(body)).encode())
        return header + body

    @staticmethod
    def from_bytes(data: bytes, where: str = "") -> "Manifest":
        """Parse and check a commit record (all but a version 2 node table, parsed on first use).

        CorruptCheckpointError if it is not intact; FormatTooNewError if it is
        intact but of a major version this ckptstore does not know.
        """
        def bad(msg: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"commit record {where} is not intact: {msg}")

        nl = data.find(b"\n", 0, 128)
        if nl < 0:
            raise bad("no header line")
        parts = data[:nl].split(b" ")
        if len(parts) != 4 or parts[0] != MAGIC:
            raise bad("not a ckptstore commit record")
        if not all(re.fullmatch(rb"[0-9]{1,19}", p) for p in parts[1:3]) or \
                not re.fullmatch(rb"[0-9a-f]{8}", parts[3]):
            raise bad("malformed header line")
        major, length, crc = int(parts[1]), int(parts[2]), int(parts[3], 16)
        body = data[nl + 1:]
        if len(body) != length:
            raise bad(f"{len(body)} bytes where the header says {length} (truncated or torn)")
        if crc32c.crc32c(body) != crc:
            raise bad("CRC-32C mismatch")
        if major not in READABLE_MAJORS:
            if major > max(READABLE_MAJORS):
                raise FormatTooNewError(
                    f"checkpoint {where} was written by a newer ckptstore (format {major}.x; this one reads "
                    f"up to {max(READABLE_MAJORS)}.x); upgrade ckptstore to load it")
            raise bad(f"unknown format version {major}")
        head, raw_nodes = body, None
        if major >= 2:
            cut = body.find(b"\n")
            if cut < 0:
                raise bad("no node table line")
            head, raw_nodes = body[:cut], body[cut + 1:]
        doc = _json(head, where, "")
        try:
            return _parse(doc, major, raw_nodes, where)
        except CorruptCheckpointError as e:
            raise bad(str(e)) from None
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as e:
            raise bad(f"missing or malformed field: {type(e).__name__}: {e}"[:300]) from None


def _parse_nodes(raw: bytes, where: str, counts: tuple[int, bool] | None) -> list:
    """A version 2 node table, checked against the counts the record's first line gives."""
    nodes = _json(raw, where, " in the node table")
    if type(nodes) is not list or not nodes:
        raise CorruptCheckpointError(f"commit record {where} is not intact: the node table is empty")
    if counts is not None and _node_counts(nodes) != counts:
        raise CorruptCheckpointError(f"commit record {where} is not intact: the node table does not match the "
                                     "counts of the record's first line")
    return nodes


def _json(data: bytes, where: str, part: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise CorruptCheckpointError(f"commit record {where} is not intact: JSON{part} nested too deeply") from None
    except ValueError as e:
        raise CorruptCheckpointError(f"commit record {where} is not intact: invalid JSON{part}: {e}") from None


def _blobs_v1(m: Manifest) -> list[dict]:
    starts = m.file_starts()
    out = []
    for b in m.blobs:
        k = max(0, np.searchsorted(starts, b.start, side="right") - 1)
        k = min(k, len(m.files) - 1)
        out.append({"file": int(k), "offset": b.start - starts[k], "nbytes": b.nbytes, "crc32c": crc_hex(b.crc32c),
                    "kind": b.kind, "device": b.device})
    return out


def _file_doc(f: FileEntry) -> dict:
    doc = {"name": f.name, "nbytes": f.nbytes, "crc32c": crc_hex(f.crc32c)}
    if f.dir is not None:
        doc["dir"] = f.dir
    return doc


def _blobs_v3(t: BlobTable) -> dict:
    if t.hashes is None or len(t.hashes) != 16 * len(t):
        raise ValueError("version 3 blobs need an xxh3-128 hash each")
    doc: dict[str, Any] = {"nbytes": t.sizes.tolist(), "start": t.starts.tolist(),
                           "crc32c": t.crcs.astype(">u4").tobytes().hex(), "xxh3": t.hashes.hex(),
                           "kind": t.kinds, "devices": t.devices}
    if t.device is not None:
        doc["device"] = t.device.tolist()
    return doc


def _codec_doc(t: BlobTable) -> dict:
    assert t.codec is not None
    return {"name": CODEC, "frame": t.frame,
            "blobs": [[i, f.logical, f.group, list(f.sizes)] for i, f in sorted(t.codec.items())]}


def _codec_from(raw: dict, t: BlobTable) -> None:
    """Version 5: which blobs are compressed, and how (sets ``t.codec``)."""
    doc = raw.get("codec")
    if not doc:
        return
    if type(doc) is not dict:
        raise CorruptCheckpointError("blobs.codec must be an object")
    name = doc.get("name")
    if name != CODEC:
        raise FormatTooNewError(f"blobs are compressed with {name!r:.40}, a codec this ckptstore does not know; "
                                "upgrade ckptstore to load them")
    frame = _int(doc["frame"], "the frame size", MIN_FRAME, MAX_FRAME)
    entries = doc["blobs"]
    if type(entries) is not list:
        raise CorruptCheckpointError("blobs.codec.blobs must be a list")
    codec: dict[int, Frames] = {}
    last = -1
    for e in entries:
        if type(e) is not list or len(e) < 4 or type(e[3]) is not list:
            raise CorruptCheckpointError("a compressed blob's entry is malformed")
        i = _int(e[0], "a compressed blob's index", 0, len(t) - 1)
        if i <= last:
            raise CorruptCheckpointError("compressed blobs are not in increasing order")
        last = i
        if t.kinds[i] not in "sn":
            raise CorruptCheckpointError(f"blob {i} of kind {t.kind(i)} cannot be compressed")
        f = Frames(_int(e[1], "a compressed blob's size", 1), _int(e[2], "an element size", 1),
                   tuple(_int(s, "a frame's size") for s in e[3]))
        check_frames(f, int(t.sizes[i]), frame, f"compressed blob {i}")
        codec[i] = f
    t.codec, t.frame = codec or None, frame


def _blobs_v2(t: BlobTable) -> dict:
    if not t.is_sequential():
        raise ValueError("version 2 blobs must be laid out sequentially")
    doc: dict[str, Any] = {"nbytes": t.sizes.tolist(), "crc32c": t.crcs.astype(">u4").tobytes().hex(),
                           "kind": t.kinds, "devices": t.devices}
    if t.device is not None:
        doc["device"] = t.device.tolist()
    return doc


def _int(v: Any, what: str, lo: int = 0, hi: int = 2 ** 62) -> int:
    """A JSON integer in [lo, hi]: bools, floats and huge values are lies."""
    if type(v) is not int or not lo <= v <= hi:
        raise CorruptCheckpointError(f"{what} is {v!r:.40}, not a whole number in [{lo}, {hi}]")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise CorruptCheckpointError(f"{what} is not a string")
    return v


def _crc(v: Any, what: str) -> int:
    if type(v) is not str or not re.fullmatch(r"[0-9a-f]{8}", v):
        raise CorruptCheckpointError(f"{what} is not 8 lowercase hex digits")
    return int(v, 16)


def _parse(doc: Any, major: int, raw_nodes: bytes | None, where: str) -> Manifest:
    if type(doc) is not dict or doc.get("format") != "ckptstore":
        raise CorruptCheckpointError("not a ckptstore record body")
    version = doc["version"]
    if type(version) is not list or len(version) < 2 or version[0] != major:
        raise CorruptCheckpointError(f"version {version!r:.40} does not match the header's {major}")
    version = (major, _int(version[1], "minor version"))
    gen = _str(doc["generation"], "generation")
    created = doc["created"]
    if type(created) not in (int, float) or not math.isfinite(created) or not 0 <= created <= _MAX_CREATED:
        raise CorruptCheckpointError(f"commit time {created!r:.40} is not a plausible time")
    meta, writer = doc.get("meta") or {}, doc.get("writer") or {}
    if type(meta) is not dict or type(writer) is not dict:
        raise CorruptCheckpointError("meta and writer must be objects")
    nodes, counts = None, None
    if major == 1:
        nodes = doc["nodes"]
        if type(nodes) is not list or not nodes:
            raise CorruptCheckpointError("the node table is empty")
    else:
        tensors, pickled = doc["tensors"], doc["pickled"]
        counts = (_int(tensors, "the tensor count"), pickled)
        if type(pickled) is not bool:
            raise CorruptCheckpointError("pickled must be true or false")
    raw_files = doc["files"]
    if major < 3 or (major >= DISTRIBUTED_MAJOR and type(raw_files) is list and raw_files
                     and type(raw_files[0]) is dict and "dir" not in raw_files[0]):
        files = _files(raw_files, gen)      # the checkpoint's own directory, this generation's files
    else:
        files = _shared_files(raw_files)
    stream = sum(f.nbytes for f in files)
    if major == 1:
        blobs = _blobs_from_v1(doc["blobs"], files)
    elif major == 2:
        blobs = _blobs_from_v2(doc["blobs"])
    else:
        blobs = _blobs_from_v3(doc["blobs"])
        if major >= COMPRESSED_MAJOR:
            _codec_from(doc["blobs"], blobs)
    _check_layout(blobs, stream, strict=major == 2)
    return Manifest(generation=gen, files=files, blobs=blobs, nodes=nodes, created=float(created), meta=meta,
                    version=version, writer=writer, raw_nodes=raw_nodes, counts=counts, where=where)


def _files(raw: Any, gen: str) -> list[FileEntry]:
    if type(raw) is not list or not raw:
        raise CorruptCheckpointError("no data files listed")
    files, last = [], -1
    for f in raw:
        if type(f) is not dict:
            raise CorruptCheckpointError("a data file entry is not an object")
        name = f["name"]
        parsed = FileName.parse(name)
        if parsed is None or parsed.gen != gen or parsed.role != "data":
            raise CorruptCheckpointError(f"data file name {name!r:.80} does not belong to generation {gen}")
        if parsed.number <= last:
            raise CorruptCheckpointError(f"data file {name} is out of order")
        last = parsed.number
        files.append(FileEntry(name, _int(f["nbytes"], f"size of {name}"), _crc(f["crc32c"], f"CRC of {name}")))
    return files


def _shared_files(raw: Any) -> list[FileEntry]:
    """Version 3: data files in the run's shared directory, of any generation, each named once."""
    if type(raw) is not list or not raw:
        raise CorruptCheckpointError("no data files listed")
    files, seen = [], set()
    for f in raw:
        if type(f) is not dict:
            raise CorruptCheckpointError("a data file entry is not an object")
        name = f["name"]
        parsed = FileName.parse(name)
        if parsed is None or parsed.role != "data":
            raise CorruptCheckpointError(f"data file name {name!r:.80} is not a data file's name")
        if f.get("dir") != SHARED_DIR:
            raise CorruptCheckpointError(f"data file {name} is not in {SHARED_DIR}")
        if name in seen:
            raise CorruptCheckpointError(f"data file {name} is listed twice")
        seen.add(name)
        files.append(FileEntry(name, _int(f["nbytes"], f"size of {name}"), _crc(f["crc32c"], f"CRC of {name}"),
                               SHARED_DIR))
    return files


def _blobs_from_v3(raw: Any) -> BlobTable:
    t = _blobs_from_v2(raw)
    starts, hashes = raw["start"], raw["xxh3"]
    n = len(t)
    array = np.array(starts) if type(starts) is list and starts else np.zeros(0, np.int64)
    if type(starts) is not list or len(starts) != n or (n and (array.ndim != 1 or array.dtype.kind not in "iu"
                                                              or array.min() < 0 or array.max() > 2 ** 62)):
        raise CorruptCheckpointError("blob starts must be one whole number per blob")
    if type(hashes) is not str or len(hashes) != 32 * n or not re.fullmatch(r"[0-9a-f]*", hashes):
        raise CorruptCheckpointError("blob hashes must be 32 hex digits per blob")
    return BlobTable(array.astype(np.int64), t.sizes, t.crcs, t.kinds, t.devices, t.device, bytes.fromhex(hashes))


def _blobs_from_v1(raw: Any, files: list[FileEntry]) -> BlobTable:
    if type(raw) is not list:
        raise CorruptCheckpointError("blobs must be a list")
    starts = [0]
    for f in files:
        starts.append(starts[-1] + f.nbytes)
    s, n, c, kinds, devs = [], [], [], [], []
    for b in raw:
        if type(b) is not dict:
            raise CorruptCheckpointError("a blob entry is not an object")
        k = _int(b["file"], "a blob's file", 0, len(files) - 1)
        s.append(starts[k] + _int(b["offset"], "a blob's offset", 0, files[k].nbytes))
        n.append(_int(b["nbytes"], "a blob's size"))
        c.append(_crc(b["crc32c"], "a blob's CRC"))
        kind = b.get("kind", STORAGE)
        if kind not in KIND_CODES:
            raise CorruptCheckpointError(f"unknown blob kind {kind!r:.40}")
        kinds.append(KIND_CODES[kind])
        devs.append(_str(b.get("device", "cpu"), "a blob's device"))
    table, index = device_column(devs)
    return BlobTable(s, n, c, "".join(kinds), table, index)


def _blobs_from_v2(raw: Any) -> BlobTable:
    if type(raw) is not dict:
        raise CorruptCheckpointError("blobs must be an object of columns")
    sizes, crcs, kinds, devices = raw["nbytes"], raw["crc32c"], raw["kind"], raw["devices"]
    count = len(sizes) if type(sizes) is list else -1
    array = np.array(sizes) if count > 0 else np.zeros(0, np.int64)
    if count < 0 or (count and (array.ndim != 1 or array.dtype.kind not in "iu" or array.min() < 0
                                or array.max() > 2 ** 62)):
        raise CorruptCheckpointError("blob sizes must be whole numbers")
    if type(crcs) is not str or len(crcs) != 8 * count or not re.fullmatch(r"[0-9a-f]*", crcs):
        raise CorruptCheckpointError("blob CRCs must be 8 hex digits per blob")
    if type(kinds) is not str or len(kinds) != count or set(kinds) - set(KINDS):
        raise CorruptCheckpointError("blob kinds must be one known letter per blob")
    if type(devices) is not list or not devices or not all(type(d) is str for d in devices):
        raise CorruptCheckpointError("devices must be a list of strings")
    device = raw.get("device")
    if device is not None:
        if type(device) is not list or len(device) != count or \
                not all(type(d) is int and 0 <= d < len(devices) for d in device):
            raise CorruptCheckpointError("a blob's device index is out of range")
    crc_array = np.frombuffer(bytes.fromhex(crcs), dtype=">u4").astype(np.uint32) if count else []
    return BlobTable.sequential(array, crc_array, kinds, devices, device)


def _check_layout(blobs: BlobTable, stream: int, strict: bool) -> None:
    """Blobs lie inside the data stream, in order, without overlapping, and nothing but padding follows.

    ``strict`` (version 2): the stream ends with the last blob or with its
    padding to the next multiple of ALIGN.
    """
    if not len(blobs):
        if strict and stream != 0:
            raise CorruptCheckpointError(f"{stream} bytes of data files but no blobs")
        return
    ends = blobs.starts + blobs.sizes
    if int(ends.max()) > stream:
        raise CorruptCheckpointError("a blob lies outside the data files")
    if len(blobs) > 1:
        order = np.argsort(blobs.starts, kind="stable")
        if bool((blobs.starts[order][1:] < ends[order][:-1]).any()):
            raise CorruptCheckpointError("blobs overlap")
    if bool((blobs.starts % ALIGN).any()):
        raise CorruptCheckpointError("a blob does not start at a multiple of 64")
    if strict and stream > align_up(blobs.end):
        raise CorruptCheckpointError("the data files run on past the last blob's padding")
