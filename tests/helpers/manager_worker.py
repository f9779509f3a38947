"""One rank of a torch.distributed job that drives the multi-rank CheckpointManager.

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python manager_worker.py SCENARIO ARGS...

Started by tests/helpers/ranks.py (see tests/test_distributed.py). Every rank
forms a gloo group on loopback, plays one scenario with its own state, and
prints what it saw as lines ``RESULT {json}`` (each with a ``"kind"`` and the
``"rank"``); the test decides. Other lines (``SAVING 2``, ``STEP 5``) mark
instants the test waits for before it sends a signal. Everything a rank
holds is a function of its rank and the step, so any process can compute
what a restore must give back.

Scenarios:

- ``ping``: one all_reduce (checks the launcher).
- ``layout DIR``: saves step 7 of ``layout_state`` (DTensors on a 1-D and a
  2-D mesh, a DDP replica, per-rank values), then restores it into fresh
  DTensors, and without ``into=``.
- ``reshard DIR``: at another world size, restores the ``layout`` step into
  DTensors placed otherwise; asking for the per-rank values must fail.
- ``inject DIR``: for each phase of ``PHASES``, rank 1's part of a save
  raises; every rank reports its error; then a save without injection.
- ``die DIR OPTIONS_JSON VICTIM RELEASE``: saves step 1, then step 2, during
  which rank VICTIM prints ``ENTER <phase>`` as each phase of its part
  starts, pauses after each, and never casts its commit vote, so that the
  test can SIGKILL it at an instant of its choice; survivors report their
  error, then exit at once (RELEASE ``-``: like a script the error ends) or
  once the file RELEASE exists (like a job that handles the error).
- ``retention DIR``: keep_last=2 over 5 saves, synchronous (``DIR/sync``),
  then async, the saves interleaved with training all_reduces, of a DDP
  state (``DIR/async-replicas``) and of one with a DTensor
  (``DIR/async-dtensors``); each part reports on its own.
- ``corrupt DIR``: saves steps 1 and 2; rank 0 flips bytes in every data file
  of step 2 that a non-zero rank slot wrote; a fresh manager restores.
- ``train TOTAL JOB...``: the deterministic training of ``train_step``, once
  per JOB: ``preempt:DIR`` (a manager with preemption_signals=[SIGTERM];
  saves when should_save says so and stops there), ``resume:DIR`` (restores
  and trains on to TOTAL), ``plain`` (no manager, steps 1..TOTAL).
"""
from __future__ import annotations

import datetime
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

import ckptstore

RANK = int(os.environ.get("RANK", "0"))          # the test imports this module too (no job there)
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
TIMEOUT = 6             # collective_timeout of every manager here (seconds)
PHASES = ("encode_part", "write_part", "verify_part", "vote_commit")
SLOT_FILES = 10 ** 6    # rank slot s numbers its data files from s * SLOT_FILES


# ---------------------------------------------------------------- reporting

def result(kind: str, **fields: Any) -> None:
    print("RESULT " + json.dumps({"kind": kind, "rank": RANK, **fields}), flush=True)


def mark(text: str) -> None:
    print(text, flush=True)


