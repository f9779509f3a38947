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
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from ckptstore.integrations.dcp import StoreReader, StoreWriter

COLS = 256


def full_weight(rows: int) -> torch.Tensor:
    return torch.arange(rows * COLS, dtype=torch.float32).reshape(rows, COLS) / 7.0


def replicated() -> torch.Tensor:
    return torch.linspace(-1, 1, 1000, dtype=torch.float64)


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
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
