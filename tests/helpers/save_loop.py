"""Crash-test writer: overwrite one checkpoint URI forever, announcing each commit.

    python save_loop.py URI FIRST_VERSION MEGABYTES
        Save version FIRST_VERSION, FIRST_VERSION+1, ... to URI in a loop and
        print "committed <pid> <version>" (flushed) after each save returns.

    python save_loop.py --serve
        Import torch and ckptstore once, print "ready", then obey commands on
        stdin, one per line:
          run URI FIRST_VERSION MEGABYTES  fork a child running the loop above;
                                           answers "started <pid>"
          reap PID                         wait for that child (after the test
                                           has SIGKILLed it); answers
                                           "reaped <pid> <status>"
        Forking from a warm parent lets a test kill dozens of writers at random
        instants without paying the interpreter + torch import for each one.

Every version's state is distinguishable: all tensors and arrays are filled
with the version number and "version" holds it too, so a reader can tell a
clean checkpoint from a mix of two saves.
"""
from __future__ import annotations

import os
import sys
import traceback


def make_state(version: int, megabytes: float):
    import numpy as np
    import torch

    n = int(megabytes * 2**20)
    return {
        "version": version,
        "model": {
            "big": torch.full((n // 2 // 4,), float(version), dtype=torch.float32),
            "ids": torch.full((n // 4 // 8,), version, dtype=torch.int64),
            "small": torch.full((n // 8 // 2,), version, dtype=torch.int16),
        },
        "optimizer": [np.full(n // 8 // 4, version, dtype=np.int32), {"step": version}],
        "note": f"version {version}",
    }


def check_state(state) -> int:
    """The version a loaded state holds; AssertionError if it mixes versions."""
    import numpy as np
    import torch

    v = state["version"]
    assert isinstance(v, int), f"version is {type(v)}"
    for name, t in state["model"].items():
        assert isinstance(t, torch.Tensor), f"model.{name} is {type(t)}"
        assert t.numel() > 0 and bool((t == v).all()), f"model.{name} is not uniformly version {v}: {t.unique()[:8].tolist()}"
    arr, opt = state["optimizer"]
    assert isinstance(arr, np.ndarray) and bool((arr == v).all()), f"optimizer[0] is not uniformly version {v}"
    assert opt == {"step": v}, f"optimizer[1] is {opt!r}, expected step {v}"
    assert state["note"] == f"version {v}", f"note is {state['note']!r}"
    return v


def make_incremental_state(version: int, megabytes: float):
    """make_state plus a frozen part of the same size, equal in every version."""
    import torch

    state = make_state(version, megabytes)
    state["frozen"] = torch.full((int(megabytes * 2**20) // 4,), 7.0)
    return state


def check_incremental_state(state) -> int:
    v = check_state(state)
    assert bool((state["frozen"] == 7.0).all()), "the frozen part changed"
    return v


def save_loop(uri: str, first: int, megabytes: float) -> None:
    import ckptstore

    pid = os.getpid()
    version = first
    if uri.startswith("incremental+"):
        # Steps of an incremental run that also prunes (keep_last=2): the kill test of
        # reference-safe retention.
        mgr = ckptstore.CheckpointManager(uri[len("incremental+"):], incremental=True, keep_last=2)
        while True:
            mgr.save(version, make_incremental_state(version, megabytes))
            sys.stdout.write(f"committed {pid} {version}\n")
            sys.stdout.flush()
            version += 1
    while True:
        ckptstore.save(make_state(version, megabytes), uri)
        sys.stdout.write(f"committed {pid} {version}\n")
        sys.stdout.flush()
        version += 1


def _child(uri: str, first: int, megabytes: float) -> None:
    try:
        save_loop(uri, first, megabytes)
    except BaseException:  # noqa: BLE001 - report anything, then die without cleanup
        msg = traceback.format_exc().replace("\n", " | ")
        sys.stdout.write(f"error {os.getpid()} {msg}\n")
        sys.stdout.flush()
    finally:
        os._exit(1)


def serve() -> None:
    import ckptstore  # noqa: F401 - warm the parent so children start instantly
    import numpy  # noqa: F401
    import torch  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            uri, first, megabytes = args[0], int(args[1]), float(args[2])
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(uri, first, megabytes)
            print(f"started {pid}", flush=True)
        elif cmd == "reap":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            print(f"reaped {pid} {status}", flush=True)
        elif cmd == "quit":
            return


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        save_loop(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
