"""Reading only what you need, into memory you already have (API.md, "Reading only what you need").

``load(select=)``, ``load(into=)``, ``ckptstore.open`` and the manager's
``restore(select=, into=)`` on every backend (local, memory, S3 on moto,
GCS on the emulator, the rclone FUSE mount) and for torch.save and
safetensors files. Every path, shape and dtype check must come before a byte
of data is read: the tests prove it by corrupting the data files first, so a
check that ran after a read would raise CorruptCheckpointError instead.
On S3 a counting proxy shows what is transferred.
"""

from __future__ import annotations

import collections
import uuid

import pytest
import torch

import ckptstore
from conftest import BUCKET
from helpers.compare import assert_state_equal
from helpers.faultproxy import FaultProxy


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def training_state():
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 7,
            "nested": {"a.b": torch.arange(6.0), "list": [torch.ones(3), "text", torch.zeros(2, 2)],
                       "tuple": (1, torch.full((4,), 2.0))},
            (1, 2): "a tuple key"}


def _corrupt_data(store, name: str) -> None:
    """Invert every byte of every data file: whatever reads data from here on raises CorruptCheckpointError."""
    for p in store.files():
        if f"/{name}/" in p and p.endswith(".bin") and store.read(p):
            raw = store.read(p)
            store.write(p, bytes(b ^ 0xFF for b in raw))


# ---------------------------------------------------------------- select

