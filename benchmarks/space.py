"""Space: what compression and thinning save, and what compression costs or gains in time.

    python -m benchmarks.space [--seconds 120] [--quick] [--out benchmarks/results/space]
                               [--only ratio,local,fuse,s3,footprint]

Random weights are no test of compression, so this first trains the small
causal transformer LM of ``benchmarks/codecs.py`` (4.2 M parameters, tied
embedding, AdamW) on the CPU for ``--seconds``, then measures, in order:

1. **ratio**: the trained state saved with ``compression="zstd"`` to the
   local disk as bf16 weights, fp32 weights, and fp32 weights + AdamW state
   (``{"model": model.state_dict(), "optimizer": opt.state_dict()}``); stored
   / logical bytes (``info.nbytes / info.logical_nbytes``) of each, and a
   bit-for-bit check of what loads back. Targets: <= 0.75 for bf16 weights,
   <= 0.90 for fp32 + AdamW.
2. **local**: save, and load (every byte read), of a larger fp32 + AdamW
   state (``--local-mib``: the trained state repeated as separate tensors,
   each copy's tensors rotated by a different number of elements, so every
   copy has the trained bytes' statistics and none is a duplicate of
   another) with ``compression`` None, "auto" and "zstd", on the local disk;
   ``--rounds`` rounds, the order of the three rotated every round, each
   save into a fresh directory; medians. Target: "auto" at >= 0.95x the
   speed of None (on a local disk "auto" stores raw: it must cost nothing).
3. **fuse** and **s3**: the same with None and "auto" (which compresses
   there) over a link of ``--bwlimit`` MiB/s each way: an rclone mount (a
   Drive stand-in: ``--vfs-cache-mode writes``, ``--bwlimit``) and moto's S3
   behind ``benchmarks/throttle.py`` (a token-bucket TCP proxy in its own
   process: rclone cannot limit S3). On the mount a save returns once
   rclone's cache holds the checkpoint; the upload to the remote follows, so
   the save is timed twice: until the call returns, and until rclone has
   uploaded every file (``RcloneMount.wait_uploaded``: every file in the
   remote directory with its size, no upload queued or running, polled every
   50 ms). That upload starts ``--write-back`` after each file's close: the
   mount is measured with 2 s (as the other benchmarks' mount; the 2 s are
   then in both "save + upload" figures) and with 0 s (uploads start at
   once; rclone then holds ckptstore's read-back of a file until its upload
   is done, so the call itself returns about when the upload has drained).
   Loads are cold: the mount is restarted with an empty cache first, so
   every byte comes over the limited link. On S3 a save returns after its
   commit, which is durable; the same save and load straight to moto, once,
   without the limit, are a reference. Target: "auto" faster than None.
4. **footprint**: a run of ``--steps`` steps saving every ``--every``
   (``CheckpointManager(keep_last=3, keep_every=1000)``) of the fp32 + AdamW
   state, every tensor changed before each save (an Adam-like update with a
   gradient drawn from the stored moments), with neither, with
   ``compression="zstd"``, with ``thin_after=3, thin_select="model"``, and
   with both: bytes under the run directory at the end and at their peak
   (sampled every 20 ms and after every save), scaled to a 350 M-parameter
   model by bytes per parameter, against Colab's 15 GB Drive.

Writes ``<out>/latest.json`` (every sample) and ``<out>/latest.md`` (the
tables, and the Colab table for the README). ``--quick``: 20 s of training,
smaller states, fewer rounds. Timings on a shared 2-core machine are noisy;
the ratios of bytes are not.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

import ckptstore
from benchmarks.codecs import train
from ckptstore.benchmeasure import state_nbytes, touch

MiB = 1 << 20
GB = 10 ** 9
MODES = (None, "auto", "zstd")
REMOTE_MODES = (None, "auto")
DRIVE_GB = 15                 # Colab's free Google Drive
SCALE_PARAMS = 350_000_000    # the model the README's Colab table is for


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mode_name(mode: str | None) -> str:
    return "none" if mode is None else mode


# --- states ---------------------------------------------------------------------------------

def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict | None = None) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``; a tensor met twice (tied weights)
    maps to one result, so ties survive."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()),
               obj.dtype)
        if key not in memo:
            memo[key] = fn(obj)
        return memo[key]
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn, memo)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, memo) for v in obj)
    return obj


def clone(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().clone())


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """fp32 weights + AdamW state, as a training loop saves them (clones: later changes stay out)."""
    return clone({"model": model.state_dict(), "optimizer": opt.state_dict()})


def weights_state(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    return {"model": map_tensors(model.state_dict(), lambda t: t.detach().to(dtype).clone())}


def repeated_state(base: dict, target_bytes: int) -> tuple[dict, int]:
    """``base`` repeated until it holds ``target_bytes`` or more: copy j has every tensor of
    ``base`` rotated by j * 4099 elements (ties kept), so each copy compresses as ``base`` does
    and no two blobs are equal. Returns the state and the number of copies."""
    copies = max(1, math.ceil(target_bytes / state_nbytes(base)))

    def rolled(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            if t.numel() < 2:
                return t.clone()
            return t.reshape(-1).roll(j * 4099).reshape(t.shape)
        return fn

    return {f"copy{j}": base if j == 0 else map_tensors(base, rolled(j)) for j in range(copies)}, copies


def same_bits(a: Any, b: Any, path: str = "") -> str | None:
    """None if ``b`` is ``a`` bit for bit (tensors: dtype, shape and bytes); else where it differs."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return path or "/"
        ab = a.contiguous().reshape(-1).view(torch.uint8)
        bb = b.contiguous().reshape(-1).view(torch.uint8)
        return None if torch.equal(ab, bb) else (path or "/")
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return path or "/"
        for k in a:
            bad = same_bits(a[k], b[k], f"{path}/{k}")
            if bad:
                return bad
        return None
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return path or "/"
        for i, (x, y) in enumerate(zip(a, b)):
            bad = same_bits(x, y, f"{path}/{i}")
            if bad:
                return bad
        return None
    return None if a == b else (path or "/")


