"""Untrusted checkpoints are safe to open (guarantee 7), by property-based tests.

Hypothesis builds valid states, saves them, and then either lies in the
commit record with its CRC recomputed (so only the structure checks stand
between the lie and the reader) or mutates bytes of the record or a data file
without fixing anything, on local disk and on S3 (moto). Whatever comes out,
`load`, `verify(deep=True)`, `ckptstore.api.info`, the manager's `restore`
and `ckptstore verify` / `info` must give a correct answer or a
`CheckpointError`: never another exception, never a hang (10 s per case, a
guard, not a speed target), never a peak RSS far beyond the checkpoint's
size (the process's high-water mark is reset before each case), never a file
opened outside the checkpoint's directory (an audit hook records every open
of the process). Foreign files get the same: torch.save files whose pickle is
mutated or malicious, zip archives with escaping member names, safetensors
headers that lie. And `verify(deep=True)` reports a problem exactly when
`load` refuses the checkpoint as corrupt, but for what only verify checks (a
data file's whole CRC-32C, a blob's xxh3-128). Deterministic by seed; `make
fuzz` runs the same properties with many more cases and random seeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import struct
import sys
import time
import uuid
import zipfile
from pathlib import Path

import crc32c
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ckptstore
from ckptstore.api import info
from ckptstore.cli import main as cli
from ckptstore.errors import CheckpointError, CorruptCheckpointError, FormatTooNewError, UnsafeCheckpointError
from conftest import BUCKET
from helpers.compare import assert_state_equal

CASES = int(os.environ.get("CKPTSTORE_FUZZ_CASES", "150"))
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize="CKPTSTORE_FUZZ_CASES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
# The S3 properties cost a round trip per request: a third of the cases.
S3_SETTINGS = settings(SETTINGS, max_examples=max(10, CASES // 3))
HANG_GUARD_S = 10.0
# Peak RSS a case may add: a reader may hold a few copies of the checkpoint
# (the records it parses, the tensors it builds), never what a lie claims.
RSS_ALLOWANCE = 96 << 20

# ---------------------------------------------------------------- every file the process opens

_opened: list[str] = []
_watching = [False]


def _audit(event: str, args) -> None:
    if _watching[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watching_opens():
    _opened.clear()
    _watching[0] = True
    try:
        yield _opened
    finally:
        _watching[0] = False


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextlib.contextmanager
def bounded(nbytes: int):
    """Fail if the block takes over HANG_GUARD_S or lifts peak RSS far beyond ``nbytes``."""
    Path("/proc/self/clear_refs").write_text("5")      # reset the high-water mark (VmHWM) to now
    before = _rss_kib("VmRSS") << 10
    t0 = time.monotonic()
    yield
    seconds = time.monotonic() - t0
    grew = (_rss_kib("VmHWM") << 10) - before
    assert seconds < HANG_GUARD_S, f"took {seconds:.1f} s"
    assert grew < RSS_ALLOWANCE + 4 * nbytes, f"peak RSS grew by {grew >> 20} MiB for {nbytes} bytes"


def _quiet_cli(args) -> int:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(args)
    assert code in (0, 1), (code, err.getvalue())
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return code


# ---------------------------------------------------------------- valid states

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
          torch.bool, torch.complex64]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    n = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else \
        torch.empty(shape, dtype=dtype)
    if draw(st.booleans()) and t.dim() == 2:
        t = t.t()
    return t


leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                   st.binary(max_size=40), tensors())
keys = st.one_of(st.text(max_size=8), st.integers(-5, 10 ** 6))
states = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.tuples(kids, kids), st.dictionaries(keys, kids, max_size=4)), max_leaves=12)


# ---------------------------------------------------------------- lies in an intact record

HOSTILE = [None, True, -1, 0, 2 ** 40, 2 ** 63, 2 ** 70, -2 ** 63, 1e20, 1.5, "", "x", "../../sentinel",
           "/etc/passwd", "qint8", "quint4x2", [], [0], [[]], {}, {"x": 1}, "0" * 5000, [2 ** 40] * 3, "nan",
           float("nan"), float("inf"), 10 ** 40, "x" * (1 << 20)]


def _paths(doc, prefix=()):
    """Every (path to a value) in a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _replace(doc, path, value):
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def _record(d: Path) -> Path:
    (name,) = [n for n in os.listdir(d) if n.endswith(".commit")]
    return d / name