class Warnings(logging.Handler):
    """WARNING and above from ckptstore's loggers, as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("ckptstore"):
            self.seen.append(f"{record.levelname} {record.name}: {record.getMessage()}")


WARNINGS = Warnings()


def error_fields(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "message": str(e),
            "checkpoint_error": isinstance(e, ckptstore.CheckpointError)}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def same_bits(a: Any, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and digest(a) == digest(b))


def manager(directory: str, **kw: Any) -> ckptstore.CheckpointManager:
    kw.setdefault("collective_timeout", TIMEOUT)
    return ckptstore.CheckpointManager(directory, **kw)


# ---------------------------------------------------------------- the layout state

def layout_globals() -> dict[str, torch.Tensor]:
    """The global tensors of ``layout_state`` (odd sizes: uneven shards)."""
    return {
        "odd": torch.arange(13 * 7, dtype=torch.float32).reshape(13, 7) / 3,
        "grid": torch.arange(11 * 5, dtype=torch.float64).reshape(11, 5) * 1.5 - 7,
        "rows": torch.arange(9 * 4, dtype=torch.int64).reshape(9, 4) * 3 - 5,
        "cols": torch.arange(6 * 10, dtype=torch.int32).reshape(6, 10) - 30,
        "ddp": torch.arange(256 * 1024, dtype=torch.float32) / 7,    # 1 MiB, the same on every rank
    }


@functools.lru_cache(maxsize=None)
def mesh(*dims: int):
    """One device mesh per shape for the whole job (making one is a collective)."""
    return init_device_mesh("cpu", dims)


def layout_placements(world: int):
    """(mesh dims, {name: placements}) for ``world`` ranks; ``ddp`` stays a plain tensor."""
    if world == 4:
        return (2, 2), {"odd": None, "grid": [Shard(0), Shard(1)], "rows": [Shard(0), Replicate()],
                        "cols": [Replicate(), Shard(1)]}
    # another world size: a 1-D mesh, each tensor split along another dimension than when saved
    return (world,), {"odd": [Shard(1)], "grid": [Shard(0)], "rows": [Replicate()], "cols": [Shard(1)]}


def layout_model(world: int, fill: str = "values") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The model part of ``layout_state`` as this rank holds it, and the local shard of each DTensor
    it must hold once restored. ``fill="zeros"``: the same placements, holding zeros."""
    dims, placements = layout_placements(world)
    mesh1, mesh2 = mesh(world), mesh(*dims)
    model, expected = {}, {}
    for name, g in layout_globals().items():
        value = g if fill == "values" else torch.zeros_like(g)
        if name == "ddp":
            model[name] = value.clone()
            expected[name] = g
            continue
        if name == "odd" and world == 4:
            on, where = mesh1, [Shard(0)]   # 13 rows over 4 ranks: 4, 4, 4, 1
        else:
            on, where = mesh2, placements[name]
        model[name] = distribute_tensor(value, on, where)
        expected[name] = distribute_tensor(g, on, where).to_local().clone()
    return model, expected


def per_rank_values(rank: int) -> dict[str, Any]:
    torch.manual_seed(rank)
    return {"rng": torch.get_rng_state(), "loader": {"position": 1000 + rank},
            "mine": torch.full((4096,), float(rank))}


def layout_state(world: int) -> dict[str, Any]:
    model, _ = layout_model(world)
    return {"model": model, **per_rank_values(RANK), "step": 7}


def check_model(got: Any, expected: dict[str, torch.Tensor], into: dict[str, Any] | None,
                ptrs: dict[str, int] | None) -> list[str]:
    """What is wrong with a restored model (empty: nothing)."""
    problems = []
    if not isinstance(got, dict):
        return [f"model came back as {type(got).__name__}"]
    for name, want in expected.items():
        value = got.get(name)
        if into is not None:
            if value is not into[name]:
                problems.append(f"{name}: not the tensor passed in into=")
            held = into[name]
            local = held.to_local() if isinstance(held, DTensor) else held
            if local.data_ptr() != ptrs[name]:
                problems.append(f"{name}: memory moved")
            if not same_bits(local, want):
                problems.append(f"{name}: values differ")
        else:
            if isinstance(value, DTensor):
                problems.append(f"{name}: came back as a DTensor, not the global tensor")
            elif not same_bits(value, layout_globals()[name]):
                problems.append(f"{name}: not the global tensor ({getattr(value, 'shape', value)})")
    return problems


def local_ptrs(tree: dict[str, Any]) -> dict[str, int]:
    return {k: (v.to_local() if isinstance(v, DTensor) else v).data_ptr() for k, v in tree.items()}


def per_rank_problems(got: dict[str, Any]) -> list[str]:
    want = per_rank_values(RANK)
    problems = []
    if not same_bits(got.get("rng"), want["rng"]):
        problems.append("rng: not this rank's")
    if got.get("loader") != want["loader"]:
        problems.append(f"loader: {got.get('loader')!r}")
    if not same_bits(got.get("mine"), want["mine"]):
        problems.append("mine: not this rank's")
    if got.get("step") != 7:
        problems.append(f"step: {got.get('step')!r}")
    return problems


def scenario_layout(directory: str) -> None:
    with manager(directory) as mgr:
        mgr.save(7, layout_state(WORLD), metrics={"loss": 0.25})
        steps, latest = mgr.steps(), mgr.latest_step()
        into, expected = layout_model(WORLD, fill="zeros")
        ptrs = local_ptrs(into)
        got = mgr.restore(into={"model": into})
        problems = check_model(got["model"], expected, into, ptrs) + per_rank_problems(got)
        whole = mgr.restore()
        problems += [f"without into=: {p}" for p in check_model(whole["model"], expected, None, None)]
        problems += [f"without into=: {p}" for p in per_rank_problems(whole)]
    result("layout", steps=steps, latest=latest, problems=problems)


