"""Lossless compression (API.md, "Space: fitting a run into the storage a user has").

``compression="zstd"`` stores tensors and arrays as byte-grouped zstd frames
(docs/format.md, "Version 5.0"); ``"auto"`` does where the backend is slower
than the compressor. Every value comes back bit for bit (every dtype, NaN
payloads, -0.0, subnormals); every guarantee of an uncompressed checkpoint
holds: checksums (a flipped byte is CorruptCheckpointError), select/into/open
reading only what they need (counted on the wire through a proxy in front of
moto's S3), incremental reuse by the uncompressed bytes across compressed and
uncompressed steps, verify(deep=True), export, and a frame that claims more
bytes than the record gives is refused before anything is allocated.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
import zstandard

import ckptstore
from ckptstore.cli import main as cli
from ckptstore.errors import CorruptCheckpointError, FormatTooNewError
from ckptstore.format import manifest
from ckptstore.format.manifest import FileEntry, Manifest
from conftest import BUCKET
from helpers.compare import assert_state_equal
from helpers.faultproxy import FaultProxy
from test_roundtrip import ALL_DTYPES, random_tensor

GEN = torch.Generator().manual_seed(30)


def trained_like(n: int, dtype=torch.float32) -> torch.Tensor:
    """Weights of a trained model's shape of values: small normal numbers (exponents alike)."""
    return (torch.randn(n, generator=GEN) * 0.02).to(dtype)


def specials() -> torch.Tensor:
    """float32 bytes a lossy path would change: NaN payloads, both zeros, subnormals, infinities."""
    bits = np.array([0x7FC00000, 0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000000, 0x00000001,
                     0x807FFFFF, 0x7F800000, 0xFF800000], dtype=np.uint32)
    t = trained_like(1 << 18)
    t.view(torch.int32)[: len(bits) * 1000] = torch.from_numpy(np.tile(bits, 1000).view(np.int32))
    return t


def _record(d: Path) -> Path:
    (name,) = [n for n in os.listdir(d) if n.endswith(".commit")]
    return d / name


def _manifest(d: Path) -> Manifest:
    return Manifest.from_bytes(_record(d).read_bytes(), str(d))


def _bits_equal(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------- round trip

def test_every_dtype_and_every_special_float_comes_back_bit_for_bit(tmp_path):
    state = {str(d): random_tensor(d, 40, 1024) for d in ALL_DTYPES}   # 40 KiB to 320 KiB each
    state["specials"] = specials()
    state["bf16"] = trained_like(3 << 19, torch.bfloat16)       # several frames, last one short
    state["odd"] = trained_like(300001)                           # a tail that is not a whole frame
    state["view"] = state["odd"][1001:].view(-1, 100)[::2]        # a view of a compressed storage
    state["array"] = np.random.default_rng(0).standard_normal(100000)
    state["small"] = torch.arange(10)                             # too small to compress: stored raw
    ckptstore.save(state, tmp_path / "c", compression="zstd")
    m = _manifest(tmp_path / "c")
    assert m.version == (5, 0) and m.blobs.codec
    got = ckptstore.load(tmp_path / "c")
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(got[k].view(np.uint8), v.view(np.uint8))
        else:
            _bits_equal(got[k], v)
    assert got["view"].untyped_storage().data_ptr() == got["odd"].untyped_storage().data_ptr()
    assert ckptstore.verify(tmp_path / "c", deep=True).ok


def test_floats_are_grouped_by_their_element_size_and_shrink(tmp_path):
    state = {"bf16": trained_like(1 << 20, torch.bfloat16), "fp32": trained_like(1 << 20)}
    info = ckptstore.save(state, tmp_path / "c", compression="zstd")
    m = _manifest(tmp_path / "c")
    groups = {f.group for f in m.blobs.codec.values()}
    assert groups == {2, 4}
    assert info.logical_nbytes == 6 << 20
    assert info.nbytes < 0.9 * info.logical_nbytes, (info.nbytes, info.logical_nbytes)


def test_auto_keeps_local_saves_raw_and_compresses_where_bytes_cost(tmp_path, moto_server):
    state = {"w": trained_like(1 << 18), "noise": random_tensor(torch.uint8, 1 << 18)}
    ckptstore.save(state, tmp_path / "c", compression="auto")
    m = _manifest(tmp_path / "c")
    assert m.version == (2, 0) and not m.blobs.codec       # a local disk outruns the compressor
    uri = (f"s3://{BUCKET}/auto-{uuid.uuid4().hex}/c?endpoint_url={moto_server.endpoint}"
           f"&key={moto_server.key}&secret={moto_server.secret}")
    ckptstore.save(state, uri, compression="auto")
    desc = ckptstore.api.info(uri)
    assert desc["format"] == "5.0" and desc["compressed"] == 1      # the weights; random bytes stay raw
    assert_state_equal(ckptstore.load(uri), state)


def test_a_bad_compression_value_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        ckptstore.save({"w": torch.ones(3)}, tmp_path / "c", compression="gzip")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="compression"):
        ckptstore.CheckpointManager(tmp_path / "run", compression=True)