DEEP = "<3000 levels of nested arrays>"   # spliced in as text: json.dumps itself would recurse
_DEEP_TEXT = b"[" * 3000 + b"]" * 3000


def _dump(v) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode().replace(json.dumps(DEEP).encode(), _DEEP_TEXT)


# ---------------------------------------------------------------- what every reader must do

def _not_a_storage_fault(e: CheckpointError) -> None:
    # The storage works: whatever a tampered checkpoint makes a reader raise is
    # about its content (corrupt; unsafe where it claims pickled values; too new
    # where its version lies), never a StorageError or a miss.
    assert isinstance(e, (CorruptCheckpointError, UnsafeCheckpointError, FormatTooNewError)), \
        f"{type(e).__name__}: {e}"


# What verify(deep=True) checks and load does not (docs/format.md, "What each reader checks"):
# a whole data file's CRC-32C, a blob's xxh3-128. A problem of another kind that verify
# reports, load must refuse too.
_ONLY_VERIFY_CHECKS = re.compile(r"^data file \S+: CRC-32C [0-9a-f]{8}, the commit record says [0-9a-f]{8}$"
                                 r"|^blob \d+ \(\d+ bytes[^)]*\): xxh3-128 ")


def verify_agrees_with_load(load_error: CheckpointError | None, report) -> None:
    """verify(deep=True) refuses exactly what load refuses as corrupt (or too new), and passes
    what load returns, but for the checks only verify makes."""
    if isinstance(load_error, (CorruptCheckpointError, FormatTooNewError)):
        assert not report.ok, f"load refused it ({type(load_error).__name__}: {load_error}) but " \
                              "verify(deep=True) reports it ok"
    elif load_error is None:
        assert report.ok or all(_ONLY_VERIFY_CHECKS.search(p) for p in report.problems), \
            f"load returned it, but verify(deep=True) reports {report.problems}"


def _readers(uri: str, storage_options=None) -> object:
    """Run every reader over ``uri``; returns what load gave (or None). Fails on any non-CheckpointError,
    and where verify(deep=True) and load disagree."""
    loaded, load_error = None, None
    try:
        loaded = ckptstore.load(uri, storage_options=storage_options)
        event("load: returned")
    except CheckpointError as e:
        load_error = e
        event(f"load: {type(e).__name__}")
        _not_a_storage_fault(e)
    try:
        report = ckptstore.verify(uri, deep=True, storage_options=storage_options)
    except CheckpointError as e:
        _not_a_storage_fault(e)
    else:
        event(f"verify(deep=True): {'ok' if report.ok else 'problems'}")
        verify_agrees_with_load(load_error, report)
    try:
        info(uri, storage_options=storage_options)
    except CheckpointError as e:
        _not_a_storage_fault(e)
    _partial_readers(uri, storage_options)
    if storage_options is None:
        _quiet_cli(["verify", "--deep", uri])
        _quiet_cli(["info", uri])
        _quiet_cli(["info", "--tensors", uri])
    return loaded


