"""Peers that write a file (or a directory) on a disk or a mount: torch.save / torch.load,
safetensors, DCP's FileSystemWriter / Reader.

``on``: "local" (the local disk rows), "fuse" (the same on an rclone mount), "scaling" (the
local scaling curves). ``quick``: also in `make bench`'s quick run.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from benchmarks.harness.registry import peer
from benchmarks.peers._dcp import dcp_loader, dcp_saver

FILES = ("local", "fuse", "scaling")


@peer("torch", save="torch.save + fsync", file="state.pt", on=FILES, quick=True)
def torch_saver(spec: dict) -> Callable[[Any], dict]:
    import torch

    def run(state: Any) -> dict:
        # What a careful torch user does for a durable checkpoint.
        with open(spec["uri"], "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return {"nbytes": os.path.getsize(spec["uri"])}

    return run


def flat_tensors(state: Any) -> dict[str, Any]:
    """The state's tensors as one flat {dotted path: tensor} dict, each storage once: the form
    safetensors takes (it refuses two names for one memory; a tied weight is kept under its
    first name, as ``safetensors.torch.save_model`` does). Plain values are left out."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}" if prefix else str(i), v)

    walk("", state)
    return out


@peer("safetensors", save="safetensors save_file + fsync", file="state.safetensors", on=FILES, quick=True)
def safetensors_saver(spec: dict) -> Callable[[Any], dict]:
    """``safetensors.torch.save_file`` of the flattened state (flattening timed too), then an
    fsync of the file: durable, as ckptstore's save is."""
    from safetensors.torch import save_file

    def run(state: Any) -> dict:
        save_file(flat_tensors(state), spec["uri"])
        fd = os.open(spec["uri"], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"nbytes": os.path.getsize(spec["uri"])}

    return run


# On the local disk DCP's own writer too (FileSystemWriter fsyncs by default).
peer("dcp_fs", save="DCP save, FileSystemWriter", file="dcp", on=("local",))(dcp_saver)


@peer("torch", load="torch.load", file="state.pt", on=FILES, quick=True, weights_only=True)
def torch_loader(spec: dict) -> Callable[[], Any]:
    import torch

    return lambda: torch.load(spec["uri"], weights_only=True)


@peer("torch_mmap", load="torch.load(mmap=True)", file="state.pt", on=FILES, quick=True, weights_only=True)
def torch_mmap_loader(spec: dict) -> Callable[[], Any]:
    import torch

    # The tensors map the file; touch() then reads every page, so the mapping is paid for.
    return lambda: torch.load(spec["uri"], weights_only=True, mmap=True)


@peer("safetensors", load="safetensors load_file", file="state.safetensors", on=FILES, quick=True)
def safetensors_loader(spec: dict) -> Callable[[], Any]:
    from safetensors.torch import load_file

    return lambda: load_file(spec["uri"])


peer("dcp_fs", load="DCP load, FileSystemReader (in place)", file="dcp", on=("local",))(dcp_loader)
