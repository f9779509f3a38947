"""Preemption: from a SIGTERM sent mid-step to the committed checkpoint of that step.

A training loop with ``CheckpointManager(async_save=True, preemption_signals=SIGTERM)`` (the
loop shape of docs/resume.md), on the local disk (preempt) and on S3 (preempt-s3, moto,
--remote-size), against a blocking ``CheckpointManager.save`` of the same state in the same
process. Target: signal to commit at most 1.2x the blocking save.
"""

from __future__ import annotations

import os
import time

from benchmarks.backends.s3 import S3
from benchmarks.harness.context import Context, Site
from benchmarks.harness.registry import Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare

PREEMPT_TARGET = 1 / 1.2   # signal to commit at most 1.2x a blocking save


def _preempt_rounds(ctx: Context, uri: str, opts: dict | None, what: str, got: Series, base: Series) -> None:
    """Fill ``got`` (signal to commit) and ``base`` (the blocking save), one worker per round."""
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        out = got.add(lambda: ctx.run({"op": "preempt", "size_bytes": ctx.size_bytes, "uri": uri,
                                       "storage_options": opts, "round": r}))
        if out is None:
            base.fail(got.error or "the run failed")
            break
        base.add(lambda: {"seconds": out["blocking_seconds"]})


def _preempt_row(backend: str, got: Series, base: Series, n: int) -> Row:
    return compare(backend, "preemption: SIGTERM to committed checkpoint", got,
                   "a blocking CheckpointManager.save", base, n, target=PREEMPT_TARGET,
                   note="training loop with async_save=True; the signal lands mid-step")


def bench_preempt(site: Site) -> list[Row]:
    """From a SIGTERM sent mid-step to the committed checkpoint of that step (``preemption_signals``,
    ``async_save=True``, the loop shape of docs/resume.md), on the local disk, against a blocking
    ``CheckpointManager.save`` of the same state in the same process. Target: at most 1.2x."""
    ctx = site.ctx
    site.scratch.mkdir(parents=True, exist_ok=True)
    got, base = Series(), Series()
    _preempt_rounds(ctx, str(site.scratch / "runs"), None, "preempt", got, base)
    return [_preempt_row("preempt", got, base, ctx.state_bytes)]


def bench_preempt_s3(site: Site) -> list[Row]:
    """The preemption row on S3 (moto, --remote-size-gib)."""
    ctx = site.ctx
    got, base = Series(), Series()

    site.serve(lambda server: _preempt_rounds(ctx, site.uri(server, "preempt"), server.options(), "preempt-s3",
                                              got, base), {"got": got, "base": base}, None)
    return [_preempt_row("preempt-s3", got, base, ctx.state_bytes)]


def notes(ctx: Context) -> list[str]:
    return [f"preempt: seconds from the SIGTERM (sent from another thread while a step computes) until "
            f"save() returned with that step committed; target at most {1 / PREEMPT_TARGET:.1f}x a blocking "
            "save of the same state (ratio >= 0.83)."]



# --- worker side ------------------------------------------------------------------

@op("preempt")
def op_preempt(spec: dict) -> dict:
    """A training loop with ``CheckpointManager(async_save=True, preemption_signals=SIGTERM)`` at
    spec["uri"]: another thread sends this process SIGTERM part-way through a step, the loop
    sees it at the step's end and saves, and the clock runs from the signal until ``save``
    returns (the step committed). The baseline, in the same process on the same state: a
    blocking ``CheckpointManager.save`` of it (no signal), to another directory."""
    import signal
    import threading

    import ckptstore
    import torch
    from ckptstore.benchmeasure import state_nbytes

    from benchmarks.state import gpt_state

    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    opts = spec.get("storage_options")
    base = spec["uri"].rstrip("/")

    def child(name: str) -> str:
        path, q, query = base.partition("?")
        return f"{path}/{name}" + (q + query if q else "")
    rnd = spec.get("round", 0)
    with ckptstore.CheckpointManager(child(f"r{rnd}-warmup"), storage_options=opts) as warm:
        warm.save(0, {"w": torch.ones(1 << 16)})        # first-call costs out of both figures
    blocking = ckptstore.CheckpointManager(child(f"r{rnd}-blocking"), storage_options=opts)
    start = time.perf_counter()
    blocking.save(1, state)
    blocking_seconds = time.perf_counter() - start
    blocking.close()

    mgr = ckptstore.CheckpointManager(child(f"r{rnd}-preempted"), async_save=True, save_interval_steps=10**9,
                                      preemption_signals=signal.SIGTERM, storage_options=opts)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    sent: list[float] = []

    def send() -> None:
        time.sleep(0.2)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)
    t = threading.Thread(target=send)
    t.start()
    step = 0
    while True:
        for _ in range(20):               # a step of a few milliseconds of compute
            a = (a @ b).tanh_()
        step += 1
        stop = mgr.preempted
        if stop or mgr.should_save(step):
            mgr.save(step, state)
        if stop:
            break
    seconds = time.perf_counter() - sent[0]
    t.join()
    mgr.close()
    return {"seconds": seconds, "blocking_seconds": blocking_seconds, "steps": step,
            "state_bytes": state_nbytes(state)}



scenario(Scenario("preempt", order=100, measure=bench_preempt, notes=notes, disk=2.5,
                  baselines=("a blocking CheckpointManager.save",)))
scenario(Scenario("preempt-s3", order=101, measure=bench_preempt_s3, backend=S3, remote=True, disk=0.5,
                  baselines=("a blocking CheckpointManager.save",)))
