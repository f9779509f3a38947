"""The local disk (the scratch directory), and the raw baselines of any path: dd and cat.

Baselines run as savers and loaders in a worker of their own, so they meet the same
conditions as the library: a fresh process that has just built the state (or just dropped
the page cache). On a VM whose freed memory goes back to the host after a moment, how
recently memory was freed changes write speed by 2-5x; measuring dd from the idle driver
instead would give the baseline systematically better conditions than the saves.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness.registry import Backend, loader, saver

LOCAL = Backend("local", uri=lambda handle, name: str(Path(handle) / name))


@saver("dd", external=True)
def dd_saver(spec: dict) -> Callable[[Any], dict]:
    """``dd if=/dev/zero bs=16M conv=fsync`` of the state's byte count: what the device does."""
    # iflag=count_bytes makes count a byte count, so dd writes exactly the
    # state's bytes in 16 MiB blocks; conv=fsync makes it durable like a save.
    cmd = ["dd", "if=/dev/zero", f"of={spec['uri']}", "bs=16M", f"count={spec['nbytes']}",
           "iflag=count_bytes", "conv=fsync", "status=none"]

    def run(state: Any) -> dict:
        subprocess.run(cmd, check=True)
        return {"nbytes": spec["nbytes"]}

    return run


@loader("cat", external=True)
def cat_loader(spec: dict) -> Callable[[], Any]:
    """``cat`` of every file of the checkpoint to /dev/null."""
    root = Path(spec["uri"])
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    cmd = ["cat", *map(str, files)]

    def run() -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    return run