def scenario_reshard(directory: str) -> None:
    with manager(directory) as mgr:
        latest = mgr.latest_step()
        into, expected = layout_model(WORLD, fill="zeros")
        ptrs = local_ptrs(into)
        got = mgr.restore(select="model", into={"model": into})
        problems = check_model(got["model"] if isinstance(got, dict) else got, expected, into, ptrs)
        whole = mgr.restore(select="model")
        problems += [f"without into=: {p}" for p in check_model(whole["model"], expected, None, None)]
        try:
            mgr.restore()
        except ValueError as e:
            refused = error_fields(e)
        except Exception as e:  # noqa: BLE001 - reported, the test says what was expected
            refused = {**error_fields(e), "not_value_error": True}
        else:
            refused = None
    result("reshard", latest=latest, problems=problems, refused=refused)


# ---------------------------------------------------------------- failures

def small_state(step: int, sharded: bool = True) -> dict[str, Any]:
    """A DTensor (or, not ``sharded``, the same values replicated as DDP holds them), a replica and a
    per-rank value."""
    w = torch.arange(64 * 33, dtype=torch.float32).reshape(64, 33) + step
    model = {"w": distribute_tensor(w, mesh(WORLD), [Shard(0)]) if sharded else w,
             "b": torch.full((1000,), float(step))}
    if sharded:
        # 1 MiB over the ranks' shards, each large enough to be stored compressed (compression="zstd")
        wide = torch.arange(1024 * 256, dtype=torch.float32).reshape(1024, 256) / 1000 + step
        model["wide"] = distribute_tensor(wide, mesh(WORLD), [Shard(0)])
    return {"model": model, "mine": torch.full((256,), float(RANK * 100 + step)), "step": step}


def replace(name: str, fn) -> Any:
    """Put ``fn`` in place of ``ckptstore.manager.collective.<name>``; returns the original."""
    import ckptstore.manager.collective as collective

    original = getattr(collective, name)
    setattr(collective, name, fn)
    return original


def scenario_inject(directory: str) -> None:
    import ckptstore.manager.collective as collective

    with manager(directory) as mgr:
        mgr.save(1, small_state(1))
        step = 1
        for phase in PHASES:
            failing_step, next_step = step + 1, step + 2
            original = getattr(collective, phase)
            if RANK == 1:
                def injected(*args, **kwargs):
                    raise RuntimeError("injected")
                replace(phase, injected)
            t0 = time.monotonic()
            try:
                mgr.save(failing_step, small_state(failing_step))
            except Exception as e:  # noqa: BLE001 - reported
                outcome = error_fields(e)
            else:
                outcome = None
            took = time.monotonic() - t0
            replace(phase, original)
            after = {"latest": mgr.latest_step(), "steps": mgr.steps()}
            try:
                mgr.save(next_step, small_state(next_step))
                retry = None
            except Exception as e:  # noqa: BLE001 - reported
                retry = error_fields(e)
            result("inject", phase=phase, failing_step=failing_step, next_step=next_step, outcome=outcome,
                   seconds=took, after=after, retry=retry, latest=mgr.latest_step())
            step = next_step
        result("inject-end", steps=mgr.steps())


def die_state(step: int) -> dict[str, Any]:
    """About 1.5 MiB per rank: its shard of a 1 MiB-per-rank DTensor, its own 512 KiB, a replica."""
    rows = 256 * WORLD
    g = torch.arange(rows * 1024, dtype=torch.float32).reshape(rows, 1024) + step
    gen = torch.Generator().manual_seed(RANK * 1000 + step)
    return {"model": {"w": distribute_tensor(g, mesh(WORLD), [Shard(0)]), "b": torch.full((64 * 1024,), float(step))},
            "mine": torch.randn(128 * 1024, generator=gen), "step": step}


