"""Nothing in the default path ever unpickles data.

Specification: API.md "What a checkpoint may hold (the safe format)":
anything else raises UnsupportedObjectError naming where it sits, before a
byte is written, unless allow_pickle=True; a checkpoint holding pickled parts
loads only with allow_pickle=True. Also "load also reads files that other
tools wrote": torch.save files with weights_only=True semantics, and
.safetensors files.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import defaultdict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import ckptstore
from helpers.compare import assert_state_equal, tensors_bitwise_equal


class Custom:
    def __init__(self, value=1):
        self.value = value

    def __eq__(self, other):
        return type(other) is Custom and other.value == self.value


class MyStr(str):
    pass


Point = namedtuple("Point", "x y")


def _write_sentinel(path):
    Path(path).write_text("unpickled")
    return "payload ran"


class Booby:
    """Unpickling this object writes a sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (_write_sentinel, (self.sentinel,))


UNSUPPORTED = [
    pytest.param({"args": argparse.Namespace(lr=0.1)}, 'state["args"]', "Namespace", id="namespace"),
    pytest.param({"seen": {1, 2, 3}}, 'state["seen"]', "set", id="set"),
    pytest.param({"fn": lambda x: x}, 'state["fn"]', "function", id="lambda"),
    pytest.param({"layers": [1, {"ok": torch.ones(1)}, {"extra": Custom()}]}, 'state["layers"][2]["extra"]', "Custom", id="custom-in-list"),
    pytest.param({"name": MyStr("x")}, 'state["name"]', "MyStr", id="str-subclass"),
    pytest.param({"counts": defaultdict(int, a=1)}, 'state["counts"]', "defaultdict", id="defaultdict"),
    pytest.param({"pt": Point(1, 2)}, 'state["pt"]', "Point", id="namedtuple"),
    pytest.param({"meta": {3: [frozenset()]}}, 'state["meta"][3][0]', "frozenset", id="frozenset-under-int-key"),
    pytest.param({"arr": np.array([argparse.Namespace()], dtype=object)}, 'state["arr"]', ("object", "Namespace"), id="numpy-object-array"),
    pytest.param({"mod": nn.Linear(2, 2)}, 'state["mod"]', "Linear", id="nn-module"),
]


def assert_nothing_written(store):
    assert store.files() == [], f"files were written: {store.files()}"
    if store.kind == "local":
        assert list(Path(store.root).iterdir()) == [], f"entries were created: {list(Path(store.root).iterdir())}"


@pytest.mark.parametrize("state, where, type_name", UNSUPPORTED)
def test_unsupported_object_is_refused_naming_where_it_sits(store, state, where, type_name):
    with pytest.raises(ckptstore.UnsupportedObjectError) as excinfo:
        ckptstore.save(state, store.uri())
    err = excinfo.value
    assert isinstance(err, TypeError) and isinstance(err, ckptstore.CheckpointError)
    assert where in str(err), f"{where!r} not in {str(err)!r}"
    names = type_name if isinstance(type_name, tuple) else (type_name,)
    assert any(n in str(err) for n in names), f"none of {names!r} in {str(err)!r}"


@pytest.mark.parametrize("state, where, type_name", UNSUPPORTED)
def test_unsupported_object_is_refused_before_a_byte_is_written(store, state, where, type_name):
    with pytest.raises(ckptstore.UnsupportedObjectError):
        ckptstore.save(state, store.uri())
    assert_nothing_written(store)
    assert ckptstore.exists(store.uri()) is False


def test_argparse_namespace_error_names_its_qualified_type(store):
    with pytest.raises(ckptstore.UnsupportedObjectError, match=r"argparse\.Namespace"):
        ckptstore.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, store.uri())


def test_unsupported_object_does_not_replace_an_existing_checkpoint(store):
    old = {"w": torch.arange(4)}
    ckptstore.save(old, store.uri())
    files = {p: store.read(p) for p in store.files()}
    with pytest.raises(ckptstore.UnsupportedObjectError):
        ckptstore.save({"w": torch.zeros(4), "args": argparse.Namespace()}, store.uri())
    assert {p: store.read(p) for p in store.files()} == files
    assert_state_equal(ckptstore.load(store.uri()), old)


