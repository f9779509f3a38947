"""The on-storage format as docs/format.md specifies it.

An independent reader, written from the document alone (no ckptstore code),
must read what ckptstore writes; version 1.0 checkpoints written by
ckptstore 0.1 still load; a newer major version is refused, never fallen
back past; every dtype in the table round-trips and nothing else is accepted.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.cli import main as cli
from ckptstore.errors import CorruptCheckpointError, FormatTooNewError
from ckptstore.format.manifest import Manifest

V1 = Path(__file__).parent / "data" / "v1-checkpoint"


def record_path(d) -> Path:
    (name,) = [n for n in os.listdir(d) if n.endswith(".commit")]
    return Path(d) / name


def read_record(d) -> tuple[bytes, dict]:
    """(header line, record object with the node table as its "nodes"), as in either version."""
    raw = record_path(d).read_bytes()
    header, body = raw.split(b"\n", 1)
    if header.startswith(b"CKPTSTORE 1 "):
        return header, json.loads(body)
    head, table = body.split(b"\n", 1)
    return header, dict(json.loads(head), nodes=json.loads(table))


def write_record(path: Path, doc: dict, major: int | None = None) -> None:
    """A record with its CRC recomputed: intact, whatever it says (counts kept true)."""
    major = doc["version"][0] if major is None else major
    if major == 1 or "nodes" not in doc:
        body = json.dumps(doc, separators=(",", ":")).encode()
    else:
        head = {k: v for k, v in doc.items() if k != "nodes"}
        head["tensors"] = sum(1 for n in doc["nodes"] if isinstance(n, list) and n and n[0] == "tensor")
        head["pickled"] = any(isinstance(n, list) and n and n[0] == "pickle" for n in doc["nodes"])
        body = json.dumps(head, separators=(",", ":")).encode() + b"\n" + \
            json.dumps(doc["nodes"], separators=(",", ":")).encode()
    path.write_bytes(b"CKPTSTORE %d %d %08x\n" % (major, len(body), crc32c.crc32c(body)) + body)


# ---------------------------------------------------------------- a reader from the document alone

def spec_reader(d: str):
    """Reads a version 2 or 3 checkpoint directory following docs/format.md; tensors become numpy arrays."""
    names = os.listdir(d)
    commits = sorted((n for n in names if re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{8}\.commit", n)), reverse=True)
    raw = open(os.path.join(d, commits[0]), "rb").read()
    nl = raw.index(b"\n")
    magic, major, length, crc = raw[:nl].split(b" ")
    body = raw[nl + 1:]
    assert magic == b"CKPTSTORE" and int(major) in (2, 3) and len(body) == int(length)
    assert crc32c.crc32c(body) == int(crc, 16)
    head, _, table = body.partition(b"\n")
    doc = json.loads(head)
    doc["nodes"] = json.loads(table)
    assert doc["version"][0] == int(major)
    assert doc["tensors"] == sum(1 for n in doc["nodes"] if n[0] == "tensor")
    blobs = doc["blobs"]
    if int(major) == 2:
        # Version 2: the record's own files, numbered in increasing order; offsets implied.
        numbers = [int(f["name"].rsplit("-", 1)[1][:-4]) for f in doc["files"]]
        assert all(f["name"].startswith(doc["generation"] + "-") for f in doc["files"]) and numbers == sorted(numbers)
        stream = b"".join(open(os.path.join(d, f["name"]), "rb").read() for f in doc["files"])
        starts, pos = [], 0
        for n in blobs["nbytes"]:
            starts.append(pos)
            pos += -(-n // 64) * 64
        end = max((s + n for s, n in zip(starts, blobs["nbytes"])), default=0)
        assert end <= len(stream) <= -(-end // 64) * 64
    else:
        # Version 3: files in the run's .shared directory, in the listed order; offsets explicit.
        import xxhash
        assert all(f["dir"] == ".shared" for f in doc["files"])
        shared = Path(d).parent / ".shared"
        stream = b"".join((shared / f["name"]).read_bytes() for f in doc["files"])
        starts = blobs["start"]
    for k, f in enumerate(doc["files"]):
        assert len(open(os.path.join(d, f["name"]) if int(major) == 2 else Path(d).parent / ".shared" / f["name"],
                        "rb").read()) == f["nbytes"]
    data = [stream[s:s + n] for s, n in zip(starts, blobs["nbytes"])]
    for i, b in enumerate(data):
        assert crc32c.crc32c(b) == int(blobs["crc32c"][8 * i:8 * i + 8], 16)
        if int(major) == 3:
            assert xxhash.xxh3_128(b).hexdigest() == blobs["xxh3"][32 * i:32 * i + 32]
    np_dtypes = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "float16": "<f2", "int32": "<i4",
                 "uint8": "u1", "bool": "?"}
    nodes, values = doc["nodes"], {}
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        kind = node[0]
        if kind == "tensor":
            extra = node[4] if len(node) > 4 else {}
            shape = node[3]
            itemsize = np.dtype(np_dtypes[node[2]]).itemsize
            stride, acc = [0] * len(shape), 1
            for k in range(len(shape) - 1, -1, -1):
                stride[k] = acc
                acc *= max(shape[k], 1)
            stride = extra.get("stride", stride)
            base = np.frombuffer(data[node[1]], dtype=np_dtypes[node[2]])
            values[i] = np.lib.stride_tricks.as_strided(
                base[extra.get("offset", 0):], shape, [s * itemsize for s in stride]).copy()
        elif kind in ("dict", "odict"):
            keys = [values[k[0]] if isinstance(k, list) else k for k in node[1]]
            values[i] = dict(zip(keys, (values[c] for c in node[2])))
        elif kind == "list":
            values[i] = [values[c] for c in node[1]]
        elif kind == "tuple":
            values[i] = tuple(values[c] for c in node[1])
        elif kind == "int":
            values[i] = int(node[1], 16) if "0x" in node[1] else int(node[1])
        elif kind == "str":
            values[i] = node[1] if isinstance(node[1], str) else "".join(map(chr, node[1]))
        elif kind == "float":
            v = node[1]
            values[i] = struct.unpack(">d", bytes.fromhex(v[4:]))[0] if str(v).startswith("nan:") else float(v)
        elif kind == "bytes":
            values[i] = data[node[1]]
        elif kind == "none":
            values[i] = None
        elif kind == "bool":
            values[i] = node[1]
        else:
            raise AssertionError(f"the spec reader does not handle {kind}")
    return values[0]


def test_a_reader_written_from_the_document_reads_what_ckptstore_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    state = {"model": {"layer.0.weight": w, "layer.0.bias": torch.randn(6, generator=g),
                       "t": w.t(), "half": torch.arange(5, dtype=torch.float16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(6)}}},
             "step": 12, "huge": 10 ** 5000, "name": "run\ud800", "lr": 0.5, "blob": b"\x00raw",
             "flags": [True, None], (1, 2): "tuple key",
             "nans": [float("nan"), -float("nan"), struct.unpack(">d", bytes.fromhex("7ff8000000000001"))[0]]}
    ckptstore.save(state, tmp_path / "c", storage_options={"part_size": "1MiB"})
    got = spec_reader(str(tmp_path / "c"))
    np.testing.assert_array_equal(got["model"]["layer.0.weight"], w.numpy())
    np.testing.assert_array_equal(got["model"]["t"], w.t().numpy())
    np.testing.assert_array_equal(got["model"]["half"], np.arange(5, dtype="<f2"))
    assert got["optimizer"]["state"][0]["step"] == 3.0
    assert got["step"] == 12 and got["huge"] == 10 ** 5000 and got["name"] == "run\ud800"
    assert got["blob"] == b"\x00raw" and got["flags"] == [True, None] and got[(1, 2)] == "tuple key"
    assert [struct.pack(">d", v).hex() for v in got["nans"]] == ["7ff8000000000000", "fff8000000000000",
                                                                 "7ff8000000000001"]


def test_a_multi_file_local_save_follows_the_stream_rule(tmp_path):
    big = {f"t{i}": torch.randn(300_000) for i in range(4)}    # 4.8 MB over 1 MiB files
    ckptstore.save(big, tmp_path / "c", storage_options={"part_size": "1MiB"})
    _, doc = read_record(tmp_path / "c")
    assert len(doc["files"]) == 5
    got = spec_reader(str(tmp_path / "c"))
    for k, t in big.items():
        np.testing.assert_array_equal(got[k], t.numpy())


def test_the_record_is_strict_json_without_lone_surrogates(tmp_path):
    ckptstore.save({"a\udc80": "b\ud800", "ok": "é"}, tmp_path / "c")
    body = record_path(tmp_path / "c").read_bytes().split(b"\n", 1)[1]
    assert body.count(b"\n") == 1
    assert b"\\ud8" not in body.lower() and b"\\udc" not in body.lower()
    assert ckptstore.load(tmp_path / "c") == {"a\udc80": "b\ud800", "ok": "é"}


# ---------------------------------------------------------------- values that once failed

@pytest.mark.parametrize("value", [10 ** 5000, -(10 ** 5000), 2 ** 100000 + 1, 2 ** 63, -1, 0],
                         ids=["1e5000", "-1e5000", "2**100000+1", "2**63", "-1", "0"])
def test_any_int_round_trips(tmp_path, value):
    ckptstore.save({"v": value, value: "as a key"}, tmp_path / "c")
    got = ckptstore.load(tmp_path / "c")
    assert got["v"] == value and got[value] == "as a key"


def test_a_decimal_int_past_the_parse_limit_is_refused_as_corrupt(tmp_path):
    ckptstore.save({"v": 1}, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    node = next(n for n in doc["nodes"] if n[0] == "int")
    node[1] = "9" * 5000
    write_record(record_path(tmp_path / "c"), doc)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(tmp_path / "c")


# ---------------------------------------------------------------- dtypes

def test_every_dtype_in_the_table_round_trips_with_its_element_size(tmp_path):
    from ckptstore.format.dtypes import BY_NAME, ELEMENT_SIZES
    state = {}
    for name, dtype in BY_NAME.items():
        assert dtype.itemsize == ELEMENT_SIZES[name], name
        raw = torch.arange(24, dtype=torch.uint8).repeat(ELEMENT_SIZES[name])
        state[name] = raw.view(dtype)
    ckptstore.save(state, tmp_path / "c")
    got = ckptstore.load(tmp_path / "c")
    for name, t in state.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.parametrize("name", ["qint8", "quint4x2", "float128", "torch.float32", 5])
def test_a_dtype_outside_the_table_is_refused_as_corrupt(tmp_path, name):
    ckptstore.save({"w": torch.ones(4, dtype=torch.int8)}, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    node = next(n for n in doc["nodes"] if n[0] == "tensor")
    node[2] = name
    write_record(record_path(tmp_path / "c"), doc)
    with pytest.raises(CorruptCheckpointError, match="dtype"):
        ckptstore.load(tmp_path / "c")


def test_a_big_endian_numpy_array_keeps_its_byte_order(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    ckptstore.save({"a": a}, tmp_path / "c")
    got = ckptstore.load(tmp_path / "c")["a"]
    assert got.dtype == np.dtype(">i4") and (got == a).all()


# ---------------------------------------------------------------- structural lies

def _corrupt_nodes(tmp_path, mutate) -> None:
    ckptstore.save({"a": [1, 2], "w": torch.ones(3)}, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    mutate(doc)
    write_record(record_path(tmp_path / "c"), doc)


def test_a_node_with_two_parents_is_refused(tmp_path):
    def share(doc):
        lst = next(n for n in doc["nodes"] if n[0] == "list")
        lst[1][1] = lst[1][0]
    _corrupt_nodes(tmp_path, share)
    with pytest.raises(CorruptCheckpointError, match="two parents"):
        ckptstore.load(tmp_path / "c")


def test_a_tensor_pointing_at_a_bytes_blob_is_corrupt_not_a_storage_error(tmp_path):
    ckptstore.save({"b": b"xyz", "w": torch.ones(3)}, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    next(n for n in doc["nodes"] if n[0] == "tensor")[1] = 0     # blob 0 is the bytes
    write_record(record_path(tmp_path / "c"), doc)
    with pytest.raises(CorruptCheckpointError, match="holds bytes"):
        ckptstore.load(tmp_path / "c")


def test_a_data_file_name_outside_the_generation_is_refused(tmp_path):
    def escape(doc):
        doc["files"][0]["name"] = "../" + doc["files"][0]["name"]
    _corrupt_nodes(tmp_path, escape)
    with pytest.raises(CorruptCheckpointError, match="does not belong"):
        ckptstore.load(tmp_path / "c")


def test_a_tensor_view_past_its_storage_is_refused(tmp_path):
    def stretch(doc):
        next(n for n in doc["nodes"] if n[0] == "tensor")[3] = [4]
    _corrupt_nodes(tmp_path, stretch)
    with pytest.raises(CorruptCheckpointError, match="past the end"):
        ckptstore.load(tmp_path / "c")


def test_an_unknown_node_kind_is_refused(tmp_path):
    def unknown(doc):
        doc["nodes"].append(["frobnicate", 1])
        doc["nodes"][0][1].append("extra")
        doc["nodes"][0][2].append(len(doc["nodes"]) - 1)
    _corrupt_nodes(tmp_path, unknown)
    with pytest.raises(CorruptCheckpointError, match="unknown kind"):
        ckptstore.load(tmp_path / "c")


def test_a_state_without_blobs_has_one_empty_data_file(tmp_path):
    ckptstore.save({"step": 3}, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    assert [f["nbytes"] for f in doc["files"]] == [0] and doc["blobs"]["nbytes"] == []
    assert ckptstore.load(tmp_path / "c") == {"step": 3}


def test_empty_blobs_at_the_end_of_the_stream_load(tmp_path):
    state = {"w": torch.ones(3), "e": torch.empty(0), "b": b""}
    ckptstore.save(state, tmp_path / "c")
    got = ckptstore.load(tmp_path / "c")
    assert torch.equal(got["w"], state["w"]) and got["e"].numel() == 0 and got["b"] == b""


# ---------------------------------------------------------------- versions

def test_a_version_1_checkpoint_written_by_ckptstore_0_1_still_loads():
    header, doc = read_record(V1)
    assert header.startswith(b"CKPTSTORE 1 ") and doc["version"] == [1, 0]
    got = ckptstore.load(V1)
    assert ckptstore.verify(V1, deep=True).ok
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    sd = m.state_dict()
    for k, v in sd.items():
        assert torch.equal(got["model"][k], v)
    assert got["tied"].data_ptr() == got["model"]["0.weight"].data_ptr()
    assert torch.equal(got["view"], sd["0.weight"][1:3])
    assert got["model"]._metadata == sd._metadata
    assert got["big"] == 2 ** 80 and got[5] == "int key" and got["arr"].dtype == np.dtype(">i4")
    assert isinstance(got["param"], torch.nn.Parameter) and got["meta"].device.type == "meta"
    assert math.isnan(got["nan"]) and got["dtype"] is torch.bfloat16 and got["flags"] == (True, None)


def test_cp_of_a_version_1_checkpoint_stays_version_1_and_loads(tmp_path):
    assert cli(["cp", str(V1), str(tmp_path / "copy")]) == 0
    header, _ = read_record(tmp_path / "copy")
    assert header.startswith(b"CKPTSTORE 1 ")
    assert ckptstore.verify(tmp_path / "copy", deep=True).ok
    assert ckptstore.load(tmp_path / "copy")["step"] == 7


def _add_newer_generation(d: Path, major: int = 6) -> str:
    from ckptstore.format.manifest import commit_name, new_generation
    gens = [n.split(".")[0] for n in os.listdir(d) if n.endswith(".commit")]
    gen = new_generation(gens)
    write_record(d / commit_name(gen), {"format": "ckptstore", "version": [major, 0], "generation": gen},
                 major=major)
    return gen


def test_a_newer_major_version_is_refused_not_fallen_back_past(tmp_path):
    ckptstore.save({"step": 1}, tmp_path / "c")
    _add_newer_generation(tmp_path / "c")
    with pytest.raises(FormatTooNewError, match="newer ckptstore.*upgrade") as e:
        ckptstore.load(tmp_path / "c")
    assert not isinstance(e.value, CorruptCheckpointError)
    rep = ckptstore.verify(tmp_path / "c")
    assert not rep.ok and "newer ckptstore" in rep.problems[0]
    from ckptstore.api import info
    with pytest.raises(FormatTooNewError):
        info(tmp_path / "c")
    assert ckptstore.exists(tmp_path / "c")


def test_the_manager_refuses_a_newer_step_rather_than_resuming_an_older(tmp_path, caplog):
    mgr = ckptstore.CheckpointManager(tmp_path / "run")
    mgr.save(1, {"step": 1})
    mgr.save(2, {"step": 2})
    _add_newer_generation(tmp_path / "run" / "step-2")
    with pytest.raises(FormatTooNewError):
        mgr.restore()
    assert mgr.restore(1) == {"step": 1}


def test_the_cli_reports_a_newer_format_without_a_traceback(tmp_path, capsys):
    ckptstore.save({"step": 1}, tmp_path / "c")
    _add_newer_generation(tmp_path / "c")
    assert cli(["info", str(tmp_path / "c")]) == 1
    assert cli(["verify", str(tmp_path / "c")]) == 1
    out = capsys.readouterr()
    assert "newer ckptstore" in out.err + out.out and "Traceback" not in out.err
    assert cli(["ls", str(tmp_path)]) == 0
    assert "newer ckptstore" in capsys.readouterr().out


def test_a_torn_newer_record_is_skipped_for_the_intact_older_one(tmp_path):
    ckptstore.save({"step": 1}, tmp_path / "c")
    gen = _add_newer_generation(tmp_path / "c", major=2)
    p = tmp_path / "c" / f"{gen}.commit"
    p.write_bytes(p.read_bytes()[:-3])     # torn: the length no longer matches
    assert ckptstore.load(tmp_path / "c") == {"step": 1}


# ---------------------------------------------------------------- many tensors

def test_a_record_of_100k_tensors_stays_under_100_bytes_a_tensor(tmp_path):
    n = 30_000
    state = {"model": {f"layers.{i}.weight": torch.full((256,), float(i)) for i in range(n)},
             "optimizer": {"state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.zeros(256)}
                                     for i in range(n)},
                           "param_groups": [{"lr": 1e-3, "params": list(range(n))}]}}
    ckptstore.save(state, tmp_path / "c")
    tensors = 3 * n
    size = record_path(tmp_path / "c").stat().st_size
    assert size / tensors <= 100, size / tensors
    got = ckptstore.load(tmp_path / "c")
    assert torch.equal(got["model"][f"layers.{n - 1}.weight"], state["model"][f"layers.{n - 1}.weight"])
    assert got["optimizer"]["state"][17]["step"].item() == 17.0
    assert ckptstore.verify(tmp_path / "c", deep=True).ok


def test_a_record_whose_first_line_hides_a_pickle_is_refused_without_unpickling(tmp_path):
    ckptstore.save({"x": 1}, tmp_path / "c", allow_pickle=True)
    ckptstore.save({"x": {1, 2}}, tmp_path / "p", allow_pickle=True)     # a set: pickled
    raw = record_path(tmp_path / "p").read_bytes()
    header, body = raw.split(b"\n", 1)
    head, table = body.split(b"\n", 1)
    lie = json.loads(head)
    assert lie["pickled"] is True
    lie["pickled"] = False
    body = json.dumps(lie, separators=(",", ":")).encode() + b"\n" + table
    record_path(tmp_path / "p").write_bytes(b"CKPTSTORE 2 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body)
    with pytest.raises(CorruptCheckpointError, match="counts"):
        ckptstore.load(tmp_path / "p")


# ---------------------------------------------------------------- version 3 (incremental steps)


def _v3(files=None, starts=(0, 128), sizes=(100, 64), hashes=None, **changes):
    from ckptstore.format.manifest import SHARED_DIR, BlobTable, FileEntry, Manifest, data_name, new_generation

    old = new_generation()
    gen = new_generation([old])
    if files is None:
        files = [FileEntry(data_name(old, 0), 128, 5, SHARED_DIR), FileEntry(data_name(gen, 0), 64, 7, SHARED_DIR)]
    blobs = BlobTable(list(starts), list(sizes), [1] * len(sizes), "s" * len(sizes), ["cpu"], None,
                      bytes(range(16 * len(sizes))) if hashes is None else hashes)
    nodes = [["list", list(range(1, len(sizes) + 1))]] + [["tensor", i, "uint8", [n]] for i, n in enumerate(sizes)]
    return Manifest(generation=gen, files=files, blobs=blobs, nodes=nodes, version=(3, 0), **changes)


def test_a_version_3_record_round_trips_with_shared_files_starts_and_hashes():
    m = _v3()
    back = Manifest.from_bytes(m.to_bytes(), "x")
    assert back.version == (3, 0)
    assert [(f.name, f.dir) for f in back.files] == [(f.name, f.dir) for f in m.files]
    assert back.blobs.starts.tolist() == [0, 128] and back.blobs.hash_of(1) == bytes(range(16, 32))
    assert back.nbytes == 64            # only what this generation wrote
    assert back.logical == 164          # every blob's bytes


@pytest.mark.parametrize("lie", ["no dir", "listed twice", "overlap", "unaligned", "outside", "short hashes",
                                 "a commit name"])
def test_a_version_3_record_that_lies_is_corrupt(lie):
    import json as _json

    m = _v3()
    raw = m.to_bytes()
    head, rest = raw.split(b"\n", 1)
    doc_raw, nodes = rest.split(b"\n", 1)
    doc = _json.loads(doc_raw)
    if lie == "no dir":
        del doc["files"][0]["dir"]
    elif lie == "listed twice":
        doc["files"][1]["name"] = doc["files"][0]["name"]
    elif lie == "overlap":
        doc["blobs"]["start"] = [0, 64]
    elif lie == "unaligned":
        doc["blobs"]["start"] = [0, 130]
    elif lie == "outside":
        doc["blobs"]["start"] = [0, 192]
    elif lie == "short hashes":
        doc["blobs"]["xxh3"] = doc["blobs"]["xxh3"][:-2]
    elif lie == "a commit name":
        doc["files"][0]["name"] = doc["files"][0]["name"].replace("-00000.bin", ".commit")
    body = _json.dumps(doc, separators=(",", ":")).encode() + b"\n" + nodes
    record = b"CKPTSTORE 3 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_bytes(record, "x")


# ---------------------------------------------------------------- what the document states precisely

def test_the_document_names_the_current_version_this_ckptstore_reads():
    from ckptstore.format.manifest import COMPRESSED_MAJOR, READABLE_MAJORS
    text = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert text.splitlines()[0] == f"# The ckptstore on-storage format (version {max(READABLE_MAJORS)}.0)"
    assert f"The format's current\nversion is **{max(READABLE_MAJORS)}.0**" in text
    assert max(READABLE_MAJORS) == COMPRESSED_MAJOR


def test_an_empty_blob_shares_its_start_offset_with_the_next_blob(tmp_path):
    state = {"a": torch.ones(3), "e": torch.empty(0), "b": b"", "c": torch.arange(5), "z": torch.empty(0)}
    ckptstore.save(state, tmp_path / "c")
    _, doc = read_record(tmp_path / "c")
    sizes = doc["blobs"]["nbytes"]
    assert sizes == [12, 0, 0, 40, 0]
    # offsets implied: 0, 64, 64, 64, 128 -- the empty blobs share theirs with the next blob
    assert doc["blobs"]["crc32c"][8:24] == "0" * 16
    got = spec_reader(str(tmp_path / "c"))
    np.testing.assert_array_equal(got["c"], np.arange(5))
    assert got["b"] == b"" and got["e"].size == 0 and got["z"].size == 0
    assert ckptstore.verify(tmp_path / "c", deep=True).ok


def test_a_reader_written_from_the_document_reads_an_incremental_step(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1000, generator=g)
    run = tmp_path / "run"
    with ckptstore.CheckpointManager(str(run), incremental=True) as mgr:
        mgr.save(1, {"base": base, "head": torch.randn(7, generator=g), "e": torch.empty(0)})
        head = torch.randn(9, generator=g)
        mgr.save(2, {"base": base, "head": head, "e": torch.empty(0), "b": b""})
    header, doc = read_record(run / "step-2")
    assert header.startswith(b"CKPTSTORE 3 ")
    names = [f["name"] for f in doc["files"]]
    # Version 2's numbering rule does not hold: two generations' -00000.bin in one record.
    assert len(names) == 2 and all(n.endswith("-00000.bin") for n in names)
    assert names[0][:25] != names[1][:25] and names[1].startswith(doc["generation"])
    got = spec_reader(str(run / "step-2"))
    np.testing.assert_array_equal(got["base"], base.numpy())
    np.testing.assert_array_equal(got["head"], head.numpy())
    assert got["b"] == b"" and got["e"].size == 0


def _rewrite_head(d: Path, change) -> None:
    """Change the record object (not the node table) of ``d``'s record, its CRC recomputed."""
    raw = record_path(d).read_bytes()
    header, body = raw.split(b"\n", 1)
    head, table = body.split(b"\n", 1)
    doc = json.loads(head)
    change(doc)
    body = json.dumps(doc, separators=(",", ":")).encode() + b"\n" + table
    record_path(d).write_bytes(header.split(b" ")[0] + b" %s %d %08x\n" % (header.split(b" ")[1], len(body),
                                                                           crc32c.crc32c(body)) + body)


