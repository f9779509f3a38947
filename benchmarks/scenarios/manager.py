"""``CheckpointManager`` on the local disk: what a save costs the training loop.

Stall: how long ``save()`` blocks with ``async_save=True`` (until it returns the handle)
against cloning every tensor storage in memory, the copy an async save cannot avoid; a
blocking ``CheckpointManager`` save and ``torch.save`` + fsync against the same clone for
reference. The async save's extra peak RSS is taken from the call until the background
write is committed.

Throughput: a small CPU training loop's time per step while the async save's background
write runs, against the same number of steps with no save, once with torch's default
intra-op threads and once with ``torch.set_num_threads(1)`` for the loop in both runs; and,
for reference, the loop while ``dd conv=fsync`` writes the same bytes from another process.
The save runs in a thread of the training process, as it does for a user.

One worker per round builds the state once and measures both (op ``manager``, below), so
the rows cost one state build per round.

Targets (the async-checkpoint issue): an async save blocks training for at most 1.5x the
time a plain in-memory copy of the state takes (as a ratio clone / stall: >= 1/1.5), and
training keeps >= 80% of its steps/s while the background write runs.
"""

from __future__ import annotations

import gc
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ckptstore.benchmeasure import current_rss, peak_rss, reset_peak_rss, unique_storages

from benchmarks.harness.context import Context, Site, WorkerError
from benchmarks.harness.registry import SAVERS, Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare

STALL_TARGET = 1 / 1.5
TRAIN_TARGET = 0.80
# torch intra-op threads for the training loop of the throughput rows: 0 is torch's default
# (one per core), 1 the fair alternative of leaving the other core(s) to the save.
TRAIN_THREADS = (0, 1)


def measure(site: Site) -> list[Row]:
    """The stall and throughput rows (see the module docstring), one worker per round."""
    ctx, base = site.ctx, site.scratch
    n = ctx.state_bytes
    s = {k: Series() for k in ("clone", "async", "sync", "torch")}
    # Seconds per training step, per thread setting: with the save, without, with dd.
    train = {t: {k: Series() for k in ("save", "none", "dd")} for t in TRAIN_THREADS}
    runs: dict[int, list[dict]] = {t: [] for t in TRAIN_THREADS}
    for r in range(ctx.repeat):
        ctx.log(f"manager: round {r + 1}/{ctx.repeat}")
        try:
            out = ctx.run({"op": "manager", "size_bytes": ctx.size_bytes, "dir": str(base),
                           "round": r, "threads": list(TRAIN_THREADS)})
        except WorkerError as e:
            for x in [*s.values(), *(x for t in train.values() for x in t.values())]:
                x.fail(str(e))
            continue
        for k, x in s.items():
            x.add(lambda: out["stall"][k])
        for t, series in train.items():
            run = out["train"][str(t)]
            runs[t].append(run)
            series["save"].add(lambda: {"seconds": run["with_save_seconds"] / run["steps"]})
            series["none"].add(lambda: {"seconds": run["without_seconds"] / run["steps"]})
            series["dd"].add(lambda: {"seconds": run["with_dd_seconds"] / run["dd_steps"]})

    clone = s["clone"]

    def times_clone(x: Series) -> str:
        return f"{x.best / clone.best:.2f}x the clone" if x.best and clone.best else ""

    a = s["async"]
    async_note = ""
    if a.results and clone.results:
        async_note = (
            f"stall = {times_clone(a)} (target <= {1 / STALL_TARGET:.1f}x, i.e. ratio >= "
            f"{STALL_TARGET:.2f}); committed {min(r['committed_seconds'] for r in a.results):.2f} s "
            "after save() was called (best, nothing else running); extra peak RSS counted from the "
            "call until commit, during the stall alone "
            f"{max(r['stall_extra_rss'] for r in a.results) / n:+.3f}x, the clone's "
            f"{max(clone.extra_rss) / n:+.3f}x; commit strategy "
            f"{', '.join(sorted({str(r.get('strategy')) for r in a.results}))}")
    rows = [
        compare("manager", "async save stall (CheckpointManager, async_save=True)", a,
                "storage clone", clone, n, STALL_TARGET, note=async_note),
        compare("manager", "blocking save (CheckpointManager, async_save=False)", s["sync"],
                "storage clone", clone, n, note=times_clone(s["sync"])),
        compare("manager", "blocking torch.save + fsync", s["torch"], "storage clone", clone, n,
                note=times_clone(s["torch"])),
    ]
    meaning = ("baseline time / time (higher is better): seconds per training step without "
               "the save / with it, i.e. steps/s with / without")
    for t, series in train.items():
        tr = runs[t]
        label = ((f"{tr[0]['threads'] if tr else os.cpu_count()} threads, default") if t == 0
                 else f"set_num_threads({t})")
        note = dd_note = ""
        if tr:
            dd_note = ("reference: what the machine leaves the loop while another process writes the "
                       "same bytes durably (dd bs=16M conv=fsync: no checksums, no Python); "
                       "ratio per round: ") + ", ".join(
                f"{r['without_seconds'] / r['steps'] / (r['with_dd_seconds'] / r['dd_steps']):.2f}"
                for r in tr)
            per_run = ", ".join(f"{r['without_seconds'] / r['with_save_seconds']:.2f}" for r in tr)
            note = (
                "seconds = per training step (MLP 512-1024-1024-512, batch 256, AdamW); "
                f"{min(r['steps'] for r in tr)}-{max(r['steps'] for r in tr)} steps while the save "
                f"ran, which took {min(r['save_seconds'] for r in tr):.2f}-"
                f"{max(r['save_seconds'] for r in tr):.2f} s from the call to the first step ending "
                f"after its commit; ratio per round: {per_run}")
        row = compare("manager", f"training during async save ({label})", series["save"],
                      "same steps, no save", series["none"], n, TRAIN_TARGET, note=note)
        ref = compare("manager", f"training during dd of the same bytes ({label})",
                      series["dd"], "same steps, no save", series["none"], n,
                      note=dd_note)
        for x in (row, ref):
            x.gb_per_s = None  # seconds are per training step here
            x.ratio_meaning = meaning
        rows += [row, ref]
    return rows