def test_self_referencing_list_is_refused_not_recursed_forever(store):
    loop = [1, 2]
    loop.append(loop)
    with pytest.raises(ckptstore.UnsupportedObjectError):
        ckptstore.save({"loop": loop}, store.uri())
    assert_nothing_written(store)


def test_self_referencing_dict_is_refused_not_recursed_forever(store):
    loop = {"a": 1}
    loop["self"] = {"parent": loop}
    with pytest.raises(ckptstore.UnsupportedObjectError):
        ckptstore.save(loop, store.uri())
    assert_nothing_written(store)


def test_repeated_reference_to_one_list_is_not_a_cycle(store):
    shared = [1, 2, 3]
    state = {"a": shared, "b": shared, "c": [shared, shared]}
    ckptstore.save(state, store.uri())
    assert_state_equal(ckptstore.load(store.uri()), state)


# --- allow_pickle -------------------------------------------------------------------


def pickled_state():
    return {
        "args": argparse.Namespace(lr=0.1, name="run"),
        "seen": {1, 2, 3},
        "layers": [1, {"extra": Custom(5)}],
        "name": MyStr("x"),
        "counts": defaultdict(int, a=1),
        "pt": Point(1, 2),
        "w": torch.arange(6.0),
    }


def test_allow_pickle_saves_unsupported_objects_and_loads_them_back(store):
    state = pickled_state()
    ckptstore.save(state, store.uri(), allow_pickle=True)
    loaded = ckptstore.load(store.uri(), allow_pickle=True)
    assert loaded["args"] == state["args"]
    assert loaded["seen"] == {1, 2, 3}
    assert loaded["layers"] == [1, {"extra": Custom(5)}]
    assert type(loaded["name"]) is MyStr and loaded["name"] == "x"
    assert type(loaded["counts"]) is defaultdict and loaded["counts"].default_factory is int
    assert loaded["counts"] == {"a": 1}
    assert type(loaded["pt"]) is Point and loaded["pt"] == (1, 2)
    assert tensors_bitwise_equal(loaded["w"], state["w"])


def test_checkpoint_with_pickled_parts_is_refused_without_allow_pickle(store):
    ckptstore.save(pickled_state(), store.uri(), allow_pickle=True)
    with pytest.raises(ckptstore.UnsafeCheckpointError) as excinfo:
        ckptstore.load(store.uri())
    assert isinstance(excinfo.value, ckptstore.CheckpointError)
    assert store.uri_text() in str(excinfo.value)


def test_pickled_parts_are_not_unpickled_without_allow_pickle(store, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    ckptstore.save({"w": torch.ones(2), "trap": Booby(str(sentinel))}, store.uri(), allow_pickle=True)
    assert not sentinel.exists()
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        ckptstore.load(store.uri())
    assert not sentinel.exists(), "load without allow_pickle unpickled the payload"
    # The payload is live: with allow_pickle=True it runs.
    loaded = ckptstore.load(store.uri(), allow_pickle=True)
    assert loaded["trap"] == "payload ran" and sentinel.exists()


def test_allow_pickle_on_a_safe_state_needs_no_allow_pickle_to_load(store):
    state = {"w": torch.arange(3), "step": 1}
    ckptstore.save(state, store.uri(), allow_pickle=True)
    assert_state_equal(ckptstore.load(store.uri()), state)


# --- files other tools wrote: torch.save -----------------------------------------------------


class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class OpenForWrite:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(kind: str, sentinel: Path):
    return SystemCall(f"touch {sentinel}") if kind == "os.system" else OpenForWrite(str(sentinel))


def malicious_zip_checkpoint(path: Path, evil) -> None:
    """A real torch.save zip archive whose data.pkl is replaced by a malicious pickle."""
    genuine = io.BytesIO()
    torch.save({"w": torch.ones(2)}, genuine)
    genuine.seek(0)
    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"w": evil}, protocol=2)
            dst.writestr(item, data)


def malicious_plain_pickle(path: Path, evil) -> None:
    path.write_bytes(pickle.dumps(evil, protocol=2))


