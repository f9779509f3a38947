"""What `load` gives back is exactly what `save` was given.

Specification: API.md, "load returns an object equal to what was saved" and
"What a checkpoint may hold". Equality here is strict (see helpers/compare.py):
same Python types, same dict key order and key types, same tensor dtype,
shape, Parameter-ness and requires_grad, and bit-identical values.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import ckptstore
from helpers.compare import assert_state_equal, shares_storage

GEN = torch.Generator().manual_seed(20240601)

FLOAT8_DTYPES = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]
ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    *FLOAT8_DTYPES,
    torch.complex32, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool,
]


def random_tensor(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Random bits of any dtype (NaNs, infs and subnormals included for floats)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=GEN).bool()
    itemsize = dtype.itemsize
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=GEN)
    return raw.view(dtype).reshape(shape)


def roundtrip(state, store, name="ckpt", **load_kwargs):
    uri = store.uri(name)
    ckptstore.save(state, uri)
    return ckptstore.load(uri, **load_kwargs)


def tensors_in(obj):
    stack, out = [obj], []
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


def deep_nest(levels: int):
    leaf = {"leaf": torch.arange(3), "depth": levels}
    node = leaf
    kinds = [dict, list, tuple, OrderedDict]
    for i in range(levels):
        kind = kinds[i % len(kinds)]
        if kind is dict:
            node = {"down": node, "i": i}
        elif kind is OrderedDict:
            node = OrderedDict([("i", i), ("down", node)])
        elif kind is list:
            node = [i, node]
        else:
            node = (node, i)
    return node


def module_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(16, 4))  # move the BatchNorm running stats off their defaults
    return model, model.state_dict()


def kitchen_sink():
    model, sd = module_state_dict()
    return {
        "tensors": {str(d): random_tensor(d, 3, 5) for d in ALL_DTYPES},
        "transposed": random_tensor(torch.float32, 4, 6).t(),
        "strided": random_tensor(torch.int64, 20)[::3],
        "scalar_tensor": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 7, dtype=torch.bfloat16),
        "param": nn.Parameter(torch.randn(3, 3, generator=GEN)),
        "frozen": nn.Parameter(torch.randn(2, generator=GEN), requires_grad=False),
        "numpy": [np.arange(12, dtype=np.int16).reshape(3, 4).T, np.array(2.5), np.float32(-1.25), np.bool_(True)],
        "none": None, "yes": True, "no": False,
        "ints": [0, -1, 2**200, -(2**200), 2**64 - 1, -(2**63) - 1],
        "floats": [0.1, float("nan"), float("inf"), float("-inf"), -0.0, 5e-324],
        "text": ["", "héllo wörld ✓ 😀 日本語", "nul\x00inside"],
        "bytes": [b"", bytes(range(256))],
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("meta")],
        7: "int key", -3: "negative int key",
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
        "model": sd,
        "empties": [{}, [], (), OrderedDict(), ""],
        "tuple": (1, "two", 3.0, None),
        "deep": deep_nest(50),
    }


# --- tensors -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tensor_of_each_dtype_roundtrips_bit_exact(store, dtype):
    t = random_tensor(dtype, 4, 6)
    assert_state_equal(roundtrip({"t": t}, store), {"t": t})


def test_all_dtypes_in_one_state_roundtrip_bit_exact(store):
    state = {str(d): random_tensor(d, 17) for d in ALL_DTYPES}
    assert_state_equal(roundtrip(state, store), state)


def test_non_contiguous_tensors_roundtrip_with_their_values(store):
    base = random_tensor(torch.float32, 6, 8)
    state = {
        "transpose": base.t(),
        "column_slice": base[:, 2:5],
        "step_slice": base[::2, ::3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "permuted": random_tensor(torch.int32, 2, 3, 4).permute(2, 0, 1),
        "channels_last": random_tensor(torch.float16, 2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        "flipped": random_tensor(torch.bfloat16, 10).flip(0),
    }
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)


def test_zero_dim_and_empty_tensors_roundtrip(store):
    state = {
        "zero_dim_float": torch.tensor(-0.0),
        "zero_dim_int": torch.tensor(2**62, dtype=torch.int64),
        "zero_dim_bool": torch.tensor(True),
        "zero_dim_bf16": torch.tensor(1.5, dtype=torch.bfloat16),
        "empty_1d": torch.empty(0),
        "empty_2d": torch.empty(0, 5, dtype=torch.int8),
        "empty_3d": torch.zeros(3, 0, 2, dtype=torch.complex64),
    }
    assert_state_equal(roundtrip(state, store), state)


def test_parameters_stay_parameters_with_their_requires_grad(store):
    state = {
        "trainable": nn.Parameter(torch.randn(4, 4, generator=GEN)),
        "frozen": nn.Parameter(torch.randn(4, generator=GEN), requires_grad=False),
        "half": nn.Parameter(torch.randn(3, generator=GEN).half()),
    }
    loaded = roundtrip(state, store)
    assert type(loaded["trainable"]) is nn.Parameter and loaded["trainable"].requires_grad
    assert type(loaded["frozen"]) is nn.Parameter and not loaded["frozen"].requires_grad
    assert_state_equal(loaded, state)


def test_distinct_tensors_with_equal_values_stay_independent(store):
    state = {"a": torch.zeros(8), "b": torch.zeros(8)}
    loaded = roundtrip(state, store)
    loaded["a"][0] = 1.0
    assert loaded["b"][0].item() == 0.0


def test_loaded_tensors_are_writable_cpu_tensors(store):
    loaded = roundtrip({"t": torch.arange(6.0)}, store)
    loaded["t"].add_(1)
    assert loaded["t"].device == torch.device("cpu")
    assert loaded["t"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


# --- shared storage ----------------------------------------------------------


def test_tied_weights_share_storage_after_load(store):
    weight = torch.randn(5, 3, generator=GEN)
    state = {"embed.weight": weight, "lm_head.weight": weight}
    loaded = roundtrip(state, store)
    assert shares_storage(loaded["embed.weight"], loaded["lm_head.weight"])
    loaded["embed.weight"][1, 2] = 42.0
    assert loaded["lm_head.weight"][1, 2].item() == 42.0


def test_tied_parameters_stay_one_parameter_after_load(store):
    p = nn.Parameter(torch.randn(4, generator=GEN))
    state = {"encoder": {"w": p}, "decoder": [p]}
    loaded = roundtrip(state, store)
    a, b = loaded["encoder"]["w"], loaded["decoder"][0]
    assert type(a) is nn.Parameter and type(b) is nn.Parameter
    assert shares_storage(a, b)
    with torch.no_grad():
        a[0] = 7.0
    assert b[0].item() == 7.0


def test_view_and_its_base_share_storage_after_load(store):
    base = torch.arange(10.0)
    state = {"base": base, "view": base[2:5]}
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded["base"], loaded["view"])
    loaded["view"][0] = 100.0
    assert loaded["base"][2].item() == 100.0


def test_transpose_shares_storage_with_its_original_after_load(store):
    m = torch.randn(3, 4, generator=GEN)
    state = {"m": m, "mt": m.t()}
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded["m"], loaded["mt"])
    loaded["mt"][1, 0] = -9.0
    assert loaded["m"][0, 1].item() == -9.0


def test_overlapping_slices_of_one_storage_share_it_after_load(store):
    s = torch.arange(20.0)
    state = {"first": s[0:10], "second": s[5:15]}
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded["first"], loaded["second"])
    loaded["first"][7] = 77.0
    assert loaded["second"][2].item() == 77.0


def test_disjoint_slices_of_one_storage_share_it_after_load(store):
    s = torch.arange(30, dtype=torch.int64)
    state = [s[:5], s[20:25]]
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded[0], loaded[1])
    assert loaded[1].storage_offset() - loaded[0].storage_offset() == 20


def test_dtype_reinterpreting_view_shares_storage_after_load(store):
    f = torch.randn(8, generator=GEN)
    state = {"floats": f, "bits": f.view(torch.int32)}
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded["floats"], loaded["bits"])
    loaded["bits"][0] = 0
    assert loaded["floats"][0].item() == 0.0


# --- numpy -------------------------------------------------------------------


def test_numpy_arrays_of_several_dtypes_roundtrip(store):
    rng = np.random.default_rng(7)
    state = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64_nan": np.array([np.nan, np.inf, -0.0, 1e-310]),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i16": np.arange(-5, 5, dtype=np.int16),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "c64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.int32),
    }
    assert_state_equal(roundtrip(state, store), state)


def test_zero_dim_and_non_contiguous_numpy_arrays_roundtrip(store):
    m = np.arange(24, dtype=np.float64).reshape(4, 6)
    state = {
        "zero_dim": np.array(3.25),
        "transposed": m.T,
        "strided": m[::2, 1::2],
        "fortran": np.asfortranarray(m),
        "reversed": np.arange(10, dtype=np.int8)[::-1],
    }
    loaded = roundtrip(state, store)
    assert_state_equal(loaded, state)
    np.testing.assert_array_equal(loaded["transposed"], m.T)


def test_numpy_scalars_keep_their_numpy_type(store):
    state = [np.float32(1.5), np.float64(np.nan), np.float16(-2.0), np.int8(-7), np.int64(2**62),
             np.uint8(255), np.uint64(2**64 - 1), np.bool_(False), np.complex128(1 - 2j)]
    assert_state_equal(roundtrip(state, store), state)


# --- python values -------------------------------------------------------------


def test_none_and_bools_roundtrip_as_themselves(store):
    state = {"none": None, "true": True, "false": False, "list": [None, True, False, 0, 1]}
    loaded = roundtrip(state, store)
    assert loaded["none"] is None and loaded["true"] is True and loaded["false"] is False
    assert_state_equal(loaded, state)


def test_ints_of_any_size_roundtrip(store):
    state = [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 2**200, -(2**200), 10**400]
    assert_state_equal(roundtrip(state, store), state)


def test_special_floats_roundtrip_bit_exact(store):
    state = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 0.1, 5e-324, 1.7976931348623157e308]
    loaded = roundtrip(state, store)
    assert math.isnan(loaded[0]) and math.copysign(1.0, loaded[3]) == -1.0
    assert_state_equal(loaded, state)


def test_strings_and_bytes_roundtrip(store):
    state = {"empty": "", "unicode": "héllo wörld ✓ 😀 日本語 \u200b", "nul": "a\x00b", "newline": "a\nb\r\n",
             "empty_bytes": b"", "all_bytes": bytes(range(256)) * 4}
    assert_state_equal(roundtrip(state, store), state)


def test_torch_size_dtype_and_device_roundtrip(store):
    state = {
        "sizes": [torch.Size([]), torch.Size([0]), torch.Size([2, 3, 4])],
        "dtypes": list(ALL_DTYPES),
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda"), torch.device("meta")],
    }
    assert_state_equal(roundtrip(state, store), state)


# --- containers ----------------------------------------------------------------


def test_dict_keeps_str_and_int_keys_in_insertion_order(store):
    state = {"zeta": 1, 3: "three", "alpha": 2, -10: "minus ten", 1: "one", "10": "string ten", 0: None}
    loaded = roundtrip(state, store)
    assert list(loaded.keys()) == ["zeta", 3, "alpha", -10, 1, "10", 0]
    assert_state_equal(loaded, state)


def test_ordered_dicts_lists_tuples_and_empty_containers_roundtrip(store):
    state = OrderedDict([
        ("z", OrderedDict([("b", 1), ("a", [1, (2, 3)])])),
        ("list", [1, [2, [3, []]]]),
        ("tuple", (1, ("x", ()), [])),
        ("empties", [{}, [], (), OrderedDict()]),
        ("empty_top_tuple", ()),
    ])
    assert_state_equal(roundtrip(state, store), state)


def test_module_state_dict_keeps_metadata_and_loads_into_the_module(store):
    model, sd = module_state_dict()
    loaded = roundtrip(sd, store)
    assert type(loaded) is OrderedDict
    assert loaded._metadata == sd._metadata
    assert_state_equal(loaded, sd)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(loaded, strict=True)
    fresh.eval(), model.eval()
    x = torch.randn(5, 4, generator=GEN)
    assert torch.equal(fresh(x), model(x))


def test_state_nested_500_levels_deep_roundtrips(store):
    state = deep_nest(500)
    assert_state_equal(roundtrip(state, store), state)


def test_state_with_every_supported_kind_roundtrips(store):
    state = kitchen_sink()
    assert_state_equal(roundtrip(state, store), state)


def test_top_level_values_need_not_be_dicts(store):
    for i, state in enumerate([torch.arange(3), [1, 2], (), None, "text", 5, np.arange(3)]):
        assert_state_equal(roundtrip(state, store, name=f"c{i}"), state)


# --- map_location ----------------------------------------------------------------


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, lambda storage, loc: storage],
    ids=["str", "device", "dict-identity", "dict-cuda-to-cpu", "callable"],
)
def test_map_location_to_cpu_loads_like_torch_load(store, map_location):
    state = {"w": torch.randn(3, 2, generator=GEN), "p": nn.Parameter(torch.ones(2)), "tied": None}
    state["tied"] = state["w"]
    loaded = roundtrip(state, store, map_location=map_location)
    assert_state_equal(loaded, state)
    assert shares_storage(loaded["w"], loaded["tied"])


def test_map_location_callable_is_called_with_storage_and_location(store):
    calls = []

    def to_cpu(storage, location):
        calls.append(location)
        return storage

    state = {"a": torch.arange(3), "b": torch.ones(2, dtype=torch.float16)}
    loaded = roundtrip(state, store, map_location=to_cpu)
    assert_state_equal(loaded, state)
    assert calls and all(loc == "cpu" for loc in calls)


# --- save() result and commit strategy -----------------------------------------------


def test_save_returns_checkpoint_info_describing_the_save(store):
    state = {"a": torch.randn(1000, generator=GEN), "b": torch.zeros(10, 10, dtype=torch.int64), "n": 3}
    uri = store.uri()
    info = ckptstore.save(state, uri)
    assert isinstance(info, ckptstore.CheckpointInfo)
    assert info.uri.split("?", 1)[0] == uri.split("?", 1)[0]  # s3/gcs: the options query is dropped or redacted
    if store.query:
        assert "=testing" not in info.uri, f"credentials shown in {info.uri}"
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors_in(state))
    assert info.nbytes >= tensor_bytes
    assert info.seconds > 0
    assert info.strategy in ("rename", "marker")


def test_local_disk_commits_by_rename(local_store):
    info = ckptstore.save({"x": torch.ones(3)}, local_store.uri())
    assert info.strategy == "rename"


def test_memory_filesystem_commits_by_marker(memory_store):
    info = ckptstore.save({"x": torch.ones(3)}, memory_store.uri())
    assert info.strategy == "marker"


def test_marker_commit_can_be_forced_on_local_disk_by_query(local_store):
    state = {"x": torch.arange(5), "y": "marker"}
    uri = local_store.uri() + "?commit=marker"
    info = ckptstore.save(state, uri)
    assert info.strategy == "marker"
    assert_state_equal(ckptstore.load(uri), state)


def test_marker_commit_can_be_forced_on_local_disk_by_storage_options(local_store):
    state = {"x": torch.arange(5), "y": "marker"}
    info = ckptstore.save(state, local_store.uri(), storage_options={"commit": "marker"})
    assert info.strategy == "marker"
    assert_state_equal(ckptstore.load(local_store.uri(), storage_options={"commit": "marker"}), state)


def test_marker_committed_local_checkpoint_loads_from_its_plain_path(local_store):
    state = {"x": torch.arange(5)}
    ckptstore.save(state, local_store.uri() + "?commit=marker")
    assert ckptstore.exists(local_store.uri())
    assert_state_equal(ckptstore.load(local_store.uri()), state)


def test_rename_commit_can_be_forced_on_local_disk_by_query(local_store):
    state = {"x": torch.arange(5)}
    info = ckptstore.save(state, local_store.uri() + "?commit=rename")
    assert info.strategy == "rename"
    assert_state_equal(ckptstore.load(local_store.uri()), state)


# --- overwrite -------------------------------------------------------------------


def test_overwrite_false_refuses_an_existing_checkpoint_and_keeps_it(store):
    old = {"version": 1, "w": torch.ones(4)}
    uri = store.uri()
    ckptstore.save(old, uri)
    with pytest.raises(ckptstore.CheckpointExistsError) as excinfo:
        ckptstore.save({"version": 2, "w": torch.zeros(4)}, uri, overwrite=False)
    assert isinstance(excinfo.value, FileExistsError)
    assert store.uri_text() in str(excinfo.value)
    assert_state_equal(ckptstore.load(uri), old)


def test_overwrite_false_saves_where_nothing_exists(store):
    state = {"version": 1}
    ckptstore.save(state, store.uri(), overwrite=False)
    assert_state_equal(ckptstore.load(store.uri()), state)


def test_overwrite_replaces_the_whole_content(store):
    uri = store.uri()
    ckptstore.save({"version": 1, "old_only": torch.ones(1000), "nested": {"a": 1}}, uri)
    new = {"version": 2, "nested": {"b": torch.arange(3)}}
    ckptstore.save(new, uri)
    assert_state_equal(ckptstore.load(uri), new)


def test_repeated_overwrites_do_not_accumulate_data(store):
    uri = store.uri()
    state = {"w": torch.randn(50_000, generator=GEN)}
    ckptstore.save(state, uri)
    one_save = store.size_of_everything()
    for _ in range(5):
        ckptstore.save(state, uri)
    # One previous generation may be kept around; five must not be.
    assert store.size_of_everything() <= 2 * one_save + 65536
    assert_state_equal(ckptstore.load(uri), state)


# --- addressing and options --------------------------------------------------------


def test_pathlib_path_and_file_url_address_the_same_local_checkpoint(tmp_path):
    state = {"w": torch.arange(4)}
    target = tmp_path / "ckpt"
    ckptstore.save(state, target)
    assert_state_equal(ckptstore.load(str(target)), state)
    assert_state_equal(ckptstore.load(target.as_uri()), state)
    assert ckptstore.exists(target)


def test_local_path_with_spaces_and_unicode_works(tmp_path):
    state = {"w": torch.arange(4)}
    uri = str(tmp_path / "my runs" / "étape 10 ✓")
    ckptstore.save(state, uri)
    assert_state_equal(ckptstore.load(uri), state)


def test_relative_local_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": torch.arange(4)}
    ckptstore.save(state, "runs/ckpt")
    assert (tmp_path / "runs" / "ckpt").is_dir()
    assert_state_equal(ckptstore.load(str(tmp_path / "runs" / "ckpt")), state)


def test_progress_does_not_change_what_is_saved(store):
    state = {"w": torch.randn(10_000, generator=GEN)}
    ckptstore.save(state, store.uri(), progress=True)
    assert_state_equal(ckptstore.load(store.uri()), state)


def test_save_and_load_without_verification_roundtrip(store):
    state = kitchen_sink()
    ckptstore.save(state, store.uri(), verify=False)
    assert_state_equal(ckptstore.load(store.uri(), verify=False), state)


def test_loaded_state_is_unaffected_by_a_later_overwrite(store):
    uri = store.uri()
    ckptstore.save({"w": torch.full((1000,), 1.0)}, uri)
    first = ckptstore.load(uri)
    ckptstore.save({"w": torch.full((1000,), 2.0)}, uri)
    second = ckptstore.load(uri)
    assert bool((first["w"] == 1.0).all()) and bool((second["w"] == 2.0).all())


def test_saving_does_not_modify_the_state(store):
    state = kitchen_sink()
    before = {k: v for k, v in state.items()}
    snapshot_bytes = {k: v.clone() for k, v in state["tensors"].items()}
    ckptstore.save(state, store.uri())
    assert list(state) == list(before) and all(state[k] is before[k] for k in before)
    for k, t in snapshot_bytes.items():
        assert_state_equal(state["tensors"][k], t, path=f"state['tensors'][{k!r}]")
    assert state["param"].requires_grad and type(state["param"]) is nn.Parameter
