"""The commit record: the one file a reader trusts.

A checkpoint directory holds data files and commit records. Each save is a
*generation*; its files carry the generation id in their names:

    <gen>.commit          commit record (header line + JSON manifest)
    <gen>-<k>.bin         data file k of that generation
    <gen>.commit.tmp      a commit record not yet renamed into place

A reader takes the newest generation whose commit record is intact. Files
of any other generation are leftovers (an interrupted or superseded save)
and are never read. The record lists every data file with its size and
CRC-32C, and its own bytes are covered by the CRC in its header line, so a
torn, truncated or bit-flipped record is never taken as a commit.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import crc32c

from ..errors import CorruptCheckpointError

MAGIC = b"CKPTSTORE"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
COMMIT_SUFFIX = ".commit"
TMP_SUFFIX = ".tmp"
DATA_SUFFIX = ".bin"
CLAIM_NAME = "create.claim"  # taken by a save that must not replace a checkpoint (overwrite=False)
ALIGN = 64  # blob offsets in data files are multiples of this

# Generation ids sort in commit order: 16 hex digits of nanoseconds since
# the epoch (bumped past any generation already present), then random bits
# so two writers never pick the same name.
_GEN = r"[0-9a-f]{16}-[0-9a-f]{8}"
_NAME = re.compile(rf"^(?P<gen>{_GEN})(?:(?P<commit>\.commit)(?P<tmp>\.tmp)?|-(?P<k>\d{{5,}})\.bin)$")


def new_generation(existing: list[str] = ()) -> str:
    now = time.time_ns()
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

    @staticmethod
    def parse(name: str) -> "FileName | None":
        m = _NAME.match(name)
        if not m:
            return None
        if m.group("commit"):
            return FileName(m.group("gen"), "tmp" if m.group("tmp") else "commit")
        return FileName(m.group("gen"), "data")


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


@dataclass
class Manifest:
    generation: str
    files: list[dict]        # [{"name", "nbytes", "crc32c"}]
    blobs: list[dict]        # [{"file", "offset", "nbytes", "crc32c", "kind"}]
    nodes: list
    created: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)   # free-form JSON for callers (the manager)
    version: tuple = (FORMAT_MAJOR, FORMAT_MINOR)
    writer: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(f["nbytes"] for f in self.files)

    def file_starts(self) -> list[int]:
        """Where each data file begins in the data stream, and (last) where the stream ends."""
        starts = [0]
        for f in self.files:
            starts.append(starts[-1] + int(f["nbytes"]))
        return starts

    def to_bytes(self) -> bytes:
        body = json.dumps({
            "format": "ckptstore",
            "version": list(self.version),
            "generation": self.generation,
            "created": self.created,
            "writer": self.writer,
            "nbytes": self.nbytes,
            "files": self.files,
            "blobs": self.blobs,
            "nodes": self.nodes,
            "meta": self.meta,
        }, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
        header = b"%s %d %d %s\n" % (MAGIC, FORMAT_MAJOR, len(body), crc_hex(crc32c.crc32c(body)).encode())
        return header + body

    @staticmethod
    def from_bytes(data: bytes, where: str = "") -> "Manifest":
        """Parse and check a commit record; CorruptCheckpointError if it is not intact."""
        def bad(msg: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"commit record {where} is not intact: {msg}")

        nl = data.find(b"\n", 0, 128)
        if nl < 0:
            raise bad("no header line")
        parts = data[:nl].split(b" ")
        if len(parts) != 4 or parts[0] != MAGIC:
            raise bad("not a ckptstore commit record")
        try:
            major, length, crc = int(parts[1]), int(parts[2]), int(parts[3], 16)
        except ValueError:
            raise bad("malformed header line") from None
        if major != FORMAT_MAJOR:
            if major > FORMAT_MAJOR:
                raise CorruptCheckpointError(
                    f"checkpoint {where} uses format version {major}.x, newer than this ckptstore "
                    f"reads ({FORMAT_MAJOR}.x): upgrade ckptstore to load it")
            raise bad(f"unknown format version {major}")
        body = data[nl + 1:]
        if len(body) != length:
            raise bad(f"{len(body)} bytes where the header says {length} (truncated or torn)")
        if crc32c.crc32c(body) != crc:
            raise bad("CRC-32C mismatch")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise bad(f"invalid JSON: {e}") from None
        try:
            version = tuple(int(v) for v in doc["version"])
            if doc.get("format") != "ckptstore" or version[0] != FORMAT_MAJOR:
                raise bad(f"format {doc.get('format')!r} version {version}")
            m = Manifest(
                generation=str(doc["generation"]),
                files=list(doc["files"]),
                blobs=list(doc["blobs"]),
                nodes=list(doc["nodes"]),
                created=float(doc["created"]),
                meta=dict(doc.get("meta") or {}),
                version=version,
                writer=dict(doc.get("writer") or {}),
            )
            m.check()
        except CorruptCheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"missing or malformed field: {e}") from None
        return m

    def check(self) -> None:
        """Structural sanity of the listing, so readers can trust offsets."""
        sizes = []
        if not self.files:
            raise CorruptCheckpointError("no data files listed")
        for f in self.files:
            if not (isinstance(f["name"], str) and FileName.parse(f["name"]) == FileName(self.generation, "data")):
                raise CorruptCheckpointError(f"data file name {f['name']!r} does not belong to generation {self.generation}")
            int(f["crc32c"], 16)
            if int(f["nbytes"]) < 0:
                raise ValueError("negative size")
            sizes.append(int(f["nbytes"]))
        # The data files are one stream, in order; a blob starts in its file
        # and may run on into the following ones.
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        for b in self.blobs:
            k, off, n = int(b["file"]), int(b["offset"]), int(b["nbytes"])
            int(b["crc32c"], 16)
            if not (0 <= k < len(sizes)) or off < 0 or n < 0 or off > sizes[k] or \
                    starts[k] + off + n > starts[-1]:
                raise CorruptCheckpointError("a blob lies outside the data files")


def describe(m: Manifest) -> dict[str, Any]:
    """A summary fit for `ckptstore info`."""
    kinds: dict[str, int] = {}
    for b in m.blobs:
        kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
    tensors = sum(1 for n in m.nodes if n[0] == "tensor")
    return {
        "format": ".".join(map(str, m.version)),
        "generation": m.generation,
        "created": m.created,
        "nbytes": m.nbytes,
        "files": [{"name": f["name"], "nbytes": f["nbytes"], "crc32c": f["crc32c"]} for f in m.files],
        "tensors": tensors,
        "blobs": kinds,
        "pickled": any(n[0] == "pickle" for n in m.nodes),
        "writer": m.writer,
        "meta": m.meta,
    }