def scenario_die(directory: str, options_json: str, victim: str, release: str) -> None:
    import ckptstore.manager.collective as collective

    options = json.loads(options_json) or None
    mgr = manager(directory, storage_options=options)
    t0 = time.monotonic()
    mgr.save(1, die_state(1))
    mark(f"SAVED 1 in {time.monotonic() - t0:.2f} s")
    state = die_state(2)
    if RANK == int(victim):
        # Each phase of this rank's part says when it starts and is followed by a pause, so that
        # the test can kill the rank at a random instant of a phase it picks; it never votes, so
        # the kill always comes before the step could commit.
        for phase in PHASES:
            def announced(*args, _phase=phase, _original=getattr(collective, phase), **kwargs):
                mark(f"ENTER {_phase}")
                if _phase == "vote_commit":
                    time.sleep(600)
                out = _original(*args, **kwargs)
                time.sleep(0.3)
                return out
            replace(phase, announced)
    mark("SAVING 2")
    t0 = time.monotonic()
    try:
        mgr.save(2, state)
    except Exception as e:  # noqa: BLE001 - reported
        outcome = error_fields(e)
    else:
        outcome = None
    result("die", outcome=outcome, seconds=time.monotonic() - t0)
    if release != "-":
        # Stay (as a job that handles the error would) until the test has every survivor's word.
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    # A rank of this job is dead: no collective (nor the group's teardown) can be trusted now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- retention, corruption

def scenario_retention(directory: str) -> None:
    ones = torch.ones(1024)
    with manager(f"{directory}/sync", keep_last=2) as mgr:
        for step in range(1, 6):
            mgr.save(step, small_state(step))
            t = ones.clone()
            dist.all_reduce(t)
        result("retention-sync", steps=mgr.steps(), latest=mgr.latest_step(), warnings=list(WARNINGS.seen))
    for kind in ("replicas", "dtensors"):
        dist.barrier()
        try:
            async_saves(f"{directory}/async-{kind}", ones, kind)
        except Exception as e:  # noqa: BLE001 - reported with its traceback; each part stands on its own
            result(f"retention-async-{kind}", failed={**error_fields(e), "traceback": traceback.format_exc()})


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def async_saves(directory: str, ones: torch.Tensor, kind: str) -> None:
    sharded = kind == "dtensors"
    problems = []
    # the DTensor run compresses: each rank compresses the shards it writes, rank 0's record says how
    with manager(directory, keep_last=2, async_save=True, compression="zstd" if sharded else None) as mgr:
        state = small_state(1, sharded)
        for step in range(1, 6):
            for _ in range(3):   # training's collectives while the previous save may be in flight
                t = ones.clone()
                dist.all_reduce(t)
                if not torch.equal(t, ones * WORLD):
                    problems.append(f"all_reduce before save {step} gave {t[0].item()}")
            mgr.save(step, state)
            # The training goes on in place at once: nothing of this may reach step `step`.
            nxt = small_state(step + 1, sharded)
            local(state["model"]["w"]).copy_(local(nxt["model"]["w"]))
            if sharded:
                local(state["model"]["wide"]).copy_(local(nxt["model"]["wide"]))
            state["model"]["b"].copy_(nxt["model"]["b"])
            state["mine"].copy_(nxt["mine"])
            state["step"] = step + 1
            for _ in range(3):
                t = ones.clone()
                dist.all_reduce(t)
        mgr.wait()
        steps, latest = mgr.steps(), mgr.latest_step()
        into = small_state(0, sharded)
        got = mgr.restore(step=5, into={"model": into["model"]})
        want = small_state(5, sharded)
        if not same_bits(local(into["model"]["w"]), local(want["model"]["w"])) or \
                not same_bits(into["model"]["b"], want["model"]["b"]) or \
                (sharded and not same_bits(local(into["model"]["wide"]), local(want["model"]["wide"]))):
            problems.append("step 5's model is not what it was when save(5) was called")
        if not same_bits(got.get("mine"), want["mine"]) or got.get("step") != 5:
            problems.append("step 5's per-rank value or step is not what it was when save(5) was called")
    result(f"retention-async-{kind}", failed=None, steps=steps, latest=latest, problems=problems,
           warnings=list(WARNINGS.seen))


