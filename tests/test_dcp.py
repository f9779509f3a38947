"""torch.distributed.checkpoint through ckptstore (StoreWriter / StoreReader).

Specification: issue 5, item 3 -- storage for DCP over any ckptstore backend:
each rank's data checksummed, the coordinator commits with the backend's
strategy only after every rank finished, the result passes ckptstore.verify;
2 ranks on gloo on CPU: save, load back, and a rank killed mid-save leaves
nothing committed.

The two-rank tests start real processes (tests/helpers/dcp_worker.py) that
form a gloo process group on loopback and save a DTensor sharded across
them; the kill test blackholes one rank's S3 traffic at a proxy once its
uploads are under way and SIGKILLs it there.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

import ckptstore
from ckptstore.format.manifest import FileName, commit_generations
from ckptstore.gc import collect
from ckptstore.integrations.dcp import SLOT_FILES, StoreReader, StoreWriter
from ckptstore.stores import open_store
from helpers.backends import free_port
from helpers.faultproxy import FaultProxy

WORKER = Path(__file__).resolve().parent / "helpers" / "dcp_worker.py"
COLS = 256  # as in dcp_worker


def full_weight(rows: int) -> torch.Tensor:
    return torch.arange(rows * COLS, dtype=torch.float32).reshape(rows, COLS) / 7.0


def start_job(mode: str, uri: str, options: dict[int, dict], rows: int,
              extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two ranks of one gloo job, as separate processes."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, **(extra_env or {}), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        opts = json.dumps({str(r): o for r, o in options.items()})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, uri, opts, str(rows)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish_job(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def run_job(mode: str, uri: str, options: dict[int, dict], rows: int) -> None:
    for rank, (rc, text) in enumerate(finish_job(start_job(mode, uri, options, rows))):
        assert rc == 0, f"rank {rank} of the {mode} job failed:\n{text[-4000:]}"
        assert ("SAVED" if mode == "save" else "LOADED") in text


def job_says(mode: str, uri: str, rows: int = 64, env: dict[str, str] | None = None) -> list[str]:
    """The last line each rank of a ``mode`` job printed (the job must succeed)."""
    said = []
    for rank, (rc, text) in enumerate(finish_job(start_job(mode, uri, {}, rows, env), timeout=180)):
        assert rc == 0, f"rank {rank} of the {mode} job failed:\n{text[-4000:]}"
        said.append(text.strip().splitlines()[-1])
    return said


def commits(store) -> list[str]:
    return commit_generations(store.list() or {})


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_ranks_save_verify_and_load_resharded(backend, request):
    where = request.getfixturevalue(f"{backend}_store")
    # On S3, 1 MiB parts: each rank's 2 MiB shard spans several objects.
    options = {"part_size": "1MiB"} if backend == "s3" else {}
    uri, rows = where.uri("dcp"), 2048
    run_job("save", uri, {0: options, 1: options}, rows)

    store = open_store(uri, options)
    listing = store.list()
    data = sorted(n for n in listing if FileName.parse(n) and FileName.parse(n).role == "data")
    slots = {int(n.rsplit("-", 1)[1].split(".")[0]) // SLOT_FILES for n in data}
    assert slots == {0, 1}, f"each rank writes its own data files: {data}"
    if backend == "s3":
        assert len(data) > 2
    assert len(commits(store)) == 1

    report = ckptstore.verify(uri, storage_options=options, deep=True)
    assert report.ok, report.problems
    # ckptstore.load reads it like any checkpoint: one entry per stored shard.
    flat = ckptstore.load(uri, storage_options=options)
    half = rows // 2
    assert torch.equal(flat["w@0,0"], full_weight(rows)[:half])
    assert torch.equal(flat[f"w@{half},0"], full_weight(rows)[half:])
    assert torch.equal(flat["b"], torch.linspace(-1, 1, 1000, dtype=torch.float64))
    assert torch.load(io.BytesIO(flat["step"]), weights_only=True) == 1234

    # A fresh job loads it back sharded by columns instead of rows (checked in the worker).
    run_job("load", uri, {0: options, 1: options}, rows)


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_rank_killed_mid_save_commits_nothing_and_keeps_the_previous(s3_store, moto_server):
    uri = s3_store.uri("dcp")
    direct = {"part_size": "1MiB"}
    run_job("save", uri, {0: direct, 1: direct}, 64)          # the previous checkpoint
    store = open_store(uri, direct)
    previous = commits(store)
    assert len(previous) == 1

    with FaultProxy("127.0.0.1", _port_of(moto_server.endpoint), seed=0) as proxy:
        # Rank 1 reaches S3 through the proxy; each rank has 8 MiB to upload in 1 MiB parts.
        procs = start_job("save", uri, {0: direct, 1: {**direct, "endpoint_url": proxy.endpoint}}, 16384)
        deadline = time.monotonic() + 90
        while not any(method == "PUT" and f"-{SLOT_FILES}.bin" in target
                      for _, method, target, _ in list(proxy.events)):
            assert time.monotonic() < deadline, "rank 1 never started uploading"
            assert procs[1].poll() is None, finish_job(procs)[1][1][-4000:]
            time.sleep(0.005)
        # From now on rank 1's requests are never answered: it cannot finish. Kill it there.
        proxy.set_rates(blackhole_rate=1.0)
        time.sleep(0.3)
        procs[1].send_signal(signal.SIGKILL)
        (rc0, out0), (rc1, _) = finish_job(procs, timeout=90)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and "SAVED" not in out0, out0[-4000:]

    # Nothing new is committed, and what the dead save left is recognisably a leftover.
    assert commits(store) == previous
    left = [n for n in store.list() if FileName.parse(n) and FileName.parse(n).gen != previous[0]]
    assert left, "the interrupted save had uploaded data files"
    report = ckptstore.verify(uri, storage_options=direct, deep=True)
    assert report.ok and report.generation == previous[0]
    removed = {x.name for x in collect(store, grace=0)}
    assert removed == set(left)
    assert commits(store) == previous and ckptstore.verify(uri, storage_options=direct, deep=True).ok


# ---------------------------------------------------------------- one process (no process group)

def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    return {"model": model.state_dict(), "step": 5, "tag": "x"}


def test_saving_again_commits_a_new_generation_and_retires_the_old(tmp_path):
    uri = str(tmp_path / "c")
    state = _state()
    dcp.save(state, storage_writer=StoreWriter(uri))
    first = commits(open_store(uri))
    state["model"]["weight"].add_(1)
    dcp.save(state, checkpoint_id=uri, storage_writer=StoreWriter())
    store = open_store(uri)
    assert len(commits(store)) == 1 and commits(store) != first
    assert all(FileName.parse(n).gen == commits(store)[0] for n in store.list())
    target = {"model": {"weight": torch.zeros(8, 16), "bias": torch.zeros(8)}, "step": 0, "tag": ""}
    dcp.load(target, storage_reader=StoreReader(uri))
    assert torch.equal(target["model"]["weight"], state["model"]["weight"])
    assert target["step"] == 5 and target["tag"] == "x"


def _error_chain(excinfo) -> list[BaseException]:
    """DCP wraps a rank's error in its CheckpointException (a BaseException): look through it."""
    seen, todo = [], [excinfo.value]
    while todo:
        e = todo.pop()
        seen.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        for v in getattr(e, "failures", {}).values():
            todo.append(v[0] if isinstance(v, tuple) else v)
    return seen


