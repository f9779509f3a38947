"""torch.distributed.checkpoint on the local disk, one process: ckptstore's StoreWriter /
StoreReader against DCP's own FileSystemWriter / Reader.

Both sides save the same state with dcp.save and load it in place with dcp.load into freshly
allocated tensors (counted as the state, not as extra memory); FileSystemWriter fsyncs its
files (its default), and StoreWriter also reads what it stored back before committing.
Reference rows.
"""

from __future__ import annotations

from benchmarks.harness.context import Site, remove
from benchmarks.harness.registry import Scenario, loader, saver, scenario
from benchmarks.harness.series import Row, compare, load_note, series
from benchmarks.peers._dcp import dcp_loader, dcp_saver

# ckptstore's DCP storage, the subject here (DCP's own, "dcp_fs", is a peer in peers/files.py).
saver("dcp_store")(dcp_saver)
loader("dcp_store")(dcp_loader)


def measure(site: Site) -> list[Row]:
    ctx, base = site.ctx, site.scratch
    dirs = {"dcp_fs": base / "fs", "dcp_store": base / "store"}
    s = series("dcp_fs_save", "dcp_store_save", "dcp_fs_load", "dcp_store_load")
    n = ctx.state_bytes
    save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
    for r in range(ctx.repeat):
        ctx.log(f"dcp: save round {r + 1}/{ctx.repeat}")
        for impl, where in dirs.items():
            remove(where)
            s[f"{impl}_save"].add(lambda: ctx.run({**save, "impl": impl, "uri": str(where)}))
    load = {"op": "load", "size_bytes": ctx.size_bytes, "state_bytes": n, "cold": ctx.cold}
    for r in range(ctx.repeat):
        ctx.log(f"dcp: load round {r + 1}/{ctx.repeat}")
        for impl, where in dirs.items():
            if s[f"{impl}_save"].seconds:
                s[f"{impl}_load"].add(lambda: ctx.run({**load, "impl": impl, "uri": str(where)}))
            elif not s[f"{impl}_load"].error:
                s[f"{impl}_load"].fail("nothing saved to load (the save failed)")
    return [
        compare("dcp", "dcp.save, StoreWriter (1 process)", s["dcp_store_save"], "dcp.save, FileSystemWriter",
                s["dcp_fs_save"], n, note="durable on both sides; StoreWriter also verifies by read-back"),
        compare("dcp", f"dcp.load, StoreReader ({ctx.cache})", s["dcp_store_load"], "dcp.load, FileSystemReader",
                s["dcp_fs_load"], n, note=load_note(s["dcp_store_load"], n, ctx.cold)),
    ]


scenario(Scenario("dcp", order=40, measure=measure, baselines=("dcp.save/load with FileSystemWriter/Reader",)))