def notes(ctx: Context) -> list[str]:
    return [
        f"manager: ratios are against a clone of every tensor storage (stall rows; target: the "
        f"async stall <= {1 / STALL_TARGET:.1f}x the clone, ratio >= {STALL_TARGET:.2f}) and "
        f"against the same training steps with no save (training rows; ratio = steps/s with the "
        f"save / without, target >= {TRAIN_TARGET:.2f}). On {os.cpu_count()} CPUs the save's "
        "threads (writer: crc32c and writes; an fdatasync flusher; the read-back verify) compete "
        "with the training loop's intra-op threads for the same cores and memory bandwidth; "
        "with the default thread count torch's OpenMP workers wait on each other whenever the "
        "save holds a core. The set_num_threads(1) row leaves a core to the save in both runs "
        "(its baseline is the slower one-thread loop)."]



# --- worker side: one round, in one process -------------------------------------------

def storage_clone(state: Any) -> list[Any]:
    """``UntypedStorage.clone()`` of every distinct storage: the copy an async
    save has to make before it may return (what ``CheckpointManager``'s
    snapshot does for CPU tensors), with nothing else around it."""
    return [s.clone() for s in unique_storages(state)]


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the kernel.

    Copies freed by an earlier measurement in the same process stay resident
    in the malloc heap; the next copy would reuse them without raising RSS
    and its extra memory would read low. ``malloc_trim`` (glibc) returns
    them, so every measurement's RSS-before is the state plus the
    interpreter, as in a fresh process.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figures may read low, as the docstring says


def _timed_with_peak(fn: Callable[[], Any]) -> tuple[dict, Any]:
    _release_free_memory()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss": peak_rss() - rss_before}, out