# ---------------------------------------------------------------- reading only what is needed

def test_select_into_and_open_read_only_the_selected_frames_on_s3(moto_server):
    model = {f"layer{i}": trained_like(1 << 18) for i in range(4)}                    # 4 MiB
    optimizer = {f"{k}.{s}": trained_like(1 << 18) for k in model for s in ("exp_avg", "exp_avg_sq")}
    with FaultProxy("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1]), seed=0) as proxy:
        uri = (f"s3://{BUCKET}/compressed-select-{uuid.uuid4().hex}/c?endpoint_url={proxy.endpoint}"
               f"&key={moto_server.key}&secret={moto_server.secret}")
        ckptstore.save({"model": model, "optimizer": optimizer}, uri, compression="zstd")
        m = Manifest.from_bytes(ckptstore.api.open_store(uri).get(
            [n for n in ckptstore.api.open_store(uri).list() if n.endswith(".commit")][0]), uri)
        stored_model = sum(int(m.blobs.sizes[i]) for i in range(4))
        logical_model = 4 << 20
        assert stored_model < 0.9 * logical_model
        granule = 4 << 20

        before = proxy.stats["bytes_down"]
        got = ckptstore.load(uri, select="model")
        moved = proxy.stats["bytes_down"] - before
        assert_state_equal(got["model"], model)
        assert stored_model <= moved <= stored_model + 64 * 1024 + granule, (moved, stored_model)

        dst = {"model": {"layer1": torch.zeros(1 << 18)}}
        before = proxy.stats["bytes_down"]
        ckptstore.load(uri, select=("model", "layer1"), into=dst)
        moved = proxy.stats["bytes_down"] - before
        _bits_equal(dst["model"]["layer1"], model["layer1"])
        assert moved <= int(m.blobs.sizes[1]) + 64 * 1024 + granule, moved

        before = proxy.stats["bytes_down"]
        with ckptstore.open(uri) as view:
            listed = dict(view.tensors())
            record_only = proxy.stats["bytes_down"] - before
            assert listed[("model", "layer2")].nbytes == 1 << 20        # TensorInfo.nbytes is logical
            _bits_equal(view["model"]["layer2"], model["layer2"])
        assert record_only < 64 * 1024, record_only


def test_into_fills_the_very_tensors_given_from_compressed_frames(tmp_path):
    model = torch.nn.Linear(1024, 512)
    state = {"model": model.state_dict()}
    ckptstore.save(state, tmp_path / "c", compression="zstd")
    fresh = torch.nn.Linear(1024, 512)
    ptr = fresh.weight.data_ptr()
    ckptstore.load(tmp_path / "c", into={"model": fresh.state_dict()})
    assert fresh.weight.data_ptr() == ptr
    _bits_equal(fresh.weight.detach(), model.weight.detach())


# ---------------------------------------------------------------- damage and hostile frames

def _compressed_span(d: Path) -> tuple[Manifest, int, int, int]:
    """(record, blob, its stored start in the one data file, stored size) of the largest compressed blob."""
    m = _manifest(d)
    i = max(m.blobs.codec, key=lambda b: int(m.blobs.sizes[b]))
    return m, i, int(m.blobs.starts[i]), int(m.blobs.sizes[i])


@pytest.mark.parametrize("where", [0.0, 0.001, 0.3, 0.5, 0.77, 0.999])
def test_a_flipped_byte_in_a_compressed_frame_is_corrupt(tmp_path, where):
    ckptstore.save({"w": trained_like(3 << 18), "b": trained_like(100000)}, tmp_path / "c", compression="zstd")
    m, i, start, size = _compressed_span(tmp_path / "c")
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin"]
    raw = bytearray(data.read_bytes())
    raw[start + min(int(where * size), size - 1)] ^= 0x04
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(tmp_path / "c")
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(tmp_path / "c", select="w")
    assert not ckptstore.verify(tmp_path / "c", deep=True).ok


def _rewrite_blob(d: Path, m: Manifest, i: int, stored: bytes) -> None:
    """Replace blob ``i``'s stored bytes (same length) and fix every checksum that covers them,
    as someone crafting a hostile checkpoint would."""
    (data,) = [p for p in d.iterdir() if p.suffix == ".bin"]
    raw = bytearray(data.read_bytes())
    start = int(m.blobs.starts[i])
    raw[start:start + len(stored)] = stored
    data.write_bytes(bytes(raw))
    m.blobs.crcs[i] = crc32c.crc32c(stored)
    files = [FileEntry(f.name, f.nbytes, crc32c.crc32c(bytes(raw)), f.dir) for f in m.files]
    _record(d).write_bytes(m.replace(files=files).to_bytes())


def _bomb(claim: int, size: int) -> bytes:
    """A well-formed zstd frame of ``size`` bytes that claims to hold ``claim`` bytes: a raw block."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", claim)   # single segment, 8-byte size
    n = size - len(header) - 3
    return header + struct.pack("<I", 1 | (n << 3))[:3] + b"\0" * n


def test_a_frame_that_claims_two_to_the_forty_bytes_is_refused_not_allocated(tmp_path):
    ckptstore.save({"w": trained_like(1 << 18)}, tmp_path / "c", compression="zstd")
    m, i, start, size = _compressed_span(tmp_path / "c")
    first = m.blobs.codec[i].sizes[0]
    bomb = _bomb(1 << 40, first)
    assert zstandard.frame_content_size(bomb) == 1 << 40
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin"]
    stored = bomb + data.read_bytes()[start + first:start + size]
    _rewrite_blob(tmp_path / "c", m, i, stored)
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match="claims 1099511627776 bytes"):
            ckptstore.load(tmp_path / "c", verify=verify)
    rep = ckptstore.verify(tmp_path / "c", deep=True)
    assert not rep.ok and "claims" in rep.problems[0]


def test_frames_altered_with_every_checksum_fixed_are_still_refused(tmp_path):
    """The record's CRCs recomputed over altered frames: zstd's own content checksum and the
    record's xxh3-128 still catch it; nothing else than CorruptCheckpointError comes out."""
    ckptstore.save({"w": trained_like(3 << 18)}, tmp_path / "c", compression="zstd")
    m0, i, start, size = _compressed_span(tmp_path / "c")
    original = (tmp_path / "c").joinpath([p.name for p in (tmp_path / "c").iterdir() if p.suffix == ".bin"][0])
    base = original.read_bytes()
    record = _record(tmp_path / "c").read_bytes()
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, size, 12).tolist():
        stored = bytearray(base[start:start + size])
        stored[pos] ^= 1 << int(rng.integers(0, 8))
        original.write_bytes(base)
        _record(tmp_path / "c").write_bytes(record)
        m = _manifest(tmp_path / "c")
        _rewrite_blob(tmp_path / "c", m, i, bytes(stored))
        with pytest.raises(CorruptCheckpointError):
            ckptstore.load(tmp_path / "c", verify=False)
        assert not ckptstore.verify(tmp_path / "c", deep=True).ok


