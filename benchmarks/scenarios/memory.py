"""fsspec's ``memory://`` store against cloning the tensors in memory.

The store lives in the process, so clone, save and load share one worker per round (op
``roundtrip``). A save's extra memory includes the store's copy of the data (about 1x by
nature); a load's can be below zero if it shares the store's buffers. Reference rows.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks.backends.memory import MEMORY
from benchmarks.harness.context import Site, WorkerError
from benchmarks.harness.registry import LOADERS, SAVERS, Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare, load_note


def measure(site: Site) -> list[Row]:
    ctx = site.ctx
    clone, save, load = Series(), Series(), Series()
    for r in range(ctx.repeat):
        ctx.log(f"memory: round {r + 1}/{ctx.repeat}")
        spec = {"op": "roundtrip", "size_bytes": ctx.size_bytes, "uri": site.uri(None, f"r{r}")}
        try:
            out = ctx.run(spec)
        except WorkerError as e:
            save.error = load.error = str(e)
            break
        clone.seconds.append(out["clone_seconds"])
        save.add(lambda: out["save"])
        load.add(lambda: out["load"])
    n = ctx.state_bytes
    return [
        compare("memory", "ckptstore.save", save, "tensor clone", clone, n,
                note="extra RSS includes the in-memory store's copy of the data"),
        compare("memory", "ckptstore.load", load, "tensor clone", clone, n, note=load_note(load, n)),
    ]


# --- worker side ---------------------------------------------------------------------

def clone_seconds(state: Any) -> float:
    """Time to copy the state's tensors in memory (each shared storage once): the floor for
    anything that produces a second copy of the state, which is what a save into, or a
    load out of, an in-memory store does."""
    from ckptstore.benchmeasure import iter_tensors

    seen: set[int] = set()
    copies = []
    start = time.perf_counter()
    for t in iter_tensors(state):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            copies.append(t.clone())
    seconds = time.perf_counter() - start
    del copies
    gc.collect()
    return seconds


@op("roundtrip")
def op_roundtrip(spec: dict) -> dict:
    """Clone baseline, save and load in one process: a fresh process could not see what
    another one saved to ``memory://``."""
    from ckptstore.benchmeasure import measure_load, measure_save, state_nbytes

    from benchmarks.state import gpt_state

    save = SAVERS["ckptstore"](spec)
    load = LOADERS["ckptstore"](spec)
    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    nbytes = state_nbytes(state)
    result = {"state_bytes": nbytes, "clone_seconds": clone_seconds(state)}
    result["save"] = measure_save(save, state)
    # Drop the source state so the load is measured as a resumed run sees it.
    del state
    gc.collect()
    result["load"], _ = measure_load(load, nbytes)
    return result


scenario(Scenario("memory", order=20, measure=measure, backend=MEMORY, baselines=("tensor clone",)))
