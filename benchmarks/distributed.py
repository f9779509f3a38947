"""The multi-rank manager against one process and against DCP, on the same bytes, in one run.

    python -m benchmarks.distributed [--size 1GiB] [--ranks 4] [--rounds 3] [--s3] [--out DIR]

Every figure is a ratio measured in this run, between jobs started the same
way (real processes, gloo on loopback, the job's c10d store), round after
round interleaved, median and best shown:

- ``sharded save``: a state of ``--size`` bytes split as DTensor shards
  (``Shard(0)``) across ``--ranks`` ranks, saved by ``CheckpointManager``,
  against one process saving the same bytes with ``ckptstore.save``
  (target >= 0.8x: the same cores do the work) and against DCP's
  ``FileSystemWriter`` (``dcp.save``) at the same ranks (target: ahead).
- ``sharded load``: ``restore(into=)`` of those shards against DCP's
  ``FileSystemReader`` (``dcp.load``) and one process's ``ckptstore.load``.
- ``replicated``: a DDP-like state (equal on every rank) saved by the ranks:
  bytes stored / state bytes (target 1.0) and time against one process's
  save (target <= 1.25x of it).
- ``async stall``: what ``save(async_save=True)`` blocks each rank, against
  an in-memory clone of that rank's part (target <= 1.5x).
- ``preemption``: SIGTERM to one non-zero rank until the step is committed.
- with ``--s3``: the sharded save at a quarter of ``--size`` on moto's S3,
  against DCP's ``FsspecWriter`` there.

Each save goes to a fresh directory, page cache dropped before loads where
the machine allows it (else the figures say warm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def launch(ranks: int, mode: str, where: str, nbytes: int, extra: dict | None = None,
           kill_after: float | None = None, timeout: float = 600) -> list[dict]:
    """Run ``mode`` on ``ranks`` processes; each prints one JSON line, returned in rank order."""
    port = _free_port()
    procs = []
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.distributed", "--worker", mode, where, str(nbytes),
             json.dumps(extra or {})], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if kill_after is not None:
        time.sleep(kill_after)
    out = []
    for r, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{mode}: rank {r} exited {p.returncode}:\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- one rank

def worker(mode: str, where: str, nbytes: int, extra: dict) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from torch.distributed.tensor import Shard, init_device_mesh

    import ckptstore

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    tensors = 8
    rows = nbytes // 4 // tensors // 1024

    def sharded_state(fill: bool = True):
        out = {}
        for i in range(tensors):
            # each rank builds only its own rows: the global tensor never exists anywhere
            local = torch.full((rows // world, 1024), float(i) if fill else 0.0)
            if fill:
                local += torch.arange(rows // world).unsqueeze(1) * 1e-3 + rank
            out[f"w{i}"] = torch.distributed.tensor.DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        return {"model": out}

    result: dict = {"rank": rank}
    opts = extra.get("storage_options")
    if mode in ("save", "save-async"):
        state = sharded_state()
        mgr = ckptstore.CheckpointManager(where, async_save=mode == "save-async", storage_options=opts,
                                          collective_timeout=600)
        dist.barrier()
        t = time.perf_counter()
        mgr.save(1, state)
        result["stall"] = time.perf_counter() - t
        mgr.wait()
        dist.barrier()
        result["seconds"] = time.perf_counter() - t
        if mode == "save-async":
            t = time.perf_counter()
            {k: v.to_local().clone() for k, v in state["model"].items()}
            result["clone"] = time.perf_counter() - t
        mgr.close()
    elif mode == "restore":
        state = sharded_state(fill=False)
        mgr = ckptstore.CheckpointManager(where, storage_options=opts, collective_timeout=600)
        dist.barrier()
        t = time.perf_counter()
        mgr.restore(into=state)
        dist.barrier()
        result["seconds"] = time.perf_counter() - t
        mgr.close()
    elif mode in ("dcp-save", "dcp-load"):
        import torch.distributed.checkpoint as dcp

        state = sharded_state(fill=mode == "dcp-save")
        if where.startswith("s3://"):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
            writer = lambda: FsspecWriter(where, **(opts or {}))      # noqa: E731
            reader = lambda: FsspecReader(where, **(opts or {}))      # noqa: E731
        else:
            writer = lambda: dcp.FileSystemWriter(where)              # noqa: E731
            reader = lambda: dcp.FileSystemReader(where)              # noqa: E731
        dist.barrier()
        t = time.perf_counter()
        if mode == "dcp-save":
            dcp.save(state, storage_writer=writer())
        else:
            dcp.load(state, storage_reader=reader())
        dist.barrier()
        result["seconds"] = time.perf_counter() - t
    elif mode == "replicated":
        torch.manual_seed(0)
        state = {"model": {f"w{i}": torch.randn(nbytes // 4 // tensors) for i in range(tensors)}}
        mgr = ckptstore.CheckpointManager(where, collective_timeout=600)
        dist.barrier()
        t = time.perf_counter()
        mgr.save(1, state)
        dist.barrier()
        result["seconds"] = time.perf_counter() - t
        mgr.close()
    elif mode == "preempt":
        state = {"model": {"w": torch.randn(nbytes // 4 // world)}, "rng": torch.get_rng_state()}
        mgr = ckptstore.CheckpointManager(where, preemption_signals=[signal.SIGTERM], collective_timeout=600)
        step = 0
        sent = None
        while True:
            step += 1
            x = torch.ones(1)
            dist.all_reduce(x)
            if rank == 1 and step == 20:
                sent = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
            if mgr.should_save(step):
                mgr.save(step, state)
                if mgr.preempted:
                    break
            time.sleep(0.005)
        result.update(step=step, committed=time.time(), sent=sent)
        mgr.close()
    dist.destroy_process_group()
    return result


def single(mode: str, where: str, nbytes: int, ranks: int = 4, kind: str = "sharded") -> float:
    """One process saving (or loading) the same bytes the ranks hold, with ckptstore.save / load:
    ``sharded``, the global tensors the ranks' shards form; ``replicated``, the DDP state."""
    code = f"""
import time, torch, ckptstore
torch.set_num_threads(1)
n = {nbytes} // 4 // 8
rows, world = n // 1024, {ranks}
if {kind!r} == "replicated":
    torch.manual_seed(0)
    state = {{"model": {{f"w{{i}}": torch.randn(n) for i in range(8)}}}}
else:
    def part(i, r):
        local = torch.full((rows // world, 1024), float(i))
        return local + torch.arange(rows // world).unsqueeze(1) * 1e-3 + r
    state = {{"model": {{f"w{{i}}": torch.cat([part(i, r) for r in range(world)]) for i in range(8)}}}}
if {mode!r} == "save":
    t = time.perf_counter(); ckptstore.save(state, {where!r}); print(time.perf_counter() - t)
else:
    t = time.perf_counter(); ckptstore.load({where!r}); print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run

def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if text.endswith(u):
            return int(float(text[:-len(u)]) * m)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        print(json.dumps(worker(argv[1], argv[2], int(argv[3]), json.loads(argv[4]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="also the sharded save on moto's S3 (needs moto[server])")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    args = ap.parse_args(argv)
    nbytes, ranks = _size(args.size), args.ranks
    root = Path(tempfile.mkdtemp(prefix="ckptstore-dist-bench-", dir=os.environ.get("BENCH_DIR", "/tmp")))
    series: dict[str, list[float]] = {}
    extra: dict[str, float] = {}
    cold = True

    def add(name: str, value: float) -> None:
        series.setdefault(name, []).append(value)
        print(f"  {name:<38} {value:8.3f}", flush=True)

    try:
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd}/{args.rounds}", flush=True)
            d = root / f"r{rnd}"
            add("ckptstore 1 proc save s", single("save", str(d / "single"), nbytes, ranks))
            add("ckptstore ranks save s", max(r["seconds"] for r in launch(ranks, "save", str(d / "mgr"), nbytes)))
            add("dcp FileSystemWriter save s",
                max(r["seconds"] for r in launch(ranks, "dcp-save", str(d / "dcp"), nbytes)))
            cold = drop_caches() and cold
            add("ckptstore 1 proc load s", single("load", str(d / "single"), nbytes, ranks))
            cold = drop_caches() and cold
            add("ckptstore ranks restore(into=) s",
                max(r["seconds"] for r in launch(ranks, "restore", str(d / "mgr"), nbytes)))
            cold = drop_caches() and cold
            add("dcp FileSystemReader load s",
                max(r["seconds"] for r in launch(ranks, "dcp-load", str(d / "dcp"), nbytes)))
            add("ckptstore 1 proc replicated-state save s",
                single("save", str(d / "single-rep"), nbytes, ranks, "replicated"))
            rep = launch(ranks, "replicated", str(d / "rep"), nbytes)
            add("ckptstore ranks replicated save s", max(r["seconds"] for r in rep))
            extra["replicated bytes stored / state"] = du(str(d / "rep")) / nbytes
            a = launch(ranks, "save-async", str(d / "async"), nbytes)
            add("async stall / clone (worst rank)", max(r["stall"] / r["clone"] for r in a))
            shutil.rmtree(d, ignore_errors=True)
        p = launch(ranks, "preempt", str(root / "preempt"), min(nbytes, 64 << 20))
        extra["SIGTERM to commit s"] = max(r["committed"] for r in p) - next(r["sent"] for r in p if r["sent"])
        extra["preempted ranks saved the same step"] = float(len({r["step"] for r in p}) == 1)
        if args.s3:
            extra.update(_s3(ranks, nbytes // 4, args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in series.items()}
    best = {k: min(v) for k, v in series.items()}
    rows = [
        ("sharded save: ranks vs 1 process (x, >=0.8)", "ckptstore 1 proc save s", "ckptstore ranks save s", 0.8),
        ("sharded save: ranks vs DCP FileSystemWriter (x, >1)", "dcp FileSystemWriter save s",
         "ckptstore ranks save s", 1.0),
        ("sharded load: restore(into=) vs DCP FileSystemReader (x, >1)", "dcp FileSystemReader load s",
         "ckptstore ranks restore(into=) s", 1.0),
        ("sharded load: restore(into=) vs 1 process load (x)", "ckptstore 1 proc load s",
         "ckptstore ranks restore(into=) s", None),
        ("replicated save: 1 process / ranks (x, >=0.8 i.e. <=1.25x)", "ckptstore 1 proc replicated-state save s",
         "ckptstore ranks replicated save s", 0.8),
    ]
    lines = [f"# Multi-rank benchmark ({ranks} ranks, {args.size}, {args.rounds} rounds, "
             f"{'cold' if cold else 'warm-cache'} loads, {os.cpu_count()} cores)", "",
             "| row | median | best | target | met |", "|---|---|---|---|---|"]
    out: dict = {"series": series, "rows": {}, "extra": extra}
    for name, base, ours, target in rows:
        m, b = med[base] / med[ours], best[base] / best[ours]
        ok = "" if target is None else ("yes" if m >= target else "no")
        lines.append(f"| {name} | {m:.2f} | {b:.2f} | {target or '-'} | {ok} |")
        out["rows"][name] = {"median": m, "best": b, "target": target}
    stall = series["async stall / clone (worst rank)"]
    lines.append(f"| async stall / in-memory clone, worst rank (x, <=1.5) | {statistics.median(stall):.2f} | "
                 f"{min(stall):.2f} | 1.5 | {'yes' if statistics.median(stall) <= 1.5 else 'no'} |")
    for k, v in extra.items():
        lines.append(f"| {k} | {v:.3f} | | | |")
    lines += ["", "Seconds per series (median of rounds):", ""]
    lines += [f"- {k}: {med[k]:.3f} (best {best[k]:.3f})" for k in series]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "distributed.json").write_text(json.dumps(out, indent=1))
        (Path(args.out) / "distributed.md").write_text(text + "\n")
    return 0


def _s3(ranks: int, nbytes: int, rounds: int) -> dict[str, float]:
    """The sharded save on moto's S3: ckptstore against DCP's FsspecWriter."""
    from tests.helpers.backends import MotoServer

    server = MotoServer()
    server.start()
    try:
        opts = server.options()
        ours, theirs = [], []
        for rnd in range(rounds):
            bucket = server.create_bucket(f"dist{rnd}")
            ours.append(max(r["seconds"] for r in launch(ranks, "save", f"s3://{bucket}/mgr", nbytes,
                                                         {"storage_options": opts})))
            theirs.append(max(r["seconds"] for r in launch(ranks, "dcp-save", f"s3://{bucket}/dcp", nbytes,
                                                           {"storage_options": opts})))
            print(f"  s3 round {rnd + 1}: ckptstore {ours[-1]:.2f} s, DCP FsspecWriter {theirs[-1]:.2f} s", flush=True)
    finally:
        server.stop()
    return {"s3 sharded save: ranks vs DCP FsspecWriter (x, >1), median":
            statistics.median(theirs) / statistics.median(ours)}


if __name__ == "__main__":
    sys.exit(main())
