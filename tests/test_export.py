"""ckptstore.export and `ckptstore export` / `ckptstore info --tensors` (API.md, "Reading only what you need").

The files are read back by the tools they are for: safetensors' own
``load_file`` and ``torch.load(weights_only=True)``; the sharded layout is
checked against what Hugging Face's loader reads (the index's weight_map).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptstore
from ckptstore.cli import main as cli


def _state():
    torch.manual_seed(1)
    model = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(6)}
    model["embed"] = torch.randn(100, 64).to(torch.bfloat16)
    model["tied"] = model["layer.0.weight"]
    model["view"] = model["layer.1.weight"].t()
    return {"model": model, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "step": 4,
            "heads": {"a": {"w": torch.ones(2)}, "b": torch.zeros(1)}}


def _run(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(args)
    return code, out.getvalue(), err.getvalue()


def test_export_to_safetensors_loads_with_safetensors_and_equals_the_checkpoint(store, tmp_path):
    state = _state()
    uri = store.uri()
    ckptstore.save(state, uri)
    dst = tmp_path / "model.safetensors"
    ckptstore.export(uri, str(dst), select="model")
    got = load_file(str(dst))
    assert sorted(got) == sorted(state["model"])
    for k, v in state["model"].items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.contiguous()), k
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_to_another_backend_and_with_several_paths(store, tmp_path):
    uri = f"{tmp_path}/src"
    state = _state()
    ckptstore.save(state, uri)
    dst = store.uri("out.safetensors")
    written = ckptstore.export(uri, dst, select=[("heads", "a"), ("heads", "b")])
    assert len(written) == 1
    local = tmp_path / "copy.safetensors"
    local.write_bytes(store.read(store.path("out.safetensors")))
    got = load_file(str(local))
    assert sorted(got) == ["heads.a.w", "heads.b"]


def test_a_sharded_export_writes_the_hugging_face_layout(tmp_path):
    state = _state()
    ckptstore.save(state, tmp_path / "c")
    out = tmp_path / "hf"
    written = ckptstore.export(tmp_path / "c", str(out), select="model", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert len(written) == n + 1
    assert sorted(index["weight_map"]) == sorted(state["model"])
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state["model"].values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as f:
            assert torch.equal(f.get_tensor(name), state["model"][name].contiguous())
    for shard in shards:
        sizes = sum(v.numel() * v.element_size() for v in load_file(str(out / shard)).values())
        assert sizes <= 40_000 or len(load_file(str(out / shard))) == 1


def test_export_to_torch_loads_with_weights_only(tmp_path):
    state = _state()
    ckptstore.save(state, tmp_path / "c")
    ckptstore.export(tmp_path / "c", str(tmp_path / "model.pt"), select="model")
    got = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(got) == list(state["model"])
    assert all(torch.equal(got[k], v) for k, v in state["model"].items())
    assert got["tied"].data_ptr() == got["layer.0.weight"].data_ptr()


@pytest.mark.parametrize("select, where", [(None, "optimizer/state/0"), ("step", "step"),
                                           (("optimizer", "state"), "optimizer/state/0")])
def test_a_selection_that_is_not_a_mapping_of_str_to_tensors_is_refused_naming_the_path(tmp_path, select, where):
    ckptstore.save(_state(), tmp_path / "c")
    with pytest.raises(ckptstore.UnsupportedObjectError, match=where):
        ckptstore.export(tmp_path / "c", str(tmp_path / "x.safetensors"), select=select)
    assert not (tmp_path / "x.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("x.")]


def test_an_export_interrupted_by_a_corrupt_checkpoint_leaves_nothing(tmp_path):
    ckptstore.save({"model": {"w": torch.arange(100000.0)}}, tmp_path / "c")
    data = next(p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptstore.CorruptCheckpointError):
        ckptstore.export(tmp_path / "c", str(tmp_path / "out.safetensors"), select="model")
    assert sorted(os.listdir(tmp_path)) == ["c"]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_streamed_export_through_small_windows_is_exact_and_catches_a_corrupt_middle_tensor(
        tmp_path, monkeypatch, concurrency):
    # Windows far smaller than the tensors: the read buffers are reused many times over and reads
    # stay in flight across tensor boundaries; every byte must still land where it belongs.
    from ckptstore.stores.local import LocalStore
    monkeypatch.setattr(LocalStore, "read_bytes", 4096)
    torch.manual_seed(2)
    model = {f"t{i:02d}": torch.randn(int(n)) for i, n in enumerate(torch.randint(1, 9000, (24,)))}
    model["empty"] = torch.zeros(0)
    model["view"] = model["t03"][5:900]
    uri = f"{tmp_path}/c?concurrency={concurrency}"
    ckptstore.save({"model": model}, uri)
    ckptstore.export(uri, str(tmp_path / "m.safetensors"), select="model")
    got = load_file(str(tmp_path / "m.safetensors"))
    assert list(got) == list(model) and all(torch.equal(got[k], v) for k, v in model.items())

    target = ckptstore.open(uri)["model"]["t11"]
    data = next(p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin")
    raw = bytearray(data.read_bytes())
    at = raw.find(target.numpy().tobytes())
    assert at > 0
    raw[at + target.numel() * 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptstore.CorruptCheckpointError, match="CRC-32C mismatch"):
        ckptstore.export(uri, str(tmp_path / "n.safetensors"), select="model")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("n.")]


def test_a_write_that_fails_behind_the_reads_fails_the_export_naming_the_output_and_leaves_nothing(
        tmp_path, monkeypatch):
    # The output is written by a helper thread while later windows are read and checked: its
    # failure (here a full disk after a few windows) must reach the caller as the output's error,
    # with no file left and no thread still writing.
    from ckptstore.stores.local import LocalStore, _LocalWriter
    monkeypatch.setattr(LocalStore, "read_bytes", 4096)
    torch.manual_seed(3)
    ckptstore.save({"model": {f"t{i}": torch.randn(5000) for i in range(8)}}, tmp_path / "c")
    write, calls = _LocalWriter.write, []

    def fail_on_the_fifth(self, data):
        calls.append(len(data))
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)
    monkeypatch.setattr(_LocalWriter, "write", fail_on_the_fifth)
    with pytest.raises(ckptstore.InsufficientSpaceError, match="out.safetensors"):
        ckptstore.export(tmp_path / "c", str(tmp_path / "out.safetensors"), select="model")
    assert len(calls) == 5
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert not [t for t in threading.enumerate() if t.name == "ckptstore-write-behind"]


def test_the_cli_exports_and_lists_tensors_from_the_record(tmp_path):
    state = _state()
    ckptstore.save(state, tmp_path / "c")
    code, out, err = _run(["info", str(tmp_path / "c"), "--tensors"])
    assert code == 0, err
    assert "model/layer.0.weight" in out and "bfloat16" in out and "[100, 64]" in out
    code, out, err = _run(["info", str(tmp_path / "c"), "--tensors", "--json"])
    rows = json.loads(out)
    assert {"path": "optimizer/state/0/exp_avg", "dtype": "float32", "shape": [3], "nbytes": 12} in rows
    code, out, err = _run(["export", str(tmp_path / "c"), str(tmp_path / "m.safetensors"), "--select", "model"])
    assert code == 0, err
    assert sorted(load_file(str(tmp_path / "m.safetensors"))) == sorted(state["model"])
    code, out, err = _run(["export", str(tmp_path / "c"), str(tmp_path / "o.safetensors"),
                           "--select", "optimizer/state/0"])
    assert code == 0, err
    assert list(load_file(str(tmp_path / "o.safetensors"))) == ["exp_avg"]
    code, out, err = _run(["export", str(tmp_path / "c"), str(tmp_path / "s"), "--select", "model",
                           "--max-shard-size", "40KB"])
    assert code == 0 and (tmp_path / "s" / "model.safetensors.index.json").exists(), err
    code, out, err = _run(["export", str(tmp_path / "c"), str(tmp_path / "n.safetensors"), "--select", "nope"])
    assert code == 2 and "nope" in err and "Traceback" not in err


def _training_state():
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_bare_file_name_as_dst_means_the_current_directory(tmp_path, monkeypatch, fmt):
    ckptstore.save(_state(), tmp_path / "c")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = f"ckptstore-bare-name-test.{fmt}"
    written = ckptstore.export(tmp_path / "c", name, select="model")
    assert os.listdir(work) == [name]
    assert written == [name]
    assert not os.path.exists(f"/{name}")


def test_the_cli_exports_to_a_bare_file_name_in_the_current_directory(tmp_path, monkeypatch):
    ckptstore.save(_state(), tmp_path / "c")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    name = "ckptstore-bare-name-cli-test.safetensors"
    code, out, err = _run(["export", str(tmp_path / "c"), name, "--select", "model"])
    assert code == 0, err
    assert os.listdir(work) == [name] and out.strip() == f"wrote {name}"
    assert sorted(load_file(str(work / name))) == sorted(_state()["model"])
    assert not os.path.exists(f"/{name}")


def test_relative_dst_paths_with_a_directory_and_sharded_resolve_against_the_current_directory(
        tmp_path, monkeypatch):
    ckptstore.save(_state(), tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    ckptstore.export(tmp_path / "c", "out/model.safetensors", select="model")
    assert sorted(load_file(str(tmp_path / "out" / "model.safetensors"))) == sorted(_state()["model"])
    written = ckptstore.export(tmp_path / "c", "hf", select="model", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert all(w.startswith("hf/") for w in written), written
    written = ckptstore.export(tmp_path / "c", ".", select="model", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()


def test_export_without_select_of_a_training_state_suggests_the_model(tmp_path):
    ckptstore.save(_training_state(), tmp_path / "c")
    with pytest.raises(ckptstore.UnsupportedObjectError) as e:
        ckptstore.export(tmp_path / "c", str(tmp_path / "x.safetensors"))
    msg = str(e.value)
    assert "optimizer/state/0/step" in msg
    assert "model (a state_dict of 2 tensors), optimizer, step" in msg
    assert "select='model'" in msg
    assert not [n for n in os.listdir(tmp_path) if n.startswith("x.")]


def test_the_cli_export_without_select_suggests_the_select_flag(tmp_path):
    ckptstore.save(_training_state(), tmp_path / "c")
    code, out, err = _run(["export", str(tmp_path / "c"), str(tmp_path / "x.safetensors")])
    assert code == 1, err
    assert "--select model" in err and "select='model'" not in err
    assert "model (a state_dict of 2 tensors), optimizer, step" in err
