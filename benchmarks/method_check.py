"""A second harness's method against ours, one difference at a time.

    python -m benchmarks.method_check [--mib 64 1024] [--rounds 3] [--workdir DIR]
                                      [--vary SWITCH ... | all] [--json PATH]

A harness that measures differently from ``make bench`` found ckptstore
slower than safetensors where ours finds it faster. This tool measures its
way (the default method) and can flip each difference back to ours, so the
difference that moves the ratios shows itself.

The default method:

- one process; the state built once, as ONE FLAT dict ``{name: tensor}``:
  the weights of ``gpt_state``'s GPT-like model (its shapes and seeded random
  data, the tied ``lm_head`` once) and AdamW's ``exp_avg`` and ``exp_avg_sq``
  of the same shapes, float32, so 1/3 weights and 2/3 moments, no step
  scalars; every saver gets this same dict;
- interleaved rounds in a fixed order, each saver once, then each loader
  once; best and median of ``--rounds``;
- before every measurement, saves included, ``sync`` and ``echo 3 >
  /proc/sys/vm/drop_caches`` (needs root; otherwise the output says the
  figures are warm);
- a save is timed from removing the previous checkpoint at its path (an
  untimed save of each comes first, so every timed save replaces one):
  ``ckptstore.save(state, dir)`` with its defaults;
  ``safetensors.torch.save_file(state, path)`` and ``torch.save(state, path)``,
  each followed by an fsync of the file and of its directory;
- a load is timed to its last byte read: ``ckptstore.load(dir)``,
  ``safetensors.torch.load_file(path)``, ``torch.load(path, mmap=True,
  weights_only=True)``, ``torch.load(path, weights_only=True)``, each followed
  by ``touch`` (an int64 sum over every tensor's bytes, as our harness does),
  so a mapped load pays for its reads.

Switches (``--vary``), each back to how ``make bench`` measures:

- ``nested``: ckptstore and torch.save get ``gpt_state`` itself (model and
  optimizer state_dicts, step scalars, tied weight, param_groups);
  safetensors keeps the flat dict;
- ``keep-cache``: only ``sync`` before a save, no page-cache drop (loads
  stay cold, as in ours);
- ``remove-outside``: the previous checkpoint removed, and synced, before
  the timer starts (ours saves into an emptied target);
- ``no-touch``: loads timed without reading their bytes (ours touches too:
  this one says what the touch costs each loader);
- ``fresh-process``: each measurement in a new ``python -m
  benchmarks.method_check --one SPEC`` process, which builds the state (for
  a save), imports, syncs or drops the cache, and times as above;
- ``no-dir-fsync``: the safetensors and torch.save savers fsync the file only.

``--vary a b`` measures the default method and one variant per switch,
``--vary all`` every switch, ``--vary a+b`` one variant with both; all
variants take their turn within each round. Per size it prints one table:
a row per saver and loader (best/median seconds, GB/s at best) and per
ratio (peer seconds / ckptstore seconds, >1: ckptstore faster, at best and
at median), a column per variant.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.context import fsync_path
from ckptstore.benchmeasure import drop_caches, state_nbytes, touch

SWITCHES = ("nested", "keep-cache", "remove-outside", "no-touch", "fresh-process", "no-dir-fsync")
DEFAULT = "default"
REPO = Path(__file__).resolve().parent.parent

# Each saver and loader, in the order of a round: (op, impl) -> (checkpoint name, label).
ROWS = {
    ("save", "ckptstore"): ("ckpt", "ckptstore.save"),
    ("save", "safetensors"): ("state.safetensors", "safetensors save_file + fsync"),
    ("save", "torch"): ("state.pt", "torch.save + fsync"),
    ("load", "ckptstore"): ("ckpt", "ckptstore.load"),
    ("load", "safetensors"): ("state.safetensors", "safetensors load_file"),
    ("load", "torch mmap"): ("state.pt", "torch.load(mmap=True)"),
    ("load", "torch"): ("state.pt", "torch.load"),
}


def build_states(mib: int, seed: int = 0) -> tuple[dict, dict]:
    """(flat, nested): the same tensors as one flat {name: tensor} dict and as ``gpt_state``."""
    from benchmarks.peers.files import flat_tensors
    from benchmarks.state import gpt_state

    nested = gpt_state(mib << 20, seed=seed)
    return {k: t for k, t in flat_tensors(nested).items() if t.dim()}, nested


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _settle(drop: bool) -> None:
    """Free what the last measurement left, write back dirty pages, and maybe drop the cache."""
    gc.collect()
    if drop:
        drop_caches()
    else:
        os.sync()


def _saver(impl: str, path: Path, dir_fsync: bool):
    import ckptstore
    import torch
    from safetensors.torch import save_file

    def durable(write):
        def run(state):
            write(state, str(path))
            fsync_path(path)
            if dir_fsync:
                fsync_path(path.parent)
        return run

    return {"ckptstore": lambda state: ckptstore.save(state, str(path)),
            "safetensors": durable(save_file), "torch": durable(torch.save)}[impl]


def _loader(impl: str, path: Path):
    import ckptstore
    import torch
    from safetensors.torch import load_file

    return {"ckptstore": lambda: ckptstore.load(str(path)),
            "safetensors": lambda: load_file(str(path)),
            "torch mmap": lambda: torch.load(str(path), mmap=True, weights_only=True),
            "torch": lambda: torch.load(str(path), weights_only=True)}[impl]


def measure(spec: dict, states: tuple[dict, dict]) -> float:
    """One timed save or load, as ``spec`` (op, impl, path, flags) says; its seconds."""
    flags, path, impl = set(spec["flags"]), Path(spec["path"]), spec["impl"]
    if spec["op"] == "save":
        state = states[1] if "nested" in flags and impl != "safetensors" else states[0]
        write = _saver(impl, path, "no-dir-fsync" not in flags)
        if "remove-outside" in flags:
            _remove(path)
        _settle("keep-cache" not in flags)
        start = time.perf_counter()
        if "remove-outside" not in flags:
            _remove(path)
        write(state)
        return time.perf_counter() - start
    read = _loader(impl, path)
    _settle(True)
    start = time.perf_counter()
    loaded = read()
    if "no-touch" not in flags:
        touch(loaded)
    seconds = time.perf_counter() - start
    del loaded
    return seconds


def run_one(spec: dict, states: tuple[dict, dict]) -> float:
    """``measure`` here, or in a fresh process under ``fresh-process``."""
    if "fresh-process" not in spec["flags"]:
        return measure(spec, states)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.method_check", "--one", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{spec['op']} {spec['impl']} failed in its process:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def summarize(samples: dict[tuple[str, str], list[float]], nbytes: int) -> dict:
    """Best, median and GB/s at best of each row; each peer's ratio to ckptstore."""
    rows = {f"{op} {impl}": {"samples": s, "best": min(s), "median": statistics.median(s),
                             "gbps": nbytes / min(s) / 1e9} for (op, impl), s in samples.items()}
    ratios = {}
    for op, impl in samples:
        if impl != "ckptstore":
            peer, ck = rows[f"{op} {impl}"], rows[f"{op} ckptstore"]
            ratios[f"{op}: ckptstore vs {impl}"] = {k: peer[k] / ck[k] for k in ("best", "median")}
    return {"rows": rows, "ratios": ratios}