def test_a_record_with_an_unknown_codec_is_too_new_not_corrupt(tmp_path):
    ckptstore.save({"w": trained_like(1 << 18)}, tmp_path / "c", compression="zstd")
    raw = _record(tmp_path / "c").read_bytes()
    head, body = raw.split(b"\n", 1)
    doc_raw, nodes = body.split(b"\n", 1)
    doc = json.loads(doc_raw)
    doc["blobs"]["codec"]["name"] = "zstd2"
    body = json.dumps(doc, separators=(",", ":")).encode() + b"\n" + nodes
    _record(tmp_path / "c").write_bytes(b"CKPTSTORE 5 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body)
    with pytest.raises(FormatTooNewError, match="codec"):
        ckptstore.load(tmp_path / "c")


def test_a_ckptstore_that_knows_only_version_4_refuses_a_compressed_step(tmp_path, monkeypatch):
    ckptstore.save({"w": trained_like(1 << 18)}, tmp_path / "c", compression="zstd")
    monkeypatch.setattr(manifest, "READABLE_MAJORS", (1, 2, 3, 4))
    with pytest.raises(FormatTooNewError, match="newer ckptstore"):
        ckptstore.load(tmp_path / "c")


# ---------------------------------------------------------------- the manager, incremental, export, CLI

def test_incremental_reuse_goes_by_the_uncompressed_bytes_both_ways(tmp_path):
    run = tmp_path / "run"
    w, m1, m2 = trained_like(1 << 19), trained_like(1 << 19), trained_like(1 << 19)
    with ckptstore.CheckpointManager(run, incremental=True, compression="zstd") as mgr:
        first = mgr.save(1, {"w": w, "m": m1})
    with ckptstore.CheckpointManager(run, incremental=True) as mgr:
        second = mgr.save(2, {"w": w, "m": m2})               # w reused compressed; m2 written raw
    with ckptstore.CheckpointManager(run, incremental=True, compression="zstd") as mgr:
        third = mgr.save(3, {"w": w, "m": m2})                # everything reused: m2 stays raw
        assert third.nbytes == 0
        assert second.nbytes == 2 << 20 and first.nbytes < 0.9 * (4 << 20)
        for step, m in ((1, m1), (2, m2), (3, m2)):
            got = mgr.restore(step)
            _bits_equal(got["w"], w)
            _bits_equal(got["m"], m)
            assert ckptstore.verify(run / f"step-{step}", deep=True).ok
    records = {s: _manifest(run / f"step-{s}") for s in (1, 2, 3)}
    assert records[1].version[0] == 5 and records[2].version[0] == 5 and len(records[3].blobs.codec) == 1
    assert records[3].logical == 4 << 20 and records[3].stored < 4 << 20


def test_the_manager_compresses_async_saves_and_restores_them(tmp_path):
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    with ckptstore.CheckpointManager(tmp_path / "run", async_save=True, compression="zstd", keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"model": model.state_dict(), "optim": opt.state_dict()})
        mgr.wait()
        assert mgr.steps() == [2, 3]
        got = mgr.restore()
    assert_state_equal(got, {"model": model.state_dict(), "optim": opt.state_dict()})
    assert _manifest(tmp_path / "run" / "step-3").version[0] == 5


