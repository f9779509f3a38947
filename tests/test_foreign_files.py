"""A damaged single file is corrupt, not unsafe (API.md: errors say what to do).

Only a well-formed torch.save file (or pickle) whose pickle needs globals the
weights-only unpickler refuses is `UnsafeCheckpointError`, with its advice to
pass `allow_pickle=True`. Bytes that are not a readable torch.save file at
all raise `CorruptCheckpointError` and never suggest unpickling them.
"""
from __future__ import annotations

import argparse
import io
import random
import zipfile

import pytest
import torch

import ckptstore


def noise(seed: int, n: int = 4096) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["x.pt", "x.pth", "x.bin", "x.ckpt", "x.safetensors"])
def test_random_bytes_are_corrupt_and_never_advise_allow_pickle(tmp_path, name, seed):
    path = tmp_path / name
    path.write_bytes(noise(seed))
    with pytest.raises(ckptstore.CorruptCheckpointError) as e:
        ckptstore.load(str(path))
    assert not isinstance(e.value, ckptstore.UnsafeCheckpointError)
    assert "allow_pickle" not in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("head", [b"\x80\x02", b"\x80\x04", b"PK\x03\x04"], ids=["proto2", "proto4", "zip"])
def test_random_bytes_behind_a_plausible_header_are_corrupt(tmp_path, head):
    path = tmp_path / "x.pt"
    path.write_bytes(head + noise(7))
    with pytest.raises(ckptstore.CorruptCheckpointError) as e:
        ckptstore.load(str(path))
    assert "allow_pickle" not in str(e.value)


def test_a_torch_save_file_whose_pickle_is_garbage_is_corrupt(tmp_path):
    genuine = io.BytesIO()
    torch.save({"w": torch.ones(2)}, genuine)
    genuine.seek(0)
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(genuine) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, b"\x80\x02" + noise(3, 200) if item.filename.endswith("/data.pkl") else data)
    with pytest.raises(ckptstore.CorruptCheckpointError) as e:
        ckptstore.load(str(path))
    assert "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_torch_save_file_is_corrupt(tmp_path, legacy):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(1000.0)}, path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ckptstore.CorruptCheckpointError) as e:
        ckptstore.load(str(path))
    assert "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_well_formed_torch_save_of_a_namespace_is_still_unsafe(tmp_path, legacy, protocol):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    with pytest.raises(ckptstore.UnsafeCheckpointError, match="allow_pickle=True"):
        ckptstore.load(str(path))
    assert ckptstore.load(str(path), allow_pickle=True)["args"].lr == 0.1
