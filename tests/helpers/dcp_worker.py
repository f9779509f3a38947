"""One rank of a torch.distributed job that saves or loads through ckptstore's DCP storage.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python dcp_worker.py {save|load} URI OPTIONS_JSON [ROWS]

OPTIONS_JSON maps a rank (as a string) to that rank's storage_options, so
two ranks can reach the same bucket through different endpoints. The state
is a DTensor sharded by rows across the ranks (each rank writes its own
shard), a replicated tensor (written once), and two plain values DCP
serializes itself. Its content is a function of ROWS alone, so a load in a
fresh job can check every element. ``load`` reads it back resharded by
columns and exits 0 only if everything matches.

The rank prints ``WRITING`` just before the save starts and ``SAVED`` or
``LOADED`` when it is done.

More modes, each exercising one behaviour on every rank and printing what it saw:

- ``save-exclusive``: ``StoreWriter(overwrite=False)``; ``SAVED``, or
  ``REFUSED <rank>:<error>,...`` naming the error each rank's DCP failure holds.
- ``values``: saves non-tensor values DCP serializes with ``torch.save``
  and loads them back with a default ``StoreReader``; ``VALUES-OK``.
- ``unsafe``: saves a value whose pickle calls ``os.system`` (it would
  create the file ``$DCP_MARKER``) and loads it; ``REFUSED-UNSAFE`` when every
  rank's load was refused with ``UnsafeCheckpointError``.
- ``async-thread`` / ``async-thread-cached`` / ``async-process-cached``:
  ``dcp.async_save`` through ``StoreWriter`` (twice with the same writer, to
  ``URI/a`` and ``URI/b``). Each rank's writer waits, before it writes, for
  the file ``$DCP_GATE.<rank>.<a|b>``, which the rank creates only after
  changing its state in place: the change must not reach the checkpoint.
  ``ASYNC-OK``.
- ``no-collectives``: ``dcp.save(use_collectives=False)``; ``REFUSED-NOCOLL``.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import ckptstore
from ckptstore.integrations.dcp import StoreReader, StoreWriter

COLS = 256


def full_weight(rows: int) -> torch.Tensor:
    return torch.arange(rows * COLS, dtype=torch.float32).reshape(rows, COLS) / 7.0


def replicated() -> torch.Tensor:
    return torch.linspace(-1, 1, 1000, dtype=torch.float64)


def values() -> dict:
    """Non-tensor values (DCP serializes each with torch.save) that torch's weights-only unpickler accepts."""
    return {"lr": 3e-4, "betas": (0.9, 0.999), "epoch": 7, "big": 2 ** 70, "ids": [3, 1, 2],
            "flag": True, "nothing": None, "tag": "run-7", "shape": torch.Size([3, 4]),
            "dtype": torch.bfloat16, "device": torch.device("cpu"), "nested": {"a": [1, 2.5, "x"]}}