def dir_files(root: Path) -> dict[str, int]:
    """{path: size} of the regular files under ``root`` (apparent sizes, as a Drive quota counts)."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:       # removed while walking
                continue
            if not os.path.islink(path):
                out[path] = st.st_size
    return out


def dir_bytes(root: Path) -> int:
    """Sum of the sizes of the regular files under ``root``."""
    return sum(dir_files(root).values())


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


# --- 1. ratio ---------------------------------------------------------------------------------

RATIO_TARGETS = {"bf16 weights": 0.75, "fp32 weights + AdamW": 0.90}


def part_ratio(model: torch.nn.Module, opt: torch.optim.Optimizer, scratch: Path) -> dict[str, dict[str, Any]]:
    states = {
        "bf16 weights": weights_state(model, torch.bfloat16),
        "fp32 weights": weights_state(model, torch.float32),
        "fp32 weights + AdamW": training_state(model, opt),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, state in states.items():
        where = scratch / "ratio" / name.replace(" ", "_").replace("+", "and")
        info = ckptstore.save(state, str(where), compression="zstd")
        back = ckptstore.load(str(where))
        bad = same_bits(state, back)
        out[name] = {"stored_bytes": info.nbytes, "logical_bytes": info.logical_nbytes,
                     "ratio": info.nbytes / info.logical_nbytes, "bit_exact": bad is None,
                     "target": RATIO_TARGETS.get(name)}
        if bad:
            out[name]["differs_at"] = bad
        log(f"ratio: {name}: {info.nbytes / MiB:.2f} / {info.logical_nbytes / MiB:.2f} MiB = "
            f"{info.nbytes / info.logical_nbytes:.3f}, bit-exact: {bad is None}")
        shutil.rmtree(where)
    return out


# --- 2, 3. speed ------------------------------------------------------------------------------

def rotated(modes: tuple, r: int) -> list:
    k = r % len(modes)
    return list(modes[k:] + modes[:k])


def timed_load(uri: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    obj = ckptstore.load(uri)
    touch(obj)
    return time.perf_counter() - t0, obj


def summarize(samples: dict[str, dict[str, list[float]]], stored: dict[str, int], logical: int,
              figures: Iterable[str]) -> dict:
    """Per mode: each figure's median/min/max and stored MiB/s; per figure: speed of auto / none
    and zstd / none, each the median of the rounds' own ratios (the modes of a round run back to
    back, so a round's ratio cancels what the disk or the host did to that round as a whole)."""
    out: dict[str, Any] = {"logical_bytes": logical, "modes": {}}
    for mode, figs in samples.items():
        out["modes"][mode] = {"stored_bytes": stored[mode]}
        for fig in figures:
            s = stats(figs[fig])
            s["stored_mib_per_s"] = stored[mode] / MiB / s["median"]
            out["modes"][mode][fig] = s
    def paired(mode: str, fig: str) -> float:
        return statistics.median(n / m for n, m in zip(samples["none"][fig], samples[mode][fig]))

    out["speed_auto_over_none"] = {fig: paired("auto", fig) for fig in figures}
    if "zstd" in out["modes"]:
        out["speed_zstd_over_none"] = {fig: paired("zstd", fig) for fig in figures}
    return out


