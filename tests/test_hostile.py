"""Untrusted checkpoints are safe to open (guarantee 7), by property-based tests.

Hypothesis builds valid states, saves them, and then either lies in the
commit record with its CRC recomputed (so only the structure checks stand
between the lie and the reader) or mutates bytes of the record or a data file
without fixing anything. Whatever comes out, `load`, `verify(deep=True)`,
`ckptstore.api.info`, the manager's `restore` and `ckptstore verify` / `info`
must give a correct answer or a `CheckpointError`: never another exception,
never a hang, never a file opened outside the checkpoint's directory (an
audit hook records every open of the process). Deterministic by seed;
`make fuzz` runs the same properties with many more cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
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
from ckptstore.errors import CheckpointError
from helpers.compare import assert_state_equal

CASES = int(os.environ.get("CKPTSTORE_FUZZ_CASES", "60"))
SETTINGS = settings(max_examples=CASES, deadline=None, derandomize="CKPTSTORE_FUZZ_CASES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

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
           "/etc/passwd", "qint8", [], [0], [[]], {}, {"x": 1}, "0" * 5000, [2 ** 40] * 3, "nan"]


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


def _rewrite(d: Path, head: dict, nodes) -> None:
    body = _dump(head) + b"\n" + _dump(nodes)
    _record(d).write_bytes(b"CKPTSTORE 2 %d %08x\n" % (len(body), crc32c.crc32c(body)) + body)


# ---------------------------------------------------------------- what every reader must do

def _every_reader(d: Path) -> object:
    """Run every reader over ``d``; returns what load gave (or None). Fails on any non-CheckpointError."""
    uri = str(d)
    loaded = None
    with watching_opens() as opened:
        try:
            loaded = ckptstore.load(uri)
            event("load: returned")
        except CheckpointError as e:
            event(f"load: {type(e).__name__}")
        try:
            ckptstore.verify(uri, deep=True)
        except CheckpointError:
            pass
        try:
            info(uri)
        except CheckpointError:
            pass
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes = [cli(["verify", "--deep", uri]), cli(["info", uri])]
        assert set(codes) <= {0, 1}, (codes, err.getvalue())
        assert "Traceback" not in err.getvalue()
    outside = [p for p in opened if p.startswith(str(d.parent)) and not p.startswith(str(d) + os.sep)
               and os.path.realpath(p) != str(d)]
    assert not outside, f"opened outside the checkpoint: {outside}"
    return loaded


@SETTINGS
@given(state=states, data=st.data())
def test_a_record_that_lies_with_its_crc_recomputed_is_a_correct_load_or_a_checkpoint_error(tmp_path_factory,
                                                                                           state, data):
    root = tmp_path_factory.mktemp("lie")
    (root / "sentinel").write_text("must never be opened")
    d = root / "c"
    ckptstore.save({"s": state}, d)
    raw = _record(d).read_bytes()
    head_raw, nodes_raw = raw.split(b"\n", 1)[1].split(b"\n", 1)
    head, nodes = json.loads(head_raw), json.loads(nodes_raw)
    doc = {"head": head, "nodes": nodes}
    path = data.draw(st.sampled_from(_paths(doc)[1:]), label="path")
    value = data.draw(st.sampled_from(HOSTILE + [DEEP]), label="value")
    doc = _replace(doc, path, value)
    if not isinstance(doc.get("head"), dict):
        return
    _rewrite(d, doc["head"], doc["nodes"])
    _every_reader(d)


@SETTINGS
@given(state=states, where=st.sampled_from(["record", "data"]), pos=st.floats(0, 1),
       how=st.sampled_from(["flip", "truncate", "append", "zero"]))
def test_bytes_mutated_without_fixing_anything_never_load_wrong(tmp_path_factory, state, where, pos, how):
    d = tmp_path_factory.mktemp("bytes") / "c"
    ckptstore.save({"s": state}, d)
    target = _record(d) if where == "record" else next(p for p in d.iterdir() if p.suffix == ".bin")
    raw = bytearray(target.read_bytes())
    if not raw and how in ("flip", "zero", "truncate"):
        return
    i = min(int(pos * len(raw)), max(len(raw) - 1, 0))
    if how == "flip":
        raw[i] ^= 0x10
    elif how == "truncate":
        del raw[i:]
    elif how == "append":
        raw += b"\x00"
    elif raw[i] == 0:
        return                       # zeroing a zero changes nothing
    else:
        raw[i] = 0
    target.write_bytes(bytes(raw))
    loaded = _every_reader(d)
    if loaded is not None:
        # Every byte is checksummed: a load that succeeds returns exactly what was saved.
        assert_state_equal(loaded, {"s": state})


@SETTINGS
@given(state=states, data=st.data())
def test_the_manager_restores_a_correct_step_or_raises_a_checkpoint_error(tmp_path_factory, state, data):
    run = tmp_path_factory.mktemp("run")
    mgr = ckptstore.CheckpointManager(run)
    mgr.save(1, {"s": state, "step": 1})
    mgr.save(2, {"s": state, "step": 2})
    d = run / "step-2"
    raw = _record(d).read_bytes()
    head_raw, nodes_raw = raw.split(b"\n", 1)[1].split(b"\n", 1)
    doc = {"head": json.loads(head_raw), "nodes": json.loads(nodes_raw)}
    path = data.draw(st.sampled_from(_paths(doc)[1:]), label="path")
    doc = _replace(doc, path, data.draw(st.sampled_from(HOSTILE), label="value"))
    if isinstance(doc.get("head"), dict):
        _rewrite(d, doc["head"], doc["nodes"])
    try:
        got = mgr.restore()
    except CheckpointError:
        return
    # A lie the checks cannot see (a renamed key, another number) is what that record says;
    # the step it came from is still one of the two saved.
    if isinstance(got, dict) and type(got.get("step")) is int and "s" in got:
        assert got["step"] in (1, 2) or doc["nodes"] != json.loads(nodes_raw)


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