@pytest.mark.parametrize("field", ["writer", "meta", "nbytes", "blobs.device", "writer=null", "meta=null",
                                   "an unknown field"])
def test_an_optional_record_field_may_be_absent(tmp_path, field):
    ckptstore.save({"w": torch.arange(3), "n": 2}, tmp_path / "c", storage_options={})

    def change(doc):
        if field == "an unknown field":
            doc["from_the_future"] = {"x": 1}
        elif field.endswith("=null"):
            doc[field[:-5]] = None
        elif field.startswith("blobs."):
            doc["blobs"].pop("device", None)
        else:
            del doc[field]
    _rewrite_head(tmp_path / "c", change)
    got = ckptstore.load(tmp_path / "c")
    assert torch.equal(got["w"], torch.arange(3)) and got["n"] == 2
    assert ckptstore.verify(tmp_path / "c", deep=True).ok


@pytest.mark.parametrize("field", ["format", "version", "generation", "created", "files", "blobs", "tensors",
                                   "pickled", "files.name", "files.nbytes", "files.crc32c", "blobs.nbytes",
                                   "blobs.crc32c", "blobs.kind", "blobs.devices"])
def test_a_record_without_a_required_field_is_not_intact(tmp_path, field):
    ckptstore.save({"w": torch.arange(3)}, tmp_path / "c")

    def change(doc):
        top, _, sub = field.partition(".")
        if not sub:
            del doc[top]
        elif top == "files":
            del doc["files"][0][sub]
        else:
            del doc["blobs"][sub]
    _rewrite_head(tmp_path / "c", change)
    with pytest.raises(CorruptCheckpointError, match="not intact"):
        ckptstore.load(tmp_path / "c")
    assert not ckptstore.verify(tmp_path / "c").ok