def run_rounds(state: dict, modes: tuple, figures: tuple[str, ...], rounds: int,
               one: Callable[[int, Any], tuple[dict[str, float], Any, Any]],
               done: Callable[[int, Any], None], say: Callable[[int, dict], str]
               ) -> tuple[dict[str, dict[str, list[float]]], dict[str, int], dict[str, bool]]:
    """``rounds`` rounds, each running every mode once in an order rotated per round:
    ``one(round, mode)`` returns ({figure: seconds}, the save's info, the state loaded back),
    ``done(round, mode)`` cleans up after it, ``say(round, samples)`` is the round's log line.
    Returns (samples per mode and figure, stored bytes per mode, bit-exact per mode: the
    first load of each mode compared with ``state``)."""
    samples: dict[str, dict[str, list[float]]] = {mode_name(m): {f: [] for f in figures} for m in modes}
    stored: dict[str, int] = {}
    checked: dict[str, bool] = {}
    for r in range(rounds):
        for mode in rotated(modes, r):
            name = mode_name(mode)
            seconds, info, back = one(r, mode)
            for f in figures:
                samples[name][f].append(seconds[f])
            stored[name] = info.nbytes
            if name not in checked:
                checked[name] = same_bits(state, back) is None
            del back
            done(r, mode)
        log(say(r, samples))
    return samples, stored, checked


def part_local(state: dict, warm_state: dict, rounds: int, scratch: Path) -> dict:
    root = scratch / "local"
    root.mkdir(parents=True)
    for mode in MODES:   # untimed: the first save and load of each path fault in their code
        warm = str(root / f"warm-{mode_name(mode)}")
        ckptstore.save(warm_state, warm, compression=mode)
        timed_load(warm)
        shutil.rmtree(warm)
    def one(r: int, mode: Any) -> tuple[dict[str, float], Any, Any]:
        where = str(root / f"r{r}-{mode_name(mode)}")
        t0 = time.perf_counter()
        info = ckptstore.save(state, where, compression=mode)
        saved = time.perf_counter() - t0
        loaded, back = timed_load(where)
        return {"save": saved, "load": loaded}, info, back

    def done(r: int, mode: Any) -> None:
        shutil.rmtree(root / f"r{r}-{mode_name(mode)}")
        os.sync()

    samples, stored, checked = run_rounds(
        state, MODES, ("save", "load"), rounds, one, done,
        lambda r, samples: f"local: round {r + 1}/{rounds}: " + ", ".join(
            f"{n} save {s['save'][-1]:.3f} s load {s['load'][-1]:.3f} s" for n, s in samples.items()))
    out = summarize(samples, stored, state_nbytes(state), ("save", "load"))
    out["bit_exact"] = checked
    out["rounds"] = rounds
    return out