def test_values_needing_the_full_unpickler_are_refused_unless_allowed(tmp_path):
    uri = str(tmp_path / "c")
    dcp.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(3)}, storage_writer=StoreWriter(uri))
    target = {"args": None, "w": torch.zeros(3)}
    with pytest.raises((CheckpointException, ckptstore.CheckpointError)) as e:
        dcp.load(target, storage_reader=StoreReader(uri))
    unsafe = [x for x in _error_chain(e) if isinstance(x, ckptstore.UnsafeCheckpointError)]
    assert unsafe and "args" in str(unsafe[0]) and "allow_pickle" in str(unsafe[0])
    assert target["args"] is None
    dcp.load(target, storage_reader=StoreReader(uri, allow_pickle=True))
    assert target["args"] == argparse.Namespace(lr=0.1)
    assert torch.equal(target["w"], torch.ones(3))


def test_a_flipped_byte_fails_the_load(tmp_path):
    uri = str(tmp_path / "c")
    dcp.save({"w": torch.arange(1000, dtype=torch.float32)}, storage_writer=StoreWriter(uri))
    (data,) = [p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin"]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(raw)
    assert not ckptstore.verify(uri, deep=True).ok
    with pytest.raises((CheckpointException, ckptstore.CheckpointError)) as e:
        dcp.load({"w": torch.zeros(1000)}, storage_reader=StoreReader(uri))
    assert any(isinstance(x, ckptstore.CorruptCheckpointError) for x in _error_chain(e))


def test_reader_says_what_to_do_with_a_plain_checkpoint(tmp_path):
    uri = str(tmp_path / "plain")
    ckptstore.save({"w": torch.ones(2)}, uri)
    with pytest.raises((CheckpointException, ckptstore.CheckpointError)) as e:
        dcp.load({"w": torch.zeros(2)}, storage_reader=StoreReader(uri))
    # DCP reports the reader's error inside its own: the message is what reaches the user.
    assert "not written by torch.distributed.checkpoint through StoreWriter" in str(e.value)
    assert "ckptstore.load" in str(e.value)


def test_non_contiguous_views_store_only_their_elements(memory_store):
    uri = memory_store.uri("views")
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {"t": base.t(), "every_other": base[:, ::2], "row": base[2]}
    dcp.save(state, storage_writer=StoreWriter(uri))
    flat = ckptstore.load(uri)
    for k, v in state.items():
        assert torch.equal(flat[k], v) and flat[k].is_contiguous()
    target = {k: torch.zeros(v.shape) for k, v in state.items()}
    dcp.load(target, storage_reader=StoreReader(uri))
    assert all(torch.equal(target[k], v) for k, v in state.items())
    # Only the views' elements were written, not their 48-element base three times.
    assert ckptstore.verify(uri).nbytes < 3 * 48 * 4


# ---------------------------------------------------------------- DCP's own options, two ranks

def test_overwrite_false_refuses_a_committed_checkpoint_on_every_rank_and_keeps_it(tmp_path):
    uri = str(tmp_path / "c")
    run_job("save", uri, {}, 64)
    before = commits(open_store(uri))
    # Each rank refuses on its own (CheckpointExistsError), as FileSystemWriter(overwrite=False) does.
    assert job_says("save-exclusive", uri) == ["REFUSED 0:CheckpointExistsError,1:CheckpointExistsError"] * 2
    store = open_store(uri)
    assert commits(store) == before
    assert all(FileName.parse(n).gen == before[0] for n in store.list()), "the refused save wrote nothing"
    flat = ckptstore.load(uri)
    assert torch.equal(torch.cat([flat["w@0,0"], flat["w@32,0"]]), full_weight(64))


def test_overwrite_false_saves_where_nothing_is_committed(tmp_path):
    uri = str(tmp_path / "c")
    assert job_says("save-exclusive", uri) == ["SAVED"] * 2
    flat = ckptstore.load(uri)
    assert torch.equal(torch.cat([flat["w@0,0"], flat["w@32,0"]]), full_weight(64) + 1)


def test_overwrite_defaults_to_true_and_replaces(tmp_path):
    assert StoreWriter("x").overwrite is True         # DCP's default
    uri = str(tmp_path / "c")
    run_job("save", uri, {}, 64)
    first = commits(open_store(uri))
    run_job("save", uri, {}, 32)
    store = open_store(uri)
    assert len(commits(store)) == 1 and commits(store) != first
    flat = ckptstore.load(uri)
    assert torch.equal(torch.cat([flat["w@0,0"], flat["w@16,0"]]), full_weight(32))


def test_non_tensor_values_round_trip_without_allow_pickle(tmp_path):
    # ints, floats, tuples, lists, dicts, None, torch.Size/dtype/device: what weights_only accepts.
    assert job_says("values", str(tmp_path / "c")) == ["VALUES-OK"] * 2


def test_a_value_whose_pickle_runs_code_is_refused_on_every_rank(tmp_path):
    marker = tmp_path / "pwned"
    assert job_says("unsafe", str(tmp_path / "c"), env={"DCP_MARKER": str(marker)}) == ["REFUSED-UNSAFE"] * 2
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["async-thread", "async-thread-cached", "async-process-cached"])
def test_async_save_copies_the_state_before_it_returns(kind, tmp_path):
    # Each rank changes its state in place while its save waits to write; both saves load back
    # as they were when async_save was called.
    said = job_says(kind, str(tmp_path / "c"), env={"DCP_GATE": str(tmp_path / "gate")})
    assert said == ["ASYNC-OK"] * 2