def _partial_readers(uri: str, storage_options=None) -> None:
    """open, tensors(), select= and into= over the paths the record itself lists."""
    try:
        with ckptstore.open(uri, storage_options=storage_options) as view:
            listed = list(view.tensors())
            keys = view.keys()
            if keys:
                view.load(select=(keys[0],))
            small = [(p, t) for p, t in listed if t.nbytes <= 1 << 20][:8]
            into: dict = {}
            for path, t in small:
                at = into
                for k in path[:-1]:
                    at = at.setdefault(k, {}) if isinstance(at, dict) else None
                    if at is None:
                        break
                if isinstance(at, dict) and path:
                    at[path[-1]] = torch.empty(t.shape, dtype=t.dtype)
            if into:
                try:
                    view.load(into=into)
                except (KeyError, ValueError) as e:
                    # An into= built from the record fits it, unless a container on the
                    # way is a list: the tree above used dicts for every level.
                    assert isinstance(e, (KeyError, ValueError)) and "not a container" not in str(e), e
    except CheckpointError as e:
        _not_a_storage_fault(e)


def _every_reader(d: Path) -> object:
    """Every reader over a local checkpoint, bounded in time and memory, watching what it opens."""
    size = sum(p.stat().st_size for p in d.iterdir())
    with watching_opens() as opened, bounded(size):
        loaded = _readers(str(d))
    outside = [p for p in opened if p.startswith(str(d.parent)) and not p.startswith(str(d) + os.sep)
               and os.path.realpath(p) != str(d)]
    assert not outside, f"opened outside the checkpoint: {outside}"
    return loaded


def _lie(raw: bytes, data, extra: list | None = None) -> bytes | None:
    """The commit record ``raw`` with one value replaced by a hostile one (or one of ``extra``),
    its CRC recomputed; the record's major version is kept."""
    major = int(raw.split(b" ", 2)[1])
    head_raw, nodes_raw = raw.split(b"\n", 1)[1].split(b"\n", 1)
    doc = {"head": json.loads(head_raw), "nodes": json.loads(nodes_raw)}
    path = data.draw(st.sampled_from(_paths(doc)[1:]), label="path")
    value = data.draw(st.sampled_from(HOSTILE + [DEEP] + list(extra or [])), label="value")
    doc = _replace(doc, path, value)
    if not isinstance(doc.get("head"), dict):
        return None
    body = _dump(doc["head"]) + b"\n" + _dump(doc["nodes"])
    return b"CKPTSTORE %d %d %08x\n" % (major, len(body), crc32c.crc32c(body)) + body


def _mutate(raw: bytes, pos: float, how: str) -> bytes | None:
    """``raw`` with one byte flipped or zeroed, cut short, or one byte longer; None if unchanged."""
    raw = bytearray(raw)
    if not raw and how in ("flip", "zero", "truncate"):
        return None
    i = min(int(pos * len(raw)), max(len(raw) - 1, 0))
    if how == "flip":
        raw[i] ^= 0x10
    elif how == "truncate":
        del raw[i:]
    elif how == "append":
        raw += b"\x00"
    elif raw[i] == 0:
        return None                  # zeroing a zero changes nothing
    else:
        raw[i] = 0
    return bytes(raw)


@SETTINGS
@given(state=states, data=st.data())
def test_a_record_that_lies_with_its_crc_recomputed_is_a_correct_load_or_a_checkpoint_error(tmp_path_factory,
                                                                                           state, data):
    root = tmp_path_factory.mktemp("lie")
    (root / "sentinel").write_text("must never be opened")
    d = root / "c"
    ckptstore.save({"s": state}, d)
    lied = _lie(_record(d).read_bytes(), data)
    if lied is None:
        return
    _record(d).write_bytes(lied)
    _every_reader(d)