def part_fuse(state: dict, warm_state: dict, rounds: int, mib_per_s: float, write_back: str,
              scratch: Path) -> dict:
    from benchmarks.harness.servers import launchers

    backends = launchers()
    base = scratch / f"fuse-wb{write_back}"
    remote, mnt, cache = base / "remote", base / "mnt", base / "cache"
    mount = backends.RcloneMount(str(remote), str(mnt), str(cache), write_back=write_back,
                                 extra_args=("--bwlimit", f"{mib_per_s:g}M"))
    mount.start()
    try:
        bench = mnt / "bench"
        bench.mkdir()

        def one(where: Path, state: dict, mode: str | None) -> tuple[float, float, float, Any, Any]:
            t0 = time.perf_counter()
            info = ckptstore.save(state, str(where), compression=mode)
            returned = time.perf_counter() - t0
            mount.wait_uploaded(timeout=1800, poll=0.05)
            uploaded = time.perf_counter() - t0
            mount.remount()          # a new machine: empty cache, every byte read from the remote
            seconds, back = timed_load(str(where))
            return returned, uploaded, seconds, info, back

        for mode in REMOTE_MODES:       # untimed: fault in each path's code
            where = bench / f"warm-{mode_name(mode)}"
            one(where, warm_state, mode)
            shutil.rmtree(where)
        def timed(r: int, mode: Any) -> tuple[dict[str, float], Any, Any]:
            returned, uploaded, loaded, info, back = one(bench / f"r{r}-{mode_name(mode)}", state, mode)
            return {"save returns": returned, "save + upload": uploaded, "cold load": loaded}, info, back

        def done(r: int, mode: Any) -> None:
            shutil.rmtree(bench / f"r{r}-{mode_name(mode)}")
            mount.wait_uploaded(timeout=120)

        samples, stored, checked = run_rounds(
            state, REMOTE_MODES, ("save returns", "save + upload", "cold load"), rounds, timed, done,
            lambda r, samples: f"fuse (write-back {write_back}): round {r + 1}/{rounds}: " + ", ".join(
                f"{n} save {s['save returns'][-1]:.2f} s (+upload {s['save + upload'][-1]:.2f} s) "
                f"load {s['cold load'][-1]:.2f} s" for n, s in samples.items()))
        mount.stop()
    except BaseException:
        mount.kill_vm()
        raise
    out = summarize(samples, stored, state_nbytes(state), ("save returns", "save + upload", "cold load"))
    out.update(bit_exact=checked, rounds=rounds, bwlimit_mib_per_s=mib_per_s, write_back=write_back)
    return out


def part_s3(state: dict, warm_state: dict, rounds: int, mib_per_s: float) -> dict:
    from benchmarks.harness.servers import clear_prefix, launchers
    from benchmarks.throttle import Throttle

    backends = launchers()
    moto = backends.MotoServer()
    moto.start()
    try:
        moto.create_bucket("bench")
        fs = moto.filesystem()        # straight to moto, for the untimed cleanup
        with Throttle(moto.host, moto.port, mib_per_s) as link:
            opts = moto.options()

            def uri(name: str) -> str:
                return f"s3://bench/space/{name}?endpoint_url={link.endpoint}&key={opts['key']}&secret={opts['secret']}"

            for mode in REMOTE_MODES:
                ckptstore.save(warm_state, uri(f"warm-{mode_name(mode)}"), compression=mode)
                timed_load(uri(f"warm-{mode_name(mode)}"))
                clear_prefix(fs, f"bench/space/warm-{mode_name(mode)}")
            def one(r: int, mode: Any) -> tuple[dict[str, float], Any, Any]:
                where = uri(f"r{r}-{mode_name(mode)}")
                t0 = time.perf_counter()
                info = ckptstore.save(state, where, compression=mode)
                saved = time.perf_counter() - t0
                loaded, back = timed_load(where)
                return {"save": saved, "load": loaded}, info, back

            samples, stored, checked = run_rounds(
                state, REMOTE_MODES, ("save", "load"), rounds, one,
                lambda r, mode: clear_prefix(fs, f"bench/space/r{r}-{mode_name(mode)}"),
                lambda r, samples: f"s3: round {r + 1}/{rounds}: " + ", ".join(
                    f"{n} save {s['save'][-1]:.2f} s load {s['load'][-1]:.2f} s" for n, s in samples.items()))
        # A reference: the same straight to moto, no limit, once each: what the server and the
        # client manage here, to read the limited figures against.
        direct: dict[str, dict[str, float]] = {}
        direct_uri = f"s3://bench/space/direct?{moto.query()[1:]}"
        for mode in REMOTE_MODES:
            t0 = time.perf_counter()
            ckptstore.save(state, direct_uri, compression=mode)
            saved = time.perf_counter() - t0
            loaded, back = timed_load(direct_uri)
            del back
            direct[mode_name(mode)] = {"save": saved, "load": loaded}
            clear_prefix(fs, "bench/space/direct")
    finally:
        moto.stop()
    out = summarize(samples, stored, state_nbytes(state), ("save", "load"))
    out.update(bit_exact=checked, rounds=rounds, bwlimit_mib_per_s=mib_per_s, unlimited_once=direct)
    return out