class Evil:
    """Pickles to a call of os.system: what an attacker would put in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class GatedWriter(StoreWriter):
    """A StoreWriter whose write_data waits for a file the rank creates once it has changed its state.

    Module-level, so the process-based async_save can send it to its checkpointing process.
    """

    def __init__(self, *args, gate: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def write_data(self, plan, planner):
        gate = Path(f"{self.gate}.{os.environ['RANK']}.{Path(self.uri).name}")
        deadline = time.monotonic() + 60
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gate} never appeared")
            time.sleep(0.01)
        return super().write_data(plan, planner)


def failures(e: BaseException) -> str:
    """'<rank>:<error type>,...' from DCP's CheckpointException (each rank's own error)."""
    out = []
    for rank, f in sorted(getattr(e, "failures", {}).items()):
        exc = f[0] if isinstance(f, tuple) else f
        out.append(f"{rank}:{type(exc).__name__}")
    return ",".join(out) or type(e).__name__


def async_saves(uri: str, options: dict, mesh, rows: int, kind: str) -> bool:
    """Two async_saves through one writer; the state changes in place while each is in flight."""
    cached = kind.endswith("-cached")
    checkpointer = AsyncCheckpointerType.PROCESS if "process" in kind else AsyncCheckpointerType.THREAD
    state = {"w": distribute_tensor(full_weight(rows), mesh, [Shard(0)]), "b": replicated(), "step": 1}
    writer = GatedWriter(storage_options=options, cache_staged_state_dict=cached, gate=os.environ["DCP_GATE"])
    rank = os.environ["RANK"]
    expected = []
    for where in ("a", "b"):
        expected.append((state["w"].full_tensor().clone(), state["b"].clone(), state["step"]))
        future = dcp.async_save(state, checkpoint_id=f"{uri}/{where}", storage_writer=writer,
                                async_checkpointer_type=checkpointer)
        # The copy is taken: what training does next must not reach this checkpoint.
        state["w"].to_local().add_(1000)
        state["b"].mul_(-1)
        state["step"] += 1
        Path(f"{writer.gate}.{rank}.{where}").touch()
        future.result(timeout=120)
    ok = True
    for (w, b, step), where in zip(expected, ("a", "b")):
        target = {"w": distribute_tensor(torch.zeros(rows, COLS), mesh, [Shard(1)]),
                  "b": torch.zeros(1000, dtype=torch.float64), "step": 0}
        dcp.load(target, storage_reader=StoreReader(f"{uri}/{where}", storage_options=options))
        ok &= torch.equal(target["w"].full_tensor(), w) and torch.equal(target["b"], b) and target["step"] == step
    # and the training state itself kept its changes
    ok &= torch.equal(state["w"].full_tensor(), full_weight(rows) + 1000 + 1000) and state["step"] == 3
    return ok


def main() -> int:
    mode, uri, options_json = sys.argv[1:4]
    rows = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    rank = int(os.environ["RANK"])
    options = json.loads(options_json).get(str(rank), {})
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode == "save":
        state = {
            "w": distribute_tensor(full_weight(rows), mesh, [Shard(0)]),
            "b": replicated(),
            "step": 1234,
            "name": "two-rank run",
        }
        print("WRITING", flush=True)
        dcp.save(state, storage_writer=StoreWriter(uri, storage_options=options))
        print("SAVED", flush=True)
    elif mode == "load":
        state = {
            "w": distribute_tensor(torch.zeros(rows, COLS), mesh, [Shard(1)]),
            "b": torch.zeros(1000, dtype=torch.float64),
            "step": 0,
            "name": "",
        }
        dcp.load(state, storage_reader=StoreReader(uri, storage_options=options))
        whole = state["w"].full_tensor()
        ok = (torch.equal(whole, full_weight(rows)) and torch.equal(state["b"], replicated())
              and state["step"] == 1234 and state["name"] == "two-rank run")
        if not ok:
            print("MISMATCH", flush=True)
            return 3
        print("LOADED", flush=True)
    elif mode == "save-exclusive":
        state = {"w": distribute_tensor(full_weight(rows) + 1, mesh, [Shard(0)]), "step": 99}
        try:
            dcp.save(state, storage_writer=StoreWriter(uri, storage_options=options, overwrite=False))
        except CheckpointException as e:
            print(f"REFUSED {failures(e)}", flush=True)
        else:
            print("SAVED", flush=True)
    elif mode == "values":
        state = {"w": distribute_tensor(full_weight(rows), mesh, [Shard(0)]), "v": values()}
        dcp.save(state, storage_writer=StoreWriter(uri, storage_options=options))
        target = {"w": distribute_tensor(torch.zeros(rows, COLS), mesh, [Shard(0)]),
                  "v": {k: None for k in values()} | {"nested": {"a": None}}}
        dcp.load(target, storage_reader=StoreReader(uri, storage_options=options))
        got = target["v"]
        if got != values() or type(got["shape"]) is not torch.Size or type(got["betas"]) is not tuple:
            print(f"MISMATCH {got!r}", flush=True)
            return 3
        print("VALUES-OK", flush=True)
    elif mode == "unsafe":
        marker = os.environ["DCP_MARKER"]
        dcp.save({"w": torch.ones(4), "evil": Evil(marker)}, storage_writer=StoreWriter(uri, storage_options=options))
        target = {"w": torch.zeros(4), "evil": None}
        try:
            dcp.load(target, storage_reader=StoreReader(uri, storage_options=options))
        except CheckpointException as e:
            refused = [type(f[0] if isinstance(f, tuple) else f) for f in e.failures.values()]
            if sorted(e.failures) == list(range(dist.get_world_size())) and \
                    all(issubclass(t, ckptstore.UnsafeCheckpointError) for t in refused):
                print("REFUSED-UNSAFE", flush=True)
            else:
                print(f"REFUSED-OTHERWISE {failures(e)}", flush=True)
        else:
            print("LOADED", flush=True)
        if os.path.exists(marker):
            print("RAN-CODE", flush=True)
            return 4
    elif mode.startswith("async-"):
        if not async_saves(uri, options, mesh, rows, mode):
            print("MISMATCH", flush=True)
            return 3
        print("ASYNC-OK", flush=True)
    elif mode == "no-collectives":
        try:
            dcp.save({"w": torch.ones(4)}, storage_writer=StoreWriter(uri, storage_options=options),
                     use_collectives=False)
        except ckptstore.CheckpointError as e:
            print("REFUSED-NOCOLL" if "use_collectives" in str(e) else f"REFUSED-OTHERWISE {e}", flush=True)
        else:
            print("SAVED", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    # What DCP's failures left in reference cycles (exceptions, their frames, the groups those
    # hold) goes now, not in the interpreter's teardown, where gloo then aborts now and then
    # ("terminate called without an active exception") after the job did all it should.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