def print_table(mib: int, nbytes: int, results: dict, rounds: int, cold: bool) -> None:
    width = max(20, *(len(v) + 2 for v in results))
    print(f"\n{mib} MiB ({nbytes / 2**20:.0f} MiB of tensors), {'cold' if cold else 'WARM (cache not dropped)'}, "
          f"{rounds} interleaved round(s). Cells: best/median seconds and GB/s at best; "
          "ratios: peer s / ckptstore s (>1: ckptstore faster), best/median.")
    print(f"{'':34s}" + "".join(f"{v:>{width}s}" for v in results))
    for (op, impl), (_, label) in ROWS.items():
        cells = (r["rows"][f"{op} {impl}"] for r in results.values())
        print(f"{op + ' ' + label:34s}" + "".join(
            f"{c['best']:.3f}/{c['median']:.3f} {c['gbps']:.2f}".rjust(width) for c in cells))
    for name in next(iter(results.values()))["ratios"]:
        cells = (r["ratios"][name] for r in results.values())
        print(f"{name:34s}" + "".join(f"{c['best']:.2f}x/{c['median']:.2f}x".rjust(width) for c in cells))


def variants_from(vary: list[str], parser: argparse.ArgumentParser) -> list[str]:
    out = [DEFAULT]
    for item in vary:
        for v in SWITCHES if item == "all" else [item]:
            if any(part not in SWITCHES for part in v.split("+")):
                parser.error(f"unknown switch in {v!r}; choose from {', '.join(SWITCHES)}, all, or a+b")
            if v not in out:
                out.append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: beside the repository)")
    ap.add_argument("--vary", nargs="*", default=[], metavar="SWITCH", help=f"{', '.join(SWITCHES)}, all, a+b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results there")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a fresh-process measurement
    args = ap.parse_args(argv)

    if args.one:
        spec = json.loads(args.one)
        states = build_states(spec["mib"], spec["seed"]) if spec["op"] == "save" else ({}, {})
        print(measure(spec, states), flush=True)
        return 0

    variants = variants_from(args.vary, ap)
    cold, why = drop_caches()
    if not cold:
        print(f"{why}{'' if os.geteuid() == 0 else ' (not root)'}", file=sys.stderr)
    report = {"rounds": args.rounds, "cold": cold, "cpus": os.cpu_count(), "variants": variants, "sizes": {}}
    for mib in args.mib:
        states = build_states(mib, args.seed)
        nbytes = state_nbytes(states[0])
        scratch = Path(tempfile.mkdtemp(prefix="ckptstore-method-check-", dir=args.workdir or REPO.parent))
        try:
            def spec(op: str, impl: str, flags: list[str]) -> dict:
                return {"op": op, "impl": impl, "path": str(scratch / ROWS[op, impl][0]), "flags": flags,
                        "mib": mib, "seed": args.seed}

            for op, impl in ROWS:
                if op == "save":
                    measure(spec(op, impl, []), states)  # so that every timed save replaces a checkpoint
            samples = {v: {key: [] for key in ROWS} for v in variants}
            for r in range(args.rounds):
                for v in variants:
                    flags = [] if v == DEFAULT else v.split("+")
                    for op, impl in ROWS:
                        samples[v][op, impl].append(run_one(spec(op, impl, flags), states))
                print(f"{mib} MiB: round {r + 1}/{args.rounds} done", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        del states
        results = {v: summarize(s, nbytes) for v, s in samples.items()}
        print_table(mib, nbytes, results, args.rounds, cold)
        report["sizes"][str(mib)] = {"nbytes": nbytes, "variants": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