# --- 4. footprint -----------------------------------------------------------------------------

FOOTPRINT_CONFIGS: dict[str, dict[str, Any]] = {
    "neither": {},
    'compression="zstd"': {"compression": "zstd"},
    'thin_after=3, thin_select="model"': {"thin_after": 3, "thin_select": "model"},
    "both": {"compression": "zstd", "thin_after": 3, "thin_select": "model"},
    "both, incremental": {"compression": "zstd", "thin_after": 3, "thin_select": "model", "incremental": True},
}


class PeakSampler:
    """Samples the files under ``root`` every ``period`` seconds in a thread: ``peak`` is the
    largest sum of their sizes, ``written`` the sum over every file ever seen, each once at its
    largest (every file a save writes has a new name): what the run wrote, which is what a
    Drive whose bin keeps deleted files for 30 days charges."""

    def __init__(self, root: Path, period: float = 0.02):
        self.root, self.period, self.peak = root, period, 0
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="space-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def sample(self) -> int:
        files = dir_files(self.root)
        for path, size in files.items():
            if size > self.seen.get(path, -1):
                self.seen[path] = size
        total = sum(files.values())
        self.note(total)
        return total

    @property
    def written(self) -> int:
        return sum(self.seen.values())

    def note(self, nbytes: int) -> None:
        self.peak = max(self.peak, nbytes)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def adam_like_update(pairs: list[tuple[torch.Tensor, dict]], gen: torch.Generator, lr: float = 3e-4) -> None:
    """Change every tensor as a stretch of training would: a gradient drawn from the moments'
    own mean and spread, the moments updated with it, the weights moved by lr along m / sqrt(v)."""
    for p, st in pairs:
        m, v = st["exp_avg"], st["exp_avg_sq"]
        g = m + (v - m * m).clamp_(min=0).sqrt_() * torch.randn(m.shape, generator=gen)
        m.mul_(0.9).add_(g, alpha=0.1)
        v.mul_(0.999).addcmul_(g, g, value=0.001)
        p.addcdiv_(m, v.sqrt().add_(1e-8), value=-lr)
        st["step"] += 100


def part_footprint(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, every: int,
                   scratch: Path, params: int) -> dict:
    from ckptstore import CheckpointManager

    names = [n for n, _ in model.named_parameters()]
    base = training_state(model, opt)
    out: dict[str, Any] = {"steps": steps, "every": every, "keep_last": 3, "keep_every": 1000,
                           "parameters": params, "state_bytes": state_nbytes(base), "configs": {}}
    for label, kw in FOOTPRINT_CONFIGS.items():
        state = clone(base)
        pairs = [(state["model"][n], state["optimizer"]["state"][i]) for i, n in enumerate(names)]
        gen = torch.Generator().manual_seed(7)       # the same changes for every configuration
        run = scratch / "footprint" / f"run{list(FOOTPRINT_CONFIGS).index(label)}"
        run.mkdir(parents=True)
        after: list[int] = []
        t0 = time.perf_counter()
        try:
            mgr = CheckpointManager(str(run), keep_last=3, keep_every=1000, **kw)
        except TypeError as e:       # thinning not in this ckptstore
            out["configs"][label] = {"error": f"{type(e).__name__}: {e}"}
            log(f"footprint: {label}: {e}")
            continue
        with PeakSampler(run) as sampler:
            for step in range(every, steps + 1, every):
                adam_like_update(pairs, gen)
                mgr.save(step, state)
                mgr.wait()
                after.append(sampler.sample())
            kept = mgr.steps()
            mgr.close()
        thinned = []
        for s in kept:
            with ckptstore.open(str(run / f"step-{s}")) as c:
                if c.info.meta.get("thinned"):
                    thinned.append(s)
        # each step's blobs as stored, wherever they lie (an incremental step's are in .shared)
        step_bytes = {s: ckptstore.api.info(str(run / f"step-{s}"))["stored"] for s in kept}
        final = dir_bytes(run)
        out["configs"][label] = {
            "end_bytes": final, "peak_bytes": max(sampler.peak, final), "written_bytes": sampler.written,
            "after_each_save": after,
            "kept_steps": kept, "thinned_steps": thinned, "step_bytes": step_bytes,
            "full_step_bytes": statistics.median(step_bytes[s] for s in kept if s not in thinned),
            "thinned_step_bytes": statistics.median(step_bytes[s] for s in thinned) if thinned else None,
            "seconds": time.perf_counter() - t0}
        log(f"footprint: {label}: end {final / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB, "
            f"written {sampler.written / MiB:.1f} MiB, "
            f"{len(kept)} steps kept ({len(thinned)} thinned), {time.perf_counter() - t0:.0f} s")
        shutil.rmtree(run)
    for label, c in out["configs"].items():     # bytes per parameter, times 350 M
        if "end_bytes" in c:
            c["scaled_350m"] = {k: None if c[k] is None else c[k] / params * SCALE_PARAMS
                                for k in ("end_bytes", "peak_bytes", "written_bytes", "full_step_bytes",
                                          "thinned_step_bytes")}
    return out


