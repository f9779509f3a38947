"""Commit records that say whatever a test needs: intact (the CRC recomputed) and hostile in
their structure, for tests/test_record_walks.py and benchmarks/record_walks.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import crc32c
import torch

import ckptstore


def record_of(d: Path) -> Path:
    """The commit record file of the checkpoint directory ``d``."""
    (name,) = [n for n in os.listdir(d) if n.endswith(".commit")]
    return d / name


def rewrite_record(d: Path, edit_head=None, nodes: list | None = None) -> None:
    """Rewrite the commit record of ``d``: ``edit_head(head)`` applied to its head, ``nodes``
    (when given) as its node table, its major version kept and its CRC recomputed, so the
    record is intact and says what the edit made it say (docs/format.md, "The commit record")."""
    path = record_of(d)
    raw = path.read_bytes()
    major = int(raw.split(b" ", 2)[1])
    head_raw, nodes_raw = raw.split(b"\n", 1)[1].split(b"\n", 1)
    head = json.loads(head_raw)
    if edit_head is not None:
        edit_head(head)
    if nodes is not None:
        nodes_raw = json.dumps(nodes, separators=(",", ":")).encode()
    body = json.dumps(head, separators=(",", ":")).encode() + b"\n" + nodes_raw
    path.write_bytes(b"CKPTSTORE %d %d %08x\n" % (major, len(body), crc32c.crc32c(body)) + body)


def forge(d: Path, nodes: list, state=None) -> Path:
    """Save ``state`` (default: one small tensor) at ``d``, then give its record the node table
    ``nodes``, the counts of the head made to match: an intact record that says whatever
    ``nodes`` says."""
    ckptstore.save({"t": torch.arange(4, dtype=torch.float32)} if state is None else state, d)

    def counts(head: dict) -> None:
        head["tensors"] = sum(1 for n in nodes if type(n) is list and n and n[0] == "tensor")
        head["pickled"] = any(type(n) is list and n and n[0] == "pickle" for n in nodes)
    rewrite_record(d, counts, nodes)
    return d


TENSOR = ["tensor", 0, "float32", [4]]      # the saved tensor's node: blob 0, 16 bytes
KINDS = ("dict", "list", "odict", "tuple")


def chain(depth: int, leaf: list = TENSOR) -> tuple[list, tuple]:
    """(nodes, path of the leaf): ``depth`` containers, each the only child of the one before,
    cycling through dict, list, OrderedDict and tuple, then ``leaf``."""
    nodes, path = [], []
    for i in range(depth):
        kind = KINDS[i % 4]
        if kind in ("dict", "odict"):
            nodes.append([kind, ["k"], [i + 1]])
            path.append("k")
        else:
            nodes.append([kind, [i + 1]])
            path.append(0)
    nodes.append(leaf)
    return nodes, tuple(path)


def dict_keys_record(d: Path, n: int) -> str:
    """A record of one dict whose ``n`` keys are tuples held as nodes of their own, each
    mapping to None: ``{(0,): None, (1,): None, ...}``."""
    nodes: list = [["dict", [], []]]
    for j in range(n):
        nodes[0][1].append([len(nodes)])
        nodes.append(["tuple", [len(nodes) + 1]])
        nodes.append(["int", str(j)])
        nodes[0][2].append(len(nodes))
        nodes.append(["none"])
    return str(forge(d, nodes))


# ---------------------------------------------------------------- timing by scaling