@SETTINGS
@given(state=states, data=st.data())
def test_an_incremental_record_that_lies_is_a_correct_load_or_a_checkpoint_error(tmp_path_factory, state, data):
    """Version 3 records (references into the run's shared files): lying starts, sizes,
    hashes, CRCs, directories, and names of shared files that are missing or hold other bytes."""
    root = tmp_path_factory.mktemp("lie3")
    (root / "sentinel").write_text("must never be opened")
    run = root / "run"
    with ckptstore.CheckpointManager(str(run), incremental=True) as mgr:
        mgr.save(1, {"s": state, "other": torch.arange(100)})
        mgr.save(2, {"s": state, "new": torch.ones(33)})
    d = run / "step-2"
    shared = sorted(p.name for p in (run / ".shared").iterdir())
    foreign = [shared[0], shared[-1], "0000000000000000-00000000-00000.bin", "../sentinel", ".shared",
               "ffffffffffffffff-ffffffff-99999.bin", "0" * 32, "f" * 32]
    lied = _lie(_record(d).read_bytes(), data, extra=foreign)
    if lied is None:
        return
    _record(d).write_bytes(lied)
    size = sum(p.stat().st_size for p in (run / ".shared").iterdir())
    with watching_opens() as opened, bounded(size):
        _readers(str(d))
    allowed = (str(d) + os.sep, str(run / ".shared") + os.sep)
    outside = [p for p in opened if p.startswith(str(root)) and not p.startswith(allowed)
               and os.path.realpath(p) not in (str(d), str(run / ".shared"))]
    assert not outside, f"opened outside the step and its run's shared files: {outside}"


# Two frames of small normal floats: a compressed blob (docs/format.md, "Version 5.0").
_COMPRESSIBLE = (torch.randn(300000, generator=torch.Generator().manual_seed(5)) * 0.02)


@SETTINGS
@given(state=states, data=st.data(), frames=st.booleans(), pos=st.floats(0, 1),
       how=st.sampled_from(["flip", "zero", "bomb"]))
def test_a_compressed_checkpoint_that_lies_is_a_correct_load_or_a_checkpoint_error(tmp_path_factory, state, data,
                                                                                   frames, pos, how):
    """Version 5 records: a lie in the record (codec column included), or a compressed frame
    altered (a byte flipped or zeroed, or replaced by a frame claiming 2**40 bytes) with every
    CRC-32C that covers it recomputed. Decompression bombs are refused, never allocated
    (the RSS bound), and a load that succeeds returns what was saved."""
    from ckptstore.format.manifest import FileEntry, Manifest
    d = tmp_path_factory.mktemp("lie5") / "c"
    saved = {"s": state, "w": _COMPRESSIBLE}
    ckptstore.save(saved, d, compression="zstd")
    raw = _record(d).read_bytes()
    if not frames:
        lied = _lie(raw, data)
        if lied is None:
            return
        _record(d).write_bytes(lied)
        _every_reader(d)
        return
    m = Manifest.from_bytes(raw, str(d))
    (i,) = list(m.blobs.codec)
    (data_file,) = [p for p in d.iterdir() if p.suffix == ".bin"]
    stream = bytearray(data_file.read_bytes())
    start, size = int(m.blobs.starts[i]), int(m.blobs.sizes[i])
    at = start + min(int(pos * size), size - 1)
    if how == "flip":
        stream[at] ^= 0x01
    elif how == "zero":
        stream[at] = 0
    else:
        n = m.blobs.codec[i].sizes[0]
        header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", 1 << 40)
        block = n - len(header) - 3
        stream[start:start + n] = header + struct.pack("<I", 1 | (block << 3))[:3] + b"\0" * block
    data_file.write_bytes(bytes(stream))
    m.blobs.crcs[i] = crc32c.crc32c(bytes(stream[start:start + size]))
    files = [FileEntry(f.name, f.nbytes, crc32c.crc32c(bytes(stream)), f.dir) for f in m.files]
    _record(d).write_bytes(m.replace(files=files).to_bytes())
    loaded = _every_reader(d)
    if loaded is not None:
        assert_state_equal(loaded, saved)


@SETTINGS
@given(state=states, where=st.sampled_from(["record", "data"]), pos=st.floats(0, 1),
       how=st.sampled_from(["flip", "truncate", "append", "zero"]))