def flip_non_zero_slots(step_dir: Path) -> list[str]:
    """Flip bytes in every data file of ``step_dir`` numbered from SLOT_FILES on."""
    from ckptstore.format.manifest import FileName

    flipped = []
    for path in sorted(step_dir.iterdir()):
        f = FileName.parse(path.name)
        if f is None or f.role != "data" or f.number < SLOT_FILES:
            continue
        data = bytearray(path.read_bytes())
        for at in {0, len(data) // 2}:
            if at < len(data):
                data[at] ^= 0xFF
        path.write_bytes(bytes(data))
        flipped.append(path.name)
    return flipped


def scenario_corrupt(directory: str) -> None:
    with manager(directory) as mgr:
        mgr.save(1, small_state(1))
        mgr.save(2, small_state(2))
    dist.barrier()
    flipped = flip_non_zero_slots(Path(directory) / "step-2") if RANK == 0 else None
    dist.barrier()
    with manager(directory) as mgr:
        into = small_state(0)
        got = mgr.restore(into={"model": into["model"]})
        want = small_state(1)
        holds_step_1 = (same_bits(into["model"]["w"].to_local(), want["model"]["w"].to_local())
                        and same_bits(into["model"]["b"], want["model"]["b"])
                        and same_bits(got.get("mine"), want["mine"]))
        result("corrupt", got_step=got.get("step"), holds_step_1=holds_step_1, flipped=flipped,
               steps=mgr.steps(), warnings=WARNINGS.seen)


# ---------------------------------------------------------------- training, preemption

N = 4096


def train_init() -> dict[str, Any]:
    """Step 0 of the training: a replicated weight (DDP), a sharded optimizer buffer (FSDP-like),
    this rank's RNG and data loader position."""
    torch.manual_seed(1234 + RANK)
    return {"model": {"w": torch.zeros(N, dtype=torch.float64)},
            "opt": {"m": distribute_tensor(torch.zeros(N, dtype=torch.float64), mesh(WORLD), [Shard(0)])},
            "loader": {"position": 0}, "step": 0}


def train_step(state: dict[str, Any], step: int) -> None:
    g = torch.randn(N, dtype=torch.float64)     # this rank's batch: its own RNG stream
    dist.all_reduce(g)                           # the per-step collective of DDP training
    g /= WORLD
    m = state["opt"]["m"].to_local()
    m.mul_(0.9).add_(torch.chunk(g, WORLD)[RANK])
    state["model"]["w"].sub_(0.01 * g)
    state["loader"]["position"] += 3 + RANK
    state["step"] = step


def train_summary(state: dict[str, Any]) -> dict[str, Any]:
    return {"step": state["step"], "w": digest(state["model"]["w"]), "m": digest(state["opt"]["m"].full_tensor()),
            "rng": digest(torch.get_rng_state()), "position": state["loader"]["position"]}


def run_preempted(directory: str, total: int) -> None:
    state = train_init()
    saved, should = None, []
    with manager(directory, preemption_signals=[signal.SIGTERM]) as mgr:
        mark("READY")
        for step in range(1, total + 1):
            train_step(state, step)
            mark(f"STEP {step}")
            time.sleep(0.03)
            if mgr.should_save(step):
                should.append(step)
                mgr.save(step, {**state, "rng": torch.get_rng_state()})
                saved = step
                mark(f"SAVED {step}")
                break   # no save schedule here: a save is the preemption's, and the run ends there
        preempted = mgr.preempted
        steps = mgr.steps()
    result("preempt", directory=directory, saved=saved, should=should, preempted=preempted, steps=steps,
           **{f"at_end_{k}": v for k, v in train_summary(state).items()})


def run_resumed(directory: str, total: int) -> dict[str, Any]:
    state = train_init()
    with manager(directory) as mgr:
        got = mgr.restore(into={"model": state["model"], "opt": state["opt"]})
    start = got["step"]
    state["loader"] = got["loader"]
    state["step"] = start
    torch.set_rng_state(got["rng"])
    for step in range(start + 1, total + 1):
        train_step(state, step)
    return {"resumed_from": start, **train_summary(state)}


def run_plain(total: int) -> dict[str, Any]:
    state = train_init()
    for step in range(1, total + 1):
        train_step(state, step)
    return train_summary(state)


def scenario_train(total: str, *jobs: str) -> None:
    for job in jobs:
        what, _, directory = job.partition(":")
        if what == "preempt":
            run_preempted(directory, int(total))
        elif what == "resume":
            result("resume", directory=directory, **run_resumed(directory, int(total)))
        elif what == "plain":
            result("plain", **run_plain(int(total)))
        else:
            raise SystemExit(f"unknown training job {job!r}")


def scenario_ping() -> None:
    t = torch.tensor([float(RANK)])
    dist.all_reduce(t)
    result("ping", world=dist.get_world_size(), sum=t.item())


SCENARIOS = {"ping": scenario_ping, "layout": scenario_layout, "reshard": scenario_reshard,
             "inject": scenario_inject, "die": scenario_die, "retention": scenario_retention,
             "corrupt": scenario_corrupt, "train": scenario_train}


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().addHandler(WARNINGS)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    SCENARIOS[name](*args)
    # Reference cycles of failures (exceptions, frames, the groups they hold) go now, not in the
    # interpreter's teardown, where gloo may abort after the job did all it should.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is said and the group is gone: skip the interpreter's teardown of torch, which
    # costs seconds per rank on a small machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