# --- report -----------------------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# Space: compression and thinning ({res['machine']['date']})", "",
             f"`{cfg['command']}`", "",
             f"Trained {res['training']['steps']} steps ({cfg['seconds']:g} s) to loss "
             f"{res['training']['final_loss']:.3f} (uniform guess {res['training']['initial_loss_bound']:.3f}); "
             f"{res['training']['parameters']:,} parameters. Machine: {res['machine']['cpu_count']} CPUs, "
             f"scratch on {res['machine']['scratch_fs']}.", ""]
    if "ratio" in res:
        lines += ["## Stored / logical bytes, `compression=\"zstd\"`", "",
                  "| state | logical | stored | stored / logical | target | bit-exact load |",
                  "|---|---:|---:|---:|---|---|"]
        for name, r in res["ratio"].items():
            tgt = f"<= {r['target']:.2f}: {'met' if r['ratio'] <= r['target'] else 'not met'}" if r["target"] else ""
            lines.append(f"| {name} | {_mib(r['logical_bytes'])} | {_mib(r['stored_bytes'])} | {r['ratio']:.3f} "
                         f"| {tgt} | {'yes' if r['bit_exact'] else 'NO'} |")
        lines.append("")
    sections: list[tuple[str, dict, tuple[str, ...]]] = []
    if "local" in res:
        sections.append(("Local disk", res["local"], ("save", "load")))
    for wb, p in res.get("fuse", {}).items():
        sections.append((f"rclone mount, --vfs-write-back {wb}", p, ("save returns", "save + upload", "cold load")))
    if "s3" in res:
        sections.append(("S3 (moto)", res["s3"], ("save", "load")))
    for title, p, figs in sections:
        if "error" in p:
            lines += [f"## {title}", "", f"not measured: {p['error']}", ""]
            continue
        limit = f", {p['bwlimit_mib_per_s']:g} MiB/s each way" if "bwlimit_mib_per_s" in p else ""
        lines += [f"## {title}: fp32 + AdamW state of {_mib(p['logical_bytes'])}{limit}, median of {p['rounds']} "
                  "rounds (min-max)", "",
                  "| compression | stored | " + " | ".join(figs) + " |",
                  "|---|---:|" + "---:|" * len(figs)]
        for mode, m in p["modes"].items():
            cells = [f"{m[f]['median']:.3f} s ({m[f]['min']:.3f}-{m[f]['max']:.3f}; "
                     f"{m[f]['stored_mib_per_s']:.0f} MiB/s stored)" for f in figs]
            lines.append(f"| {mode} | {_mib(m['stored_bytes'])} | " + " | ".join(cells) + " |")
        for other in ("auto", "zstd"):
            ratios = p.get(f"speed_{other}_over_none")
            if ratios:
                lines.append(f"| speed {other} / none | | " + " | ".join(f"{ratios[f]:.2f}x" for f in figs) + " |")
        if "unlimited_once" in p:
            lines += ["", "The same without the limit, once each (moto straight on loopback): " + ", ".join(
                f"{k} save {v['save']:.3f} s, load {v['load']:.3f} s" for k, v in p["unlimited_once"].items()) + "."]
        lines += ["", "bit-exact load: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in p["bit_exact"].items()),
                  ""]
    if "footprint" in res:
        f = res["footprint"]
        lines += [f"## Run footprint: {f['steps']:,} steps, a save every {f['every']}, keep_last=3, keep_every=1000, "
                  f"state {_mib(f['state_bytes'])} (fp32 + AdamW, {f['parameters']:,} parameters)", "",
                  "| configuration | steps kept (thinned) | at the end | peak | written in all "
                  "| at 350 M parameters: end / peak / written |",
                  "|---|---|---:|---:|---:|---:|"]
        for label, c in f["configs"].items():
            if "error" in c:
                lines.append(f"| {label} | not measured: {c['error']} | | | | |")
                continue
            s = c["scaled_350m"]
            lines.append(f"| {label} | {len(c['kept_steps'])} ({len(c['thinned_steps'])}) | {_mib(c['end_bytes'])} "
                         f"| {_mib(c['peak_bytes'])} | {_mib(c['written_bytes'])} | {s['end_bytes'] / GB:.1f} / "
                         f"{s['peak_bytes'] / GB:.1f} / {s['written_bytes'] / GB:.0f} GB |")
        lines += ["", "### For the README's Colab section", "", readme_table(res), ""]
    return "\n".join(lines) + "\n"