def test_a_save_without_collectives_is_refused(tmp_path):
    # Every rank would commit its own part alone, each retiring the others'.
    assert job_says("no-collectives", str(tmp_path / "c")) == ["REFUSED-NOCOLL"] * 2
    assert not ckptstore.exists(str(tmp_path / "c"))


# ---------------------------------------------------------------- DCP's own options, one process

def test_writer_takes_file_system_writer_keywords():
    w = StoreWriter("x", single_file_per_rank=False, sync_files=False, thread_count=8,
                    per_thread_copy_ahead=0, cache_staged_state_dict=True, overwrite=False)
    assert w.overwrite is False and w.cache_staged_state_dict is True
    # What it cannot honour (stream transforms, another file format) it refuses.
    with pytest.raises(TypeError):
        StoreWriter("x", _extensions=[])
    with pytest.raises(TypeError):
        StoreWriter("x", serialization_format=None)


def test_a_class_torch_allows_is_allowed(tmp_path):
    # The check is torch's own: what a user allow-lists with add_safe_globals loads; the rest is refused.
    uri = str(tmp_path / "c")
    dcp.save({"buf": io.BytesIO(b"loader position"), "w": torch.ones(2)}, storage_writer=StoreWriter(uri))
    target = {"buf": None, "w": torch.zeros(2)}
    with pytest.raises((CheckpointException, ckptstore.CheckpointError)) as e:
        dcp.load(target, storage_reader=StoreReader(uri))
    assert any(isinstance(x, ckptstore.UnsafeCheckpointError) for x in _error_chain(e))
    with torch.serialization.safe_globals([io.BytesIO]):
        dcp.load(target, storage_reader=StoreReader(uri))
    assert target["buf"].getvalue() == b"loader position"