def test_export_and_copy_of_a_compressed_checkpoint(tmp_path):
    from safetensors.torch import load_file
    state = {"model": {"w": trained_like(1 << 19), "b": trained_like(1000)}, "optim": {"m": trained_like(1 << 19)}}
    ckptstore.save(state, tmp_path / "c", compression="zstd")
    ckptstore.export(tmp_path / "c", tmp_path / "m.safetensors", select="model")
    exported = load_file(str(tmp_path / "m.safetensors"))
    _bits_equal(exported["w"], state["model"]["w"])
    assert cli(["cp", str(tmp_path / "c"), str(tmp_path / "copy")]) == 0
    assert_state_equal(ckptstore.load(tmp_path / "copy"), state)
    assert _manifest(tmp_path / "copy").blobs.codec


def test_ls_and_info_show_stored_and_logical_sizes(tmp_path, capsys):
    info = ckptstore.save({"w": trained_like(1 << 20)}, tmp_path / "run" / "step-1", compression="zstd")
    assert info.logical_nbytes == 4 << 20 and info.nbytes < info.logical_nbytes
    with ckptstore.open(tmp_path / "run" / "step-1") as view:
        assert view.info.logical_nbytes == 4 << 20 and view.info.nbytes == info.nbytes
    assert cli(["ls", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "stored" in out and "4.0 MiB logical" in out, out
    assert cli(["info", str(tmp_path / "run" / "step-1")]) == 0
    out = capsys.readouterr().out
    assert f"({info.nbytes} bytes) of 4.0 MiB ({4 << 20} bytes) logical" in out, out
    assert cli(["info", "--json", str(tmp_path / "run" / "step-1")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stored"] == info.nbytes and d["logical"] == 4 << 20 and d["compressed"] == 1


def test_into_tied_weights_and_views_from_compressed_blobs(tmp_path):
    emb = trained_like(1 << 18).reshape(512, 512)
    state = {"model": {"embed": emb, "head": emb, "half": emb[:, :256]}}        # one storage, three users
    ckptstore.save(state, tmp_path / "c", compression="zstd")
    assert len(_manifest(tmp_path / "c").blobs.codec) == 1
    shared = torch.zeros(512, 512)
    dst = {"model": {"embed": shared, "head": shared, "half": torch.zeros(512, 256)}}
    ckptstore.load(tmp_path / "c", into=dst)
    _bits_equal(shared, emb)
    _bits_equal(dst["model"]["half"], emb[:, :256].contiguous())
    alone = torch.zeros(512, 512)
    ckptstore.load(tmp_path / "c", select=("model", "head"), into={"model": {"head": alone}})
    _bits_equal(alone, emb)


def test_blobs_past_what_a_save_keeps_are_compressed_again_as_written(tmp_path, monkeypatch, moto_server):
    """A save keeps at most HOLD compressed bytes in memory; the rest are compressed a second
    time while written (sizes from the first pass), on a disk and through S3's parallel parts."""
    from ckptstore import compress
    monkeypatch.setattr(compress, "HOLD", 1 << 20)
    state = {f"w{i}": trained_like(3 << 18) for i in range(4)}
    s3 = (f"s3://{BUCKET}/again-{uuid.uuid4().hex}/c?endpoint_url={moto_server.endpoint}"
          f"&key={moto_server.key}&secret={moto_server.secret}&part_size=1MiB")
    for uri in (str(tmp_path / "c"), s3):
        info = ckptstore.save(state, uri, compression="zstd")
        assert info.nbytes < 0.9 * info.logical_nbytes
        assert_state_equal(ckptstore.load(uri), state)
        assert ckptstore.verify(uri, deep=True).ok


def test_a_tensor_that_changes_between_the_two_passes_is_refused(tmp_path):
    from ckptstore import compress
    from ckptstore.errors import CheckpointError
    from ckptstore.format import tree
    w = trained_like(1 << 20)
    _, blobs = tree.encode({"w": w})
    (b,) = blobs
    stored, _ = compress._compress(b, 4, False, compress.cf.ThreadPoolExecutor(2), keep=False, digest=True)
    assert isinstance(stored.source, compress.Recompress)
    w.copy_(torch.randn(1 << 20, generator=GEN))          # noise: compresses to another size
    with pytest.raises(CheckpointError, match="changed while it was being saved"):
        list(stored.source.stored_chunks())


def test_a_compressed_load_on_s3_takes_no_more_requests_than_an_uncompressed_one(moto_server):
    """Large (compressed) and small (raw) tensors interleaved, as a model's weights and biases
    are: the raw ones between compressed ones go in the same runs of reads."""
    state = {}
    for i in range(24):
        state[f"layer{i}.weight"] = trained_like(1 << 17)       # 512 KiB: compressed
        state[f"layer{i}.bias"] = trained_like(1000)            # 4 KB: raw
    with FaultProxy("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1]), seed=0) as proxy:
        counts = {}
        for compression in (None, "zstd"):
            uri = (f"s3://{BUCKET}/requests-{uuid.uuid4().hex}/c?endpoint_url={proxy.endpoint}"
                   f"&key={moto_server.key}&secret={moto_server.secret}")
            ckptstore.save(state, uri, compression=compression)
            before = proxy.stats["requests"]
            assert_state_equal(ckptstore.load(uri), state)
            counts[compression] = proxy.stats["requests"] - before
    assert counts["zstd"] <= counts[None], counts