def readme_table(res: dict) -> str:
    """The Colab table, ready to paste (under 15 lines)."""
    f = res["footprint"]
    rows = [(label, c) for label, c in f["configs"].items() if "scaled_350m" in c]
    if not rows:
        return "(no configuration was measured)"
    kept = len(rows[0][1]["kept_steps"])
    lines = [f"A run of a 350M-parameter model (fp32 weights + AdamW) saving every {f['every']} of {f['steps']:,} "
             f"steps with `CheckpointManager(keep_last=3, keep_every=1000)` keeps {kept} steps. What they take on "
             f"Drive ({DRIVE_GB} GB free), and at the worst moment (a new step written, the old not yet removed):",
             "",
             "| also given | one step (thinned) | Drive at the end | peak | written in all | fits 15 GB |",
             "|---|---:|---:|---:|---:|---|"]
    for label, c in rows:
        s = c["scaled_350m"]
        thin = f" ({s['thinned_step_bytes'] / GB:.1f})" if s["thinned_step_bytes"] else ""
        fits = "yes" if s["peak_bytes"] <= DRIVE_GB * GB else "no"
        name = {"neither": "nothing", "both": 'both: `compression="zstd", thin_after=3, thin_select="model"`',
                "both, incremental": "both, and `incremental=True`"}.get(label, f"`{label}`")
        lines.append(f"| {name} | {s['full_step_bytes'] / GB:.1f}{thin} GB | {s['end_bytes'] / GB:.1f} GB "
                     f"| {s['peak_bytes'] / GB:.1f} GB | {s['written_bytes'] / GB:.0f} GB | {fits} |")
    lines += ["",
              f"Bytes per parameter as `python -m benchmarks.space` measured them on a {f['parameters'] / 1e6:.1f}M-"
              f"parameter model ({res['machine']['date'][:10]}), times 350M; how well a larger, longer-trained "
              "model compresses differs ([benchmarks](docs/benchmarks.md))."]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=None, help="training time (default 120; --quick 20)")
    ap.add_argument("--quick", action="store_true", help="20 s of training, smaller states, fewer rounds")
    ap.add_argument("--out", default="benchmarks/results/space", help="where latest.json and latest.md go")
    ap.add_argument("--only", default="ratio,local,fuse,s3,footprint",
                    help="comma-separated parts: ratio, local, fuse, s3, footprint")
    ap.add_argument("--local-mib", type=int, default=None, help="local state size, rounded up to whole copies of the trained state (default 256; --quick 128)")
    ap.add_argument("--remote-mib", type=int, default=None,
                    help="state size on the mount and S3, rounded up likewise (default 128; --quick 64)")
    ap.add_argument("--rounds", type=int, default=None, help="local rounds (default 11; --quick 5)")
    ap.add_argument("--remote-rounds", type=int, default=None, help="mount and S3 rounds (default 3; --quick 2)")
    ap.add_argument("--bwlimit", type=float, default=50.0, help="MiB/s each way on the mount and to S3")
    ap.add_argument("--write-back", default="2s,0s",
                    help="rclone --vfs-write-back settings to measure, comma-separated: the delay from a file's "
                         "close to its upload (2s as the other benchmarks; Drive's own is unknown)")
    ap.add_argument("--steps", type=int, default=10_000, help="footprint: steps of the run")
    ap.add_argument("--every", type=int, default=100, help="footprint: save every this many steps")
    ap.add_argument("--scratch", default=None, help="a directory on the local disk for the checkpoints")
    args = ap.parse_args(argv)
    q = args.quick
    seconds = args.seconds if args.seconds is not None else (20.0 if q else 120.0)
    local_mib = args.local_mib or (128 if q else 256)
    remote_mib = args.remote_mib or (64 if q else 128)
    rounds = args.rounds or (5 if q else 11)
    remote_rounds = args.remote_rounds or (2 if q else 3)
    write_backs = [w.strip() for w in args.write_back.split(",") if w.strip()]
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - {"ratio", "local", "fuse", "s3", "footprint"}
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")

    from benchmarks.harness.report import machine_info, write_atomic
    from benchmarks.harness.servers import fs_type

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ckptstore-space-", dir=args.scratch))
    command = "python -m benchmarks.space" + ("" if argv is None and len(sys.argv) == 1 else
                                              " " + " ".join(sys.argv[1:] if argv is None else argv))
    res: dict[str, Any] = {
        "machine": {**machine_info(scratch), "scratch_fs": fs_type(str(scratch))},
        "config": {"command": command, "seconds": seconds, "local_mib": local_mib, "remote_mib": remote_mib,
                   "rounds": rounds, "remote_rounds": remote_rounds, "bwlimit_mib_per_s": args.bwlimit,
                   "write_back": write_backs, "parts": parts, "steps": args.steps, "every": args.every},
    }
    try:
        log(f"training the LM of benchmarks/codecs.py for {seconds:g} s")
        model, opt, facts = train(seconds, log)
        res["training"] = facts
        log(f"trained {facts['steps']} steps to loss {facts['final_loss']:.3f}; {facts['parameters']:,} parameters")
        base = training_state(model, opt)
        if "ratio" in parts:
            res["ratio"] = part_ratio(model, opt, scratch)
        if "local" in parts:
            state, copies = repeated_state(base, local_mib * MiB)
            log(f"local: {copies} copies of the {state_nbytes(base) / MiB:.1f} MiB state, {state_nbytes(state) / MiB:.0f} MiB")
            res["local"] = part_local(state, base, rounds, scratch)
            res["local"]["copies"] = copies
            del state
        if "fuse" in parts or "s3" in parts:
            state, copies = repeated_state(base, remote_mib * MiB)
            runs: list[tuple[str, Callable[[], dict]]] = []
            if "fuse" in parts:
                res["fuse"] = {}
                for wb in write_backs:
                    runs.append((f"fuse, --vfs-write-back {wb}", functools.partial(
                        part_fuse, state, base, remote_rounds, args.bwlimit, wb, scratch)))
            if "s3" in parts:
                runs.append(("s3", functools.partial(part_s3, state, base, remote_rounds, args.bwlimit)))
            for what, run in runs:
                log(f"{what}: {state_nbytes(state) / MiB:.0f} MiB at {args.bwlimit:g} MiB/s")
                try:
                    got = run()
                    got["copies"] = copies
                except Exception as e:  # noqa: BLE001 - a backend that will not start is reported, the rest goes on
                    got = {"error": f"{type(e).__name__}: {e}"}
                    log(f"{what}: not measured: {type(e).__name__}: {e}")
                if what == "s3":
                    res["s3"] = got
                else:
                    res["fuse"][what.rsplit(" ", 1)[1]] = got
            del state
        if "footprint" in parts:
            res["footprint"] = part_footprint(model, opt, args.steps, args.every, scratch, facts["parameters"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["machine"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_atomic(out_dir / "latest.json", json.dumps(res, indent=1, default=str))
    text = markdown(res)
    write_atomic(out_dir / "latest.md", text)
    print(text)
    log(f"wrote {out_dir / 'latest.json'} and {out_dir / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