MALICIOUS = [
    pytest.param(malicious_zip_checkpoint, "os.system", "evil.pt", id="zip-data.pkl-os.system"),
    pytest.param(malicious_zip_checkpoint, "open", "evil.pth", id="zip-data.pkl-open"),
    pytest.param(malicious_plain_pickle, "os.system", "evil.pt", id="plain-pickle-os.system"),
    pytest.param(malicious_plain_pickle, "open", "evil.ckpt", id="plain-pickle-open"),
    pytest.param(malicious_zip_checkpoint, "os.system", "pytorch_model.bin", id="zip-as-.bin"),
]


def test_crafted_pickle_payloads_are_live_when_unpickled_unsafely(tmp_path):
    """Guards the test below: each crafted file really runs code under torch.load(weights_only=False)."""
    sentinels, files = [], []
    for i, param in enumerate(MALICIOUS):
        craft, kind, name = param.values
        sentinel, evil_file = tmp_path / f"LIVE-{i}", tmp_path / f"{i}-{name}"
        craft(evil_file, payload(kind, sentinel))
        sentinels.append(sentinel)
        files.append(str(evil_file))
    # A plain pickle is not a valid torch file: torch.load runs the payload, then complains.
    code = "import sys, torch\nfor f in sys.argv[1:]:\n    try: torch.load(f, weights_only=False)\n    except Exception: pass\n"
    done = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [s.exists() for s in sentinels] == [True] * len(sentinels)


@pytest.mark.parametrize("craft, kind, name", MALICIOUS)
def test_malicious_torch_file_is_refused_without_running_its_payload(store, tmp_path, craft, kind, name):
    sentinel = tmp_path / "SENTINEL"
    local = tmp_path / name
    craft(local, payload(kind, sentinel))
    store.write(store.path(name), local.read_bytes())
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        ckptstore.load(store.uri(name))
    assert not sentinel.exists(), "loading ran the pickle payload"


def plain_state_dict():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return model.state_dict()


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "pytorch_model.bin", "last.ckpt"])
def test_torch_save_file_of_a_state_dict_loads_equal(store, tmp_path, name):
    sd = plain_state_dict()
    local = tmp_path / name
    torch.save(sd, local)
    store.write(store.path(name), local.read_bytes())
    loaded = ckptstore.load(store.uri(name))
    assert_state_equal(loaded, sd)


def test_legacy_non_zip_torch_save_file_loads_equal(store, tmp_path):
    sd = plain_state_dict()
    local = tmp_path / "legacy.pt"
    torch.save(sd, local, _use_new_zipfile_serialization=False)
    store.write(store.path("legacy.pt"), local.read_bytes())
    assert_state_equal(ckptstore.load(store.uri("legacy.pt")), sd)


def test_torch_save_file_with_tied_tensors_loads_them_shared(store, tmp_path):
    w = torch.randn(3, 3)
    local = tmp_path / "tied.pt"
    torch.save({"a": w, "b": w, "view": w[1]}, local)
    store.write(store.path("tied.pt"), local.read_bytes())
    loaded = ckptstore.load(store.uri("tied.pt"))
    loaded["a"][1, 1] = 99.0
    assert loaded["b"][1, 1].item() == 99.0 and loaded["view"][1].item() == 99.0


def test_torch_save_file_holding_arbitrary_objects_needs_allow_pickle(store, tmp_path):
    local = tmp_path / "with_args.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.5)}, local)
    store.write(store.path("with_args.pt"), local.read_bytes())
    with pytest.raises(ckptstore.UnsafeCheckpointError):
        ckptstore.load(store.uri("with_args.pt"))
    loaded = ckptstore.load(store.uri("with_args.pt"), allow_pickle=True)
    assert loaded["args"] == argparse.Namespace(lr=0.5)


# --- files other tools wrote: safetensors ---------------------------------------------


def safetensors_state():
    g = torch.Generator().manual_seed(5)
    return {
        "f32": torch.randn(4, 3, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(-3, 3),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(0, 256, 51, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f8_e4m3": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
    }


def test_safetensors_file_loads_as_a_dict_of_equal_tensors(store, tmp_path):
    state = safetensors_state()
    local = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, str(local), metadata={"format": "pt"})
    store.write(store.path("model.safetensors"), local.read_bytes())
    loaded = ckptstore.load(store.uri("model.safetensors"))
    assert isinstance(loaded, dict)
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert type(loaded[key]) is torch.Tensor, key
        assert tensors_bitwise_equal(loaded[key], tensor), key