def test_a_recorded_device_goes_where_map_location_says_and_a_missing_one_is_not_corruption(tmp_path):
    from ckptstore.errors import CheckpointError
    d = tmp_path / "c"
    ckptstore.save({"w": torch.arange(3)}, d)
    _rewrite_head(d, lambda doc: doc["blobs"].__setitem__("devices", ["cuda:7"]))
    assert torch.equal(ckptstore.load(d, map_location="cpu")["w"], torch.arange(3))
    assert ckptstore.load(d, map_location="meta")["w"].is_meta
    if not (torch.cuda.is_available() and torch.cuda.device_count() > 7):
        with pytest.raises(CheckpointError) as e:
            ckptstore.load(d)
        assert not isinstance(e.value, CorruptCheckpointError), e.value
        assert "cuda:7" in str(e.value) and "map_location" in str(e.value)
    assert ckptstore.verify(d, deep=True).ok
    _rewrite_head(d, lambda doc: doc["blobs"].__setitem__("devices", ["no-such-device"]))
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(d)
    assert not ckptstore.verify(d).ok


def test_load_checks_blob_crcs_and_only_verify_deep_checks_file_crcs_and_xxh3(tmp_path):
    d = tmp_path / "c"
    ckptstore.save({"w": torch.arange(3)}, d)
    # A lie in a whole file's CRC-32C: load does not check it, verify(deep=True) does.
    _rewrite_head(d, lambda doc: doc["files"][0].__setitem__("crc32c", "%08x" % (int(doc["files"][0]["crc32c"],
                                                                                       16) ^ 1)))
    assert torch.equal(ckptstore.load(d)["w"], torch.arange(3))
    assert ckptstore.verify(d).ok
    report = ckptstore.verify(d, deep=True)
    assert not report.ok and "CRC-32C" in report.problems[0] and "data file" in report.problems[0]
    # A lie in a blob's CRC-32C: load refuses it.
    ckptstore.save({"w": torch.arange(3)}, d)
    _rewrite_head(d, lambda doc: doc["blobs"].__setitem__("crc32c", "%08x" % (int(doc["blobs"]["crc32c"], 16) ^ 1)))
    with pytest.raises(CorruptCheckpointError, match="CRC-32C"):
        ckptstore.load(d)
    assert not ckptstore.verify(d, deep=True).ok
    # A lie in a version 3 blob's xxh3-128: load does not check it, verify(deep=True) does.
    run = tmp_path / "run"
    with ckptstore.CheckpointManager(str(run), incremental=True) as mgr:
        mgr.save(1, {"w": torch.arange(3)})
    step = run / "step-1"
    _rewrite_head(step, lambda doc: doc["blobs"].__setitem__("xxh3", "0" * 32))
    assert torch.equal(ckptstore.load(step)["w"], torch.arange(3))
    report = ckptstore.verify(step, deep=True)
    assert not report.ok and "xxh3-128" in " ".join(report.problems)


def test_part_size_is_at_least_one_mib(tmp_path):
    from ckptstore.errors import CheckpointError
    with pytest.raises(CheckpointError, match="1MiB"):
        ckptstore.save({"w": torch.ones(3)}, tmp_path / "c", storage_options={"part_size": "1048575"})
    ckptstore.save({"w": torch.ones(3)}, tmp_path / "c", storage_options={"part_size": "1048576"})
    assert torch.equal(ckptstore.load(tmp_path / "c")["w"], torch.ones(3))