def test_select_returns_only_the_selected_values_with_their_containers(store):
    state = training_state()
    uri = store.uri()
    ckptstore.save(state, uri)
    got = ckptstore.load(uri, select="model")
    assert list(got) == ["model"] and isinstance(got["model"], collections.OrderedDict)
    assert_state_equal(got["model"], state["model"])
    got = ckptstore.load(uri, select=[("nested", "a.b"), ("nested", "list", 2), ("nested", "tuple", 1),
                                      ((1, 2),), "step"])
    assert list(got) == ["step", "nested", (1, 2)]
    assert list(got["nested"]) == ["a.b", "list", "tuple"]
    assert torch.equal(got["nested"]["a.b"], torch.arange(6.0))
    assert got["nested"]["list"][:2] == [None, None] and torch.equal(got["nested"]["list"][2], torch.zeros(2, 2))
    assert isinstance(got["nested"]["tuple"], tuple) and got["nested"]["tuple"][0] is None
    assert got[(1, 2)] == "a tuple key" and got["step"] == 7
    exp = ckptstore.load(uri, select=("optimizer", "state", 0, "exp_avg"))
    assert torch.equal(exp["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_dotted_keys_are_never_split(store):
    uri = store.uri()
    ckptstore.save({"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)}, uri)
    assert torch.equal(ckptstore.load(uri, select="a.b")["a.b"], torch.zeros(1))
    assert list(ckptstore.load(uri, select=("a", "b"))["a"]) == ["b"]
    with pytest.raises(KeyError, match="a.b"):
        ckptstore.load(uri, select=("a.b", "c"))


@pytest.mark.parametrize("path", ["missing", ("model", "no.such.weight"), ("step", "x"), ("nested", "list", 3),
                                  ("nested", "list", "0")])
def test_a_missing_path_raises_key_error_naming_it_before_any_data_is_read(store, path):
    uri = store.uri()
    ckptstore.save(training_state(), uri)
    _corrupt_data(store, "ckpt")
    with pytest.raises(KeyError) as e:
        ckptstore.load(uri, select=path)
    assert not isinstance(e.value, ckptstore.CheckpointError)
    shown = "/".join(map(str, path if isinstance(path, tuple) else (path,)))
    assert shown in str(e.value)


def test_a_selected_value_is_still_checked(store):
    uri = store.uri()
    ckptstore.save({"w": torch.arange(1000.0)}, uri)
    _corrupt_data(store, "ckpt")
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(uri, select="w")


# ---------------------------------------------------------------- into

def test_into_reads_into_the_very_tensors_given(store):
    state = training_state()
    uri = store.uri()
    ckptstore.save(state, uri)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    sd = fresh.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    got = ckptstore.load(uri, into={"model": sd})
    for k, v in sd.items():
        assert got["model"][k] is v and v.data_ptr() == ptrs[k]
        assert torch.equal(fresh.state_dict()[k], state["model"][k])
    assert_state_equal(got["optimizer"], state["optimizer"])      # the rest loads as usual
    assert got["step"] == 7


def test_into_a_view_or_tied_weights_fills_them_too(store):
    base = torch.arange(12.0).reshape(3, 4)
    uri = store.uri()
    ckptstore.save({"t": base.t(), "a": base, "b": base}, uri)           # a view, and a storage shared twice
    dst = {"t": torch.empty(4, 3), "a": torch.empty(3, 4), "b": torch.empty(3, 4)}
    got = ckptstore.load(uri, into=dst)
    assert got["t"] is dst["t"] and torch.equal(dst["t"], base.t())
    assert torch.equal(dst["a"], base) and torch.equal(dst["b"], base)


def test_into_a_model_whose_weights_are_tied_too_reads_straight_into_them(store):
    """Tied weights saved and a target tied the same way: the shared storage is read once,
    straight into the target memory (no buffer for it); an untied target gets copies."""
    from ckptstore.plan import ReadPlan
    from ckptstore.reader import open_commit
    from ckptstore.stores import open_store

    emb = torch.randn(64, 8)
    uri = store.uri()
    ckptstore.save({"wte": emb, "head": emb, "bias": torch.ones(8)}, uri)
    m, _ = open_commit(open_store(uri))
    tied = torch.zeros(64, 8)
    dst = {"wte": tied, "head": tied, "bias": torch.zeros(8)}
    plan = ReadPlan.make(m, None, dst)
    assert all(t.direct for t in plan.targets) and not plan.blobs
    got = ckptstore.load(uri, into=dst)
    assert got["wte"] is tied and got["head"] is tied and torch.equal(tied, emb)
    untied = {"wte": torch.zeros(64, 8), "head": torch.zeros(64, 8), "bias": torch.zeros(8)}
    assert len(ReadPlan.make(m, None, untied).blobs) == 1
    ckptstore.load(uri, into=untied)
    assert torch.equal(untied["wte"], emb) and torch.equal(untied["head"], emb)
    half = {"wte": torch.zeros(64, 8)}                     # one user of two is a target: copied
    assert not any(t.direct for t in ReadPlan.make(m, None, half).targets)
    assert torch.equal(ckptstore.load(uri, into=half)["wte"], emb)


@pytest.mark.parametrize("bad, message", [
    ({"model": {"0.weight": torch.zeros(32, 65)}}, "shape"),
    ({"model": {"0.weight": torch.zeros(32, 64, dtype=torch.float64)}}, "float32"),
    ({"step": torch.zeros(1)}, "not a tensor"),
    ({"model": {"missing": torch.zeros(1)}}, "missing"),
])
def test_an_into_mismatch_raises_before_any_tensor_changes(store, bad, message):
    uri = store.uri()
    ckptstore.save(training_state(), uri)
    _corrupt_data(store, "ckpt")
    sd = _model().state_dict()
    into = {"model": {**sd, **bad.get("model", {})}, **{k: v for k, v in bad.items() if k != "model"}}
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises((KeyError, ValueError), match=message) as e:
        ckptstore.load(uri, into=into)
    assert not isinstance(e.value, ckptstore.CheckpointError)
    for k, v in sd.items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_into_with_a_flipped_byte_raises_corrupt(store):
    uri = store.uri()
    ckptstore.save({"w": torch.arange(4096.0)}, uri)
    _corrupt_data(store, "ckpt")
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(uri, into={"w": torch.empty(4096)})


def test_into_many_small_tensors_and_one_larger_than_a_read(store):
    """Small blobs are read several to a task and a large one in chunks: every byte lands, and a
    flipped byte among the small ones is still caught."""
    state = {"small": {f"t{i}": torch.full((64,), float(i)) for i in range(300)},
             "big": torch.arange(float(9 << 18))}                      # 9 MiB: more than one read
    uri = store.uri()
    ckptstore.save(state, uri)
    dst = {"small": {k: torch.empty(64) for k in state["small"]}, "big": torch.empty(9 << 18)}
    got = ckptstore.load(uri, into=dst)
    assert got["big"] is dst["big"] and torch.equal(dst["big"], state["big"])
    for k, v in state["small"].items():
        assert got["small"][k] is dst["small"][k] and torch.equal(dst["small"][k], v), k
    _corrupt_data(store, "ckpt")
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.load(uri, select="small", into={"small": dst["small"]})


@pytest.mark.parametrize("flip_at", [0.1, 0.4, 0.6, 0.9])
def test_into_a_tensor_read_as_several_streams_catches_a_byte_flipped_in_any_of_them(tmp_path, flip_at):
    """On a local disk into= reads one long run of the stream per thread, so one 6 MiB tensor is
    read in parts whose CRCs are combined: every part's byte counts, whichever run it is in.
    Small tensors around it are read in groups through a scratch buffer."""
    from ckptstore.reader import open_commit
    from ckptstore.stores import open_store

    g = torch.Generator().manual_seed(5)
    state = {"a": torch.randn(300, generator=g), "big": torch.randn(6 << 18, generator=g),
             "small": [torch.randn(100, generator=g) for _ in range(50)]}
    uri = str(tmp_path / "ck")
    ckptstore.save(state, uri)
    dst = {"a": torch.zeros(300), "big": torch.zeros(6 << 18), "small": [torch.zeros(100) for _ in range(50)]}
    got = ckptstore.load(uri, into=dst)
    assert got["big"] is dst["big"] and torch.equal(dst["big"], state["big"]) and torch.equal(dst["a"], state["a"])
    assert all(torch.equal(x, y) for x, y in zip(dst["small"], state["small"]))
    m, _ = open_commit(open_store(uri))
    b = next(i for i in range(len(m.blobs)) if int(m.blobs.sizes[i]) == 6 << 20)
    at = int(m.blobs.starts[b]) + int(flip_at * (6 << 20))
    path = tmp_path / "ck" / m.files[0].name
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ckptstore.CorruptCheckpointError, match=f"blob {b}"):
        ckptstore.load(uri, into=dst)


def test_into_looks_each_container_up_once_not_once_per_key(tmp_path, monkeypatch):
    """Matching n targets against a dict of n keys reads the dict's entries once (O(n)), not once
    per target (O(n^2): 100,000 tensors took minutes)."""
    from ckptstore.format import paths

    state = {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(2000)}
    uri = str(tmp_path / "ckpt")
    ckptstore.save(state, uri)
    walked = collections.Counter()
    items = paths.Tree.items

    def counting(self, i):
        walked[i] += 1
        return items(self, i)

    monkeypatch.setattr(paths.Tree, "items", counting)
    dst = {k: torch.empty(2) for k in state}
    ckptstore.load(uri, into=dst)
    assert all(torch.equal(dst[k], v) for k, v in state.items())
    assert walked[0] <= 3, f"the root dict was walked {walked[0]} times for {len(state)} targets"


def test_select_and_into_combine_and_into_must_lie_inside_the_selection(store):
    state = training_state()
    uri = store.uri()
    ckptstore.save(state, uri)
    sd = _model().state_dict()
    got = ckptstore.load(uri, select="model", into={"model": sd})
    assert list(got) == ["model"] and all(got["model"][k] is sd[k] for k in sd)
    with pytest.raises(ValueError, match="outside select"):
        ckptstore.load(uri, select="step", into={"model": sd})


# ---------------------------------------------------------------- open

def test_open_reads_the_record_and_each_leaf_on_demand(store):
    state = training_state()
    uri = store.uri()
    ckptstore.save(state, uri)
    with ckptstore.open(uri) as view:
        assert view.info.generation and view.info.uri
        assert list(view) == list(state) and len(view) == len(state)
        assert "model" in view and "nope" not in view and (1, 2) in view
        model = view["model"]
        assert isinstance(model, ckptstore.Checkpoint) and list(model.keys()) == list(state["model"])
        assert torch.equal(model["0.weight"], state["model"]["0.weight"])
        assert view["step"] == 7
        infos = dict(view.tensors())
        assert infos[("model", "0.weight")] == ckptstore.TensorInfo(torch.float32, torch.Size([32, 64]), 32 * 64 * 4)
        assert ("nested", "list", 2) in infos and len(infos) == sum(1 for _ in _tensor_leaves(state))
        assert_state_equal(model.load(), state["model"])
        sd = _model().state_dict()
        got = model.load(into=sd)
        assert all(got[k] is sd[k] for k in sd)
        assert list(model.load(select="2.bias")) == ["2.bias"]
        with pytest.raises(KeyError):
            view["nope"]


def test_open_lists_tensors_with_only_the_record_read_even_if_data_is_damaged(store):
    uri = store.uri()
    ckptstore.save(training_state(), uri)
    _corrupt_data(store, "ckpt")
    view = ckptstore.open(uri)
    assert len(list(view.tensors())) > 10
    with pytest.raises(ckptstore.CorruptCheckpointError):
        view["model"]["0.weight"]


def _tensor_leaves(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensor_leaves(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensor_leaves(x)


# ---------------------------------------------------------------- torch.save and safetensors files

@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_select_into_and_open_work_on_single_file_checkpoints(tmp_path, kind):
    sd = _model().state_dict()
    if kind == "torch":
        path = tmp_path / "model.pt"
        torch.save({"model": sd, "step": 3}, path)
        sel, into_at = ("model", "0.weight"), lambda d: {"model": d}
    else:
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(dict(sd), str(path))
        sel, into_at = "0.weight", lambda d: d
    got = ckptstore.load(str(path), select=sel)
    flat = got["model"] if kind == "torch" else got
    assert list(flat) == ["0.weight"] and torch.equal(flat["0.weight"], sd["0.weight"])
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    got = ckptstore.load(str(path), into=into_at(dst))
    flat = got["model"] if kind == "torch" else got
    assert all(flat[k] is dst[k] and torch.equal(dst[k], sd[k]) for k in sd)
    with pytest.raises(ValueError, match="shape"):
        ckptstore.load(str(path), into=into_at({"0.weight": torch.empty(2, 2)}))
    with pytest.raises(KeyError):
        ckptstore.load(str(path), select="nope")
    view = ckptstore.open(str(path))
    assert len(list(view.tensors())) == len(sd)


# ---------------------------------------------------------------- the manager

def test_restore_into_falls_back_past_a_corrupt_step_refilling_the_same_tensors(store):
    mgr = ckptstore.CheckpointManager(store.uri("run"))
    m1 = _model()
    mgr.save(1, {"model": m1.state_dict(), "step": 1})
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(1.0)
    mgr.save(2, {"model": m1.state_dict(), "step": 2})
    _corrupt_data(store, "step-2")
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    sd = fresh.state_dict()
    got = mgr.restore(select=["model", "step"], into={"model": sd})
    assert got["step"] == 1 and all(got["model"][k] is sd[k] for k in sd)
    expected = _model().state_dict()
    for k in sd:
        assert torch.equal(fresh.state_dict()[k], expected[k]), k


# ---------------------------------------------------------------- bytes moved, on S3

def test_select_on_s3_moves_only_the_selected_bytes_and_open_only_the_record(moto_server):
    model = {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}          # 1 MiB
    optimizer = {f"{k}.{m}": torch.randn(256, 256) for k in model for m in ("exp_avg", "exp_avg_sq", "master")}
    nbytes_model = sum(t.numel() * 4 for t in model.values())
    with FaultProxy("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1]), seed=0) as proxy:
        uri = (f"s3://{BUCKET}/select-{uuid.uuid4().hex}/ckpt?endpoint_url={proxy.endpoint}"
               f"&key={moto_server.key}&secret={moto_server.secret}")
        ckptstore.save({"model": model, "optimizer": optimizer}, uri)
        before = proxy.stats["bytes_down"]
        got = ckptstore.load(uri, select="model")
        moved = proxy.stats["bytes_down"] - before
        assert_state_equal(got["model"], model)
        granule = 4 << 20
        assert moved <= nbytes_model + 64 * 1024 + granule, (moved, nbytes_model)
        assert moved >= nbytes_model
        before = proxy.stats["bytes_down"]
        view = ckptstore.open(uri)
        listed = dict(view.tensors())
        record_only = proxy.stats["bytes_down"] - before
        assert len(listed) == 16 and record_only < 64 * 1024, record_only


def test_into_a_saved_meta_tensor_is_a_value_error_before_anything_changes(tmp_path):
    ckptstore.save({"m": torch.empty(3, device="meta"), "w": torch.ones(3)}, tmp_path / "c")
    dst = {"m": torch.zeros(3), "w": torch.zeros(3)}
    with pytest.raises(ValueError, match="meta"):
        ckptstore.load(tmp_path / "c", into=dst)
    assert torch.equal(dst["w"], torch.zeros(3))
