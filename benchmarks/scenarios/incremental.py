"""Incremental saves: ``CheckpointManager(incremental=True)`` against whole saves.

A state of --size (incremental-s3: --remote-size, on moto) that never changes (16 tensors of
64 MiB at 1 GiB) and an 8 MiB adapter that does (op ``incremental``, below). Targets: the
second save at most 0.15x a whole save, writing at most 1.1x the changed bytes; a save
where every byte changed and a cold restore at least 0.95x the plain way.
"""

from __future__ import annotations

import time

from benchmarks.backends.s3 import S3
from benchmarks.harness.context import Context, Site
from benchmarks.harness.registry import Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare, medians

INCREMENTAL_SECOND_TARGET = 1 / 0.15   # the frozen-base second save at most 0.15x a whole save
INCREMENTAL_SAME_TARGET = 0.95         # full change and restore: at least 0.95x the plain way
INCREMENTAL_TRAINED = 8 << 20          # the part that changes between steps
_INCREMENTAL_SERIES = ("second", "full", "full_inc", "full_plain", "restore_inc", "restore_plain")


def _incremental_rounds(ctx: Context, uri: str, opts: dict | None, what: str, size: int,
                        series: dict[str, Series]) -> None:
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        out = series["second"].add(lambda: ctx.run({"op": "incremental", "size_bytes": size, "uri": uri,
                                                    "trained_bytes": INCREMENTAL_TRAINED, "storage_options": opts,
                                                    "round": r, "cold": ctx.cold}))
        if out is None:
            for k, s in series.items():
                if k != "second":
                    s.fail(series["second"].error or "the run failed")
            break
        series["full"].add(lambda: {"seconds": out["plain_second_s"]})
        series["full_inc"].add(lambda: {"seconds": out["inc_full_change_s"]})
        series["full_plain"].add(lambda: {"seconds": out["plain_full_change_s"]})
        series["restore_inc"].add(lambda: {"seconds": out["inc_restore_s"]})
        series["restore_plain"].add(lambda: {"seconds": out["plain_restore_s"]})


def _incremental_rows(backend: str, series: dict[str, Series], size: int) -> list[Row]:
    res = series["second"].results
    wrote = max((r["inc_second_bytes"] for r in res), default=0)
    changed = INCREMENTAL_TRAINED
    total = size + INCREMENTAL_TRAINED
    return [
        compare(backend, "incremental: second save, frozen base", series["second"], "a whole save (plain run)",
                series["full"], total, target=INCREMENTAL_SECOND_TARGET,
                note=f"wrote {wrote} bytes, {wrote / changed:.3f}x the {changed} changed (target <= 1.1x)"),
        compare(backend, "incremental: save, every byte changed", series["full_inc"],
                "the same save with incremental=False", series["full_plain"], total,
                target=INCREMENTAL_SAME_TARGET, note=medians(series["full_inc"], series["full_plain"])),
        compare(backend, "incremental: restore (cold load)", series["restore_inc"],
                "a load of the same step saved whole", series["restore_plain"], total,
                target=INCREMENTAL_SAME_TARGET, note=medians(series["restore_inc"], series["restore_plain"])),
    ]


def bench_incremental(site: Site) -> list[Row]:
    """CheckpointManager(incremental=True) on the local disk: a frozen part of --size-gib and
    8 MiB that changes (see worker.op_incremental)."""
    ctx = site.ctx
    site.scratch.mkdir(parents=True, exist_ok=True)
    series = {k: Series() for k in _INCREMENTAL_SERIES}
    _incremental_rounds(ctx, str(site.scratch / "runs"), None, "incremental", ctx.size_bytes, series)
    return _incremental_rows("incremental", series, ctx.size_bytes)


def bench_incremental_s3(site: Site) -> list[Row]:
    """The incremental rows on S3 (moto, --remote-size-gib)."""
    ctx = site.ctx
    series = {k: Series() for k in _INCREMENTAL_SERIES}
    site.serve(lambda server: _incremental_rounds(ctx, site.uri(server, "incremental"), server.options(),
                                                  "incremental-s3", ctx.size_bytes, series), series, None)
    return _incremental_rows("incremental-s3", series, ctx.size_bytes)