def test_bytes_mutated_without_fixing_anything_never_load_wrong(tmp_path_factory, state, where, pos, how):
    d = tmp_path_factory.mktemp("bytes") / "c"
    ckptstore.save({"s": state}, d)
    target = _record(d) if where == "record" else next(p for p in d.iterdir() if p.suffix == ".bin")
    mutated = _mutate(target.read_bytes(), pos, how)
    if mutated is None:
        return
    target.write_bytes(mutated)
    loaded = _every_reader(d)
    if loaded is not None:
        # Every byte is checksummed: a load that succeeds returns exactly what was saved.
        assert_state_equal(loaded, {"s": state})


def _manager_restore(mgr, nbytes: int):
    """The manager's restore of a run whose newest step was tampered with: a step's state or an error."""
    with bounded(nbytes):
        try:
            return mgr.restore()
        except CheckpointError as e:
            _not_a_storage_fault(e)
            return None


@SETTINGS
@given(state=states, lie=st.booleans(), pos=st.floats(0, 1), how=st.sampled_from(["flip", "truncate", "zero"]),
       data=st.data())
def test_the_manager_restores_a_correct_step_or_raises_a_checkpoint_error(tmp_path_factory, state, lie, pos,
                                                                         how, data):
    run = tmp_path_factory.mktemp("run")
    mgr = ckptstore.CheckpointManager(run)
    mgr.save(1, {"s": state, "step": 1})
    mgr.save(2, {"s": state, "step": 2})
    d = run / "step-2"
    raw = _record(d).read_bytes()
    changed = _lie(raw, data) if lie else _mutate(raw, pos, how)
    if changed is not None:
        _record(d).write_bytes(changed)
    got = _manager_restore(mgr, sum(p.stat().st_size for p in d.iterdir()))
    if got is not None and not lie:
        # Bytes changed without their CRC fixed can never load: what comes back is exactly a saved step.
        assert_state_equal(got, {"s": state, "step": got.get("step")})
        assert got["step"] in (1, 2)


# ---------------------------------------------------------------- the same on S3

@S3_SETTINGS
@given(state=states, lie=st.booleans(), where=st.sampled_from(["record", "data"]), pos=st.floats(0, 1),
       how=st.sampled_from(["flip", "truncate", "append", "zero"]), data=st.data())
def test_a_tampered_checkpoint_on_s3_is_a_correct_load_or_a_checkpoint_error(moto_server, state, lie, where,
                                                                           pos, how, data):
    fs = moto_server.fs
    run = f"{BUCKET}/hostile-{uuid.uuid4().hex}"
    options = moto_server.options()
    mgr = ckptstore.CheckpointManager(f"s3://{run}", storage_options=options)
    mgr.save(1, {"s": state, "step": 1})
    mgr.save(2, {"s": state, "step": 2})
    names = fs.ls(f"{run}/step-2")
    record = next(n for n in names if n.endswith(".commit"))
    target = record if lie or where == "record" else next((n for n in names if n.endswith(".bin")), record)
    raw = fs.cat_file(target)
    changed = _lie(raw, data) if lie else _mutate(raw, pos, how)
    try:
        if changed is not None:
            fs.pipe_file(target, changed)
        uri = f"s3://{run}/step-2"
        nbytes = sum(fs.size(n) for n in names)
        with bounded(nbytes):
            loaded = _readers(uri, options)
            query = "?" + "&".join(f"{k}={v}" for k, v in options.items())
            _quiet_cli(["verify", "--deep", uri + query])
            _quiet_cli(["info", uri + query])
        if loaded is not None and not lie:
            assert_state_equal(loaded, {"s": state, "step": 2})
        got = _manager_restore(mgr, nbytes)
        if got is not None and not lie:
            assert got["step"] in (1, 2)
            assert_state_equal(got, {"s": state, "step": got["step"]})
    finally:
        fs.rm(run, recursive=True)