def _clear_dir(path: Path) -> None:
    """Untimed: remove a checkpoint and sync, so no measurement pays for
    writing back or discarding an earlier one."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _stall_section(state: Any, nbytes: int, root: Path, rnd: int) -> dict:
    """How long saving blocks the training loop, against copying the state.

    Measures, in an order rotated by the round: the storage clone (the
    floor for an async save, which must copy before returning),
    ``CheckpointManager(async_save=True).save`` until it returns (the stall)
    and on until the background write is committed (its peak RSS is taken
    over that whole span), ``CheckpointManager(async_save=False).save`` and
    ``torch.save`` + fsync. An untimed clone first pays the process's first
    touch of fresh pages, which on a VM can cost several times a copy into
    recycled ones and would otherwise fall on whichever goes first.
    """
    import ckptstore

    warm = storage_clone(state)
    del warm

    def clone() -> dict:
        result, copies = _timed_with_peak(lambda: storage_clone(state))
        del copies
        return result

    def async_save() -> dict:
        mgr = ckptstore.CheckpointManager(root / "async", async_save=True)
        _release_free_memory()
        reset_peak_rss()
        rss_before = current_rss()
        start = time.perf_counter()
        handle = mgr.save(1, state)
        stall = time.perf_counter() - start
        stall_rss = peak_rss() - rss_before
        info = handle.result()
        committed = time.perf_counter() - start
        result = {"seconds": stall, "committed_seconds": committed,
                  "extra_rss": peak_rss() - rss_before, "stall_extra_rss": stall_rss,
                  "strategy": str(info.strategy)}
        mgr.close()
        _clear_dir(root / "async")
        return result

    def sync_save() -> dict:
        mgr = ckptstore.CheckpointManager(root / "sync", async_save=False)
        result, info = _timed_with_peak(lambda: mgr.save(1, state))
        result["strategy"] = str(info.strategy)
        mgr.close()
        _clear_dir(root / "sync")
        return result

    def torch_save() -> dict:
        path = root / "state.pt"
        result, _ = _timed_with_peak(lambda: SAVERS["torch"]({"uri": str(path)})(state))
        path.unlink()
        os.sync()
        return result

    steps = [("clone", clone), ("async", async_save), ("sync", sync_save), ("torch", torch_save)]
    k = rnd % len(steps)
    steps = steps[k:] + steps[:k]
    out: dict[str, Any] = {"order": [name for name, _ in steps]}
    for name, fn in steps:
        out[name] = fn()
    return out


def _training_loop(seed: int = 0) -> Callable[[], None]:
    """One step of a small CPU training run: a 3-layer MLP (512 -> 1024 ->
    1024 -> 512, 1.6 M parameters), batch 256, cross-entropy, AdamW. About
    25 ms a step on 2 idle cores with torch's default threads, 40-50 ms with
    one; fixed, never tuned to the save."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 512, generator=gen)
    y = torch.randint(0, 512, (256,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _steps_until(step: Callable[[], None], done: Callable[[], bool]) -> tuple[int, float]:
    """Training steps (at least one) until ``done()``; returns (steps, seconds)."""
    start = time.perf_counter()
    n = 0
    while True:
        step()
        n += 1
        if done():
            return n, time.perf_counter() - start


def _train_section(state: Any, nbytes: int, root: Path, rnd: int, settings: list[int]) -> dict:
    """Training steps/s while an async save of the state runs, and without.

    For each thread setting (0: torch's default), in an order rotated by the
    round: warm up; call ``CheckpointManager(async_save=True).save`` and,
    once it returns, run training steps until the save is committed; run the
    same number of steps with nothing else going on; then, as a reference
    for what the machine allows, run steps while ``dd conv=fsync`` (another
    process, no checksums, no Python) writes the same byte count. The save's
    writer runs in a thread of this process, as it does for a user.
    """
    import torch

    import ckptstore

    step = _training_loop()
    default_threads = torch.get_num_threads()
    k = rnd % len(settings)
    out: dict[str, Any] = {"default_threads": default_threads}
    for i, threads in enumerate(settings[k:] + settings[:k]):
        torch.set_num_threads(threads or default_threads)
        for _ in range(10):
            step()
        mgr = ckptstore.CheckpointManager(root / f"train-{i}", async_save=True)
        start = time.perf_counter()
        handle = mgr.save(1, state)
        stall = time.perf_counter() - start
        n, with_save = _steps_until(step, handle.done)
        handle.result()  # raises if the save failed
        mgr.close()
        _clear_dir(root / f"train-{i}")

        t0 = time.perf_counter()
        for _ in range(n):
            step()
        without = time.perf_counter() - t0

        target = root / "dd.bin"
        dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={nbytes}",
                               "iflag=count_bytes", "conv=fsync", "status=none"])
        n_dd, with_dd = _steps_until(step, lambda: dd.poll() is not None)
        if dd.wait() != 0:
            raise RuntimeError(f"dd exited with status {dd.returncode}")
        target.unlink()
        os.sync()
        out[str(threads)] = {
            "threads": torch.get_num_threads(), "steps": n, "with_save_seconds": with_save,
            "without_seconds": without, "stall_seconds": stall, "save_seconds": stall + with_save,
            "dd_steps": n_dd, "with_dd_seconds": with_dd}
    torch.set_num_threads(default_threads)
    return out


@op("manager")
def op_manager(spec: dict) -> dict:
    """``CheckpointManager`` on local disk, one round: the stall figures,
    then training throughput during a background save (see the two
    sections). Both share one process and one built state; every
    measurement frees what it made and hands it back to the kernel first."""
    from ckptstore.benchmeasure import state_nbytes

    from benchmarks.state import gpt_state

    root = Path(spec["dir"])
    root.mkdir(parents=True, exist_ok=True)
    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    nbytes = state_nbytes(state)
    rnd = spec.get("round", 0)
    return {"state_bytes": nbytes,
            "stall": _stall_section(state, nbytes, root, rnd),
            "train": _train_section(state, nbytes, root, rnd, list(spec["threads"]))}



scenario(Scenario(
    "manager", order=30, measure=measure, notes=notes, disk=2,
    baselines=("storage clone", "the same training steps with no save")))