def notes(ctx: Context) -> list[str]:
    return ["incremental: a state of --size-gib (s3: --remote-size-gib) that does not change and 8 MiB that "
            "does; the second save's target is at most 0.15x a whole save (ratio >= 6.67) writing at most "
            "1.1x the changed bytes; a save where every byte changed and a cold restore at least 0.95x the "
            "plain way."]



# --- worker side ------------------------------------------------------------------

@op("incremental")
def op_incremental(spec: dict) -> dict:
    """Incremental steps against whole ones, on the same bytes, in one process: a state of
    ``size_bytes`` frozen (unchanged between steps) plus ``trained_bytes`` that change.

    * second save: step 2 of an ``incremental=True`` run, after step 1 saved the same
      frozen part (seconds and bytes written), against a whole save of step 2 in a plain run;
    * full change: every byte new, incremental against plain;
    * restore: a cold ``load`` of the incremental step 2 against the plain step 2.
    """
    import ckptstore
    import torch

    from ckptstore.benchmeasure import drop_caches

    base = spec["uri"].rstrip("/")

    def child(name: str) -> str:
        path, q, query = base.partition("?")
        return f"{path}/{name}" + (q + query if q else "")
    opts = spec.get("storage_options")
    rnd = spec.get("round", 0)
    g = torch.Generator().manual_seed(rnd)
    piece = 64 << 20
    frozen = {f"frozen{i}": torch.randn(min(piece, spec["size_bytes"] - i * piece) // 4, generator=g)
              for i in range(-(-spec["size_bytes"] // piece))}
    trained = {"adapter": torch.randn(spec["trained_bytes"] // 4, generator=g)}
    state = {"frozen": frozen, "trained": trained, "step": 1}
    inc = ckptstore.CheckpointManager(child(f"r{rnd}-inc"), incremental=True, storage_options=opts)
    plain = ckptstore.CheckpointManager(child(f"r{rnd}-plain"), storage_options=opts)
    inc.save(1, state)
    plain.save(1, state)
    trained["adapter"].add_(1.0)
    state["step"] = 2
    out: dict = {"changed_bytes": spec["trained_bytes"]}
    # Which of the two goes first alternates between rounds, so neither is always the one
    # that meets a cache or a server just warmed (or still busy) from the other.
    order = (("inc", inc), ("plain", plain)) if rnd % 2 == 0 else (("plain", plain), ("inc", inc))
    for name, mgr in order:
        t = time.perf_counter()
        info = mgr.save(2, state)
        out[f"{name}_second_s"], out[f"{name}_second_bytes"] = time.perf_counter() - t, info.nbytes
    for name, mgr in order:
        fresh = {k: torch.randn(v.numel(), generator=g) for k, v in {**frozen, **trained}.items()}
        t = time.perf_counter()
        mgr.save(3, {"all": fresh, "step": 3})
        out[f"{name}_full_change_s"] = time.perf_counter() - t
        del fresh
    for name, _ in order:
        cold, _ = drop_caches() if spec.get("cold", True) else (False, "")
        t = time.perf_counter()
        got = ckptstore.load(child(f"r{rnd}-{name}/step-2"), storage_options=opts)
        # Every byte of every tensor read, so a lazily mapped result is paid for.
        touch = sum(float(v.sum()) for part in ("frozen", "trained") for v in got[part].values())
        out[f"{name}_restore_s"] = time.perf_counter() - t
        del got, touch
    inc.close()
    plain.close()
    out["seconds"] = out["inc_second_s"]
    out["state_bytes"] = spec["size_bytes"] + spec["trained_bytes"]
    return out



BASELINES = ("a whole save (plain run)", "the same save with incremental=False", "a load of the same step saved whole")
scenario(Scenario("incremental", order=110, measure=bench_incremental, notes=notes, disk=5, baselines=BASELINES))
scenario(Scenario("incremental-s3", order=111, measure=bench_incremental_s3, backend=S3, remote=True, disk=0.5,
                  baselines=BASELINES))