# ---------------------------------------------------------------- malformed URLs

@pytest.mark.parametrize("uri", ["s3://", "s3:///b/x", "gs://", "gcs:///x", "://x"])
def test_a_url_without_bucket_or_scheme_is_a_checkpoint_error_naming_it(uri):
    for call in (lambda: ckptstore.load(uri), lambda: ckptstore.save({"a": 1}, uri), lambda: ckptstore.exists(uri)):
        with pytest.raises(CheckpointError, match="bad checkpoint URL"):
            call()


@pytest.mark.parametrize("uri", ["memory://", "memory:///x"])
def test_memory_urls_with_an_empty_authority_work(uri):
    ckptstore.save({"a": 1}, uri)
    try:
        assert ckptstore.load(uri) == {"a": 1}
    finally:
        import fsspec
        fs = fsspec.filesystem("memory")
        root = "/x" if uri.endswith("/x") else "/"
        for f in [p for p in list(fs.store) if p.startswith(root.rstrip("/") + "/") and p.count("/") <= 2]:
            fs.rm(f)


# ---------------------------------------------------------------- foreign files: torch.save pickles

class _Payload:
    """Unpickling this calls ``fn(*args)``: what a malicious checkpoint carries."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payload(kind: str, sentinel: Path) -> _Payload:
    import subprocess
    if kind == "os.system":
        return _Payload(os.system, (f"touch {sentinel}",))
    if kind == "builtins.eval":
        return _Payload(eval, (f"open({str(sentinel)!r}, 'w').close()",))
    if kind == "builtins.exec":
        return _Payload(exec, (f"open({str(sentinel)!r}, 'w').close()",))
    return _Payload(subprocess.check_call, (["touch", str(sentinel)],))     # subprocess


def _write_malicious(path: Path, kind: str, container: str, sentinel: Path) -> None:
    obj = {"w": torch.ones(3), "x": _payload(kind, sentinel)}
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:                                  # a bare pickle, as some tools write them
        path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess"])
def test_a_malicious_torch_file_runs_nothing_and_is_refused_as_unsafe(tmp_path, kind, container):
    sentinel = tmp_path / "pwned"
    path = tmp_path / ("model.pkl" if container == "pickle" else "model.pt")
    _write_malicious(path, kind, container, sentinel)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        ckptstore.load(str(path))
    for reader in (lambda: ckptstore.verify(str(path), deep=True), lambda: info(str(path))):
        try:
            reader()
        except CheckpointError:
            pass
    _quiet_cli(["verify", "--deep", str(path)])
    _quiet_cli(["info", str(path)])
    assert not sentinel.exists(), "the payload ran"
    # The file is live: an unrestricted unpickler runs it.
    torch.load(path, weights_only=False) if container != "pickle" else pickle.loads(path.read_bytes())
    assert sentinel.exists(), "the payload is inert, so this test proves nothing"


def _zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


@SETTINGS
@given(state=states, pos=st.floats(0, 1), how=st.sampled_from(["flip", "truncate", "zero", "insert"]),
       junk=st.binary(min_size=1, max_size=8))
def test_a_torch_file_whose_pickle_is_mutated_loads_or_raises_a_checkpoint_error(tmp_path_factory, state, pos,
                                                                                how, junk):
    root = tmp_path_factory.mktemp("torchfile")
    sentinel = root / "pwned"
    path = root / "model.pt"
    torch.save({"s": state, "keep": _payload("os.system", sentinel) if how == "insert" else 1}, path)
    members = _zip_members(path)
    (pkl,) = [n for n in members if n.endswith("data.pkl")]
    raw = members[pkl]
    if how == "insert":
        i = int(pos * len(raw))
        members[pkl] = raw[:i] + junk + raw[i:]     # opcodes spliced in, the zip's CRC made right
    else:
        changed = _mutate(raw, pos, how)
        if changed is None:
            return
        members[pkl] = changed
    _write_zip(path, members)
    with watching_opens() as opened, bounded(path.stat().st_size):
        try:
            ckptstore.load(str(path))
            event("torch file: loaded")
        except CheckpointError as e:
            event(f"torch file: {type(e).__name__}")
            _not_a_storage_fault(e)
        _quiet_cli(["verify", "--deep", str(path)])
    assert not sentinel.exists(), "code in the pickle ran"
    assert not [p for p in opened if p.startswith(str(root)) and p != str(path)], opened


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/ckptstore-escaped", "archive/../../escaped",
                                  "archive/data/../../../escaped"])
def test_a_zip_member_name_that_escapes_writes_and_opens_nothing_outside(tmp_path, name):
    root = tmp_path / "inside"
    root.mkdir()
    path = root / "model.pt"
    torch.save({"w": torch.arange(4)}, path)
    members = _zip_members(path)
    prefix = next(iter(members)).split("/", 1)[0]
    # The escaping name both as an extra member and in place of the tensor's data record.
    data_name = next(n for n in members if "/data/" in n and not n.endswith(".pkl"))
    evil = {**members, name: b"x" * 16}
    evil[name.replace("archive", prefix)] = members.pop(data_name) if "data/" in name else b"y"
    _write_zip(path, evil)
    before = {p for p in tmp_path.rglob("*")}
    with watching_opens() as opened:
        try:
            got = ckptstore.load(str(path))
            assert torch.equal(got["w"], torch.arange(4))
        except CheckpointError:
            pass
    assert {p for p in tmp_path.rglob("*")} == before
    assert not Path("/tmp/ckptstore-escaped").exists()
    assert not [p for p in opened if not p.startswith(str(path)) and "escaped" in p], opened


# ---------------------------------------------------------------- foreign files: safetensors that lie

ST_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q8", "", "f32", None, 5]
ST_INTS = st.one_of(st.integers(0, 64), st.sampled_from([-1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64, 2 ** 66, 1.5,
                                                          True, None, "4", float("inf")]))


@st.composite
def safetensors_files(draw):
    """A safetensors file: sometimes valid, mostly with one or more lies in its header."""
    n = draw(st.integers(0, 3))
    header, at, tensors_ = {}, 0, []
    for i in range(n):
        dtype = draw(st.sampled_from(["F32", "U8", "I64"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=2))
        size = int(np.prod(shape)) * {"F32": 4, "U8": 1, "I64": 8}[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    if header and draw(st.booleans()):
        entry = header[draw(st.sampled_from(sorted(header)))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "shape0", "offset0", "offset1", "drop"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(ST_DTYPES))
        elif field == "shape":
            entry["shape"] = draw(st.one_of(st.lists(ST_INTS, max_size=4), st.sampled_from([None, 3, "x", {}])))
        elif field == "shape0" and entry["shape"]:
            entry["shape"][0] = draw(ST_INTS)
        elif field == "offset0":
            entry["data_offsets"][0] = draw(ST_INTS)
        elif field == "offset1":
            entry["data_offsets"][1] = draw(ST_INTS)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.sampled_from([None, [], [0], [0, 1, 2], "0,4", {}]))
        else:
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, 5, None, []]))
    text = json.dumps(header, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:
        text = b"[" * 5000 + b"]" * 5000
    hlen = len(text)
    if draw(st.integers(0, 4)) == 0:
        hlen = draw(st.sampled_from([0, 1, hlen - 1, hlen + 1, 2 ** 40, 2 ** 60, 2 ** 64 - 1]))
    body = draw(st.binary(min_size=at, max_size=at)) + draw(st.sampled_from([b"", b"", b"\0", b"\0" * 64]))
    if draw(st.integers(0, 4)) == 0:
        body = body[:draw(st.integers(0, len(body)))]
    return struct.pack("<Q", hlen) + text + body, header


@SETTINGS
@given(f=safetensors_files())
def test_a_safetensors_file_that_lies_loads_what_it_holds_or_raises_corrupt(tmp_path_factory, f):
    raw, header = f
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(raw)
    with watching_opens() as opened, bounded(len(raw)):
        try:
            got = ckptstore.load(str(path))
        except CheckpointError as e:
            event(f"safetensors: {type(e).__name__}")
            assert isinstance(e, ckptstore.CorruptCheckpointError), e
            got = None
        _quiet_cli(["verify", "--deep", str(path)])
    assert all(p == str(path) for p in opened if p.startswith(str(path.parent))), opened
    if got is not None:
        event("safetensors: loaded")
        # What loads is exactly the bytes the header points at.
        (hlen,) = struct.unpack("<Q", raw[:8])
        base = 8 + hlen
        assert list(got) == [k for k in header if k != "__metadata__"]
        for name, t in got.items():
            begin, end = header[name]["data_offsets"]
            assert list(t.shape) == header[name]["shape"]
            assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == raw[base + begin:base + end]


# ---------------------------------------------------------------- cases `make fuzz` found, kept as examples

def test_a_pickle_whose_persistent_id_is_not_a_tuple_is_corrupt(tmp_path):
    # Found by make fuzz: torch's weights-only unpickler asserts on it (AssertionError).
    path = tmp_path / "model.pt"
    torch.save({"s": None, "keep": 1}, path)
    members = _zip_members(path)
    (pkl,) = [n for n in members if n.endswith("data.pkl")]
    members[pkl] = b"K\x00Q" + members[pkl]
    _write_zip(path, members)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(str(path))


def test_a_safetensors_shape_past_int64_with_no_elements_is_corrupt(tmp_path):
    # Found by make fuzz: [0, 2**64] has no elements, so its offsets agree, but torch cannot hold it.
    header = json.dumps({"x": {"dtype": "F32", "shape": [0, 2 ** 64], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(str(path))


def test_a_selected_value_pointing_at_a_blob_that_does_not_exist_is_corrupt(tmp_path):
    # Found by make fuzz: a bytes node's blob index 2**40, reached through select=.
    d = tmp_path / "c"
    ckptstore.save({"a": [b"x", b"y"]}, d)
    raw = _record(d).read_bytes()
    head_raw, nodes_raw = raw.split(b"\n", 1)[1].split(b"\n", 1)
    head, nodes = json.loads(head_raw), json.loads(nodes_raw)
    i = next(j for j, n in enumerate(nodes) if n[0] == "bytes")
    nodes[i][1] = 2 ** 40
    body = _dump(head) + b"\n" + _dump(nodes)
    _record(d).write_bytes(b"CKPTSTORE 2 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(str(d), select="a")
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(str(d))


def test_a_shape_whose_element_count_overflows_int64_is_listed_by_its_true_size(tmp_path):
    """Found by the compressed-record property (seeded run of 20,000 cases): a tensor node whose
    shape was made [2**40] * 3 was listed by open().tensors() with nbytes 0 (torch.Size.numel
    wraps at 2**64), so a reader trusting the listing allocated it."""
    d = tmp_path / "c"
    ckptstore.save({"w": torch.ones(4)}, d)
    raw = _record(d).read_bytes()
    head, nodes = raw.split(b"\n", 1)[1].split(b"\n", 1)
    table = json.loads(nodes)
    (i,) = [k for k, n in enumerate(table) if n[0] == "tensor"]
    table[i][3] = [2 ** 40] * 3
    body = head + b"\n" + _dump(table)
    _record(d).write_bytes(b"CKPTSTORE 2 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body)
    with ckptstore.open(str(d)) as view:
        ((_, t),) = view.tensors()
    assert t.nbytes == 2 ** 120 * 4
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(str(d))
    _partial_readers(str(d))     # builds into= tensors from the listing: none of 2**122 bytes
