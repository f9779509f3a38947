"""The Colab-like soak: a notebook trains in a real Jupyter kernel, checkpoints to a
Drive-like rclone mount, and the "VM" dies again and again.

One life of the VM: a fresh ipykernel (started by nbclient) runs the notebook
below. The notebook builds the deterministic trainer of ``resume_train.py``,
asks a ``CheckpointManager`` on the mount for the newest checkpoint that
verifies, and trains on with async saves on a step schedule and a retention
policy, as a Colab user would. At a random instant the harness kills the VM:
SIGKILL to the kernel and to rclone, the mount's write-back cache deleted (the
VM's disk is gone), the mount remounted on the same remote directory (a new VM).
What had not reached the remote is lost. After ``deaths`` deaths the last life
runs to the end.

The notebook writes what it does to an event log on the harness's disk (the
user's screen, which outlives the VM): each step's loss, each save and a
digest of what it saved, each resume and how long it took. After each death
the harness also finds, on the remote directory itself, the newest step whose
checkpoint was fully uploaded and deep-verifies there. It checks:

* every resume started from exactly that step (nothing newer survived whole, and
  nothing torn was taken), and what it restored equals what an uninterrupted run
  saved at that step (the digests match);
* each death lost only the steps since that checkpoint;
* every loss any life computed, the final per-step losses kept in the final
  checkpoint, and the final parameters and optimizer state equal those of an
  uninterrupted run of the same notebook, bit for bit.

    python tests/helpers/soak.py --deaths 30 --report benchmarks/results/soak

runs the long version (``make soak``) and writes report.json and report.md.
The test suite runs a short one (tests/test_soak.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers.backends import RcloneMount  # noqa: E402

# -- the notebook --------------------------------------------------------------------------

SETUP = '''\
import json, os, sys, time
sys.path.insert(0, {tests_dir!r})
import torch
import ckptstore
from helpers.resume_train import build, train, training_state, load_training_state
from helpers.soak import digest

CKPT_DIR, LOG = {ckpt_dir!r}, {log!r}
TOTAL, EVERY, KEEP_LAST, SETTLE, PACE, WIDTH = {total}, {every}, {keep_last}, {settle}, {pace}, {width}

def log(event, **kv):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"event": event, "pid": os.getpid(), "time": time.time(), **kv}}) + "\\n")

log("started")
'''

RESUME = '''\
model, opt, sched, loader, loader_gen, pos = build(TOTAL, width=WIDTH)
mgr = ckptstore.CheckpointManager(CKPT_DIR, keep_last=KEEP_LAST, async_save=True,
                                  save_interval_steps=EVERY, upload_settle_seconds=SETTLE)
t0 = time.monotonic()
state = mgr.restore()
restore_s = time.monotonic() - t0
losses = []
if state is not None:
    load_training_state(state, model, opt, sched, loader_gen, pos)
    losses = list(state["losses"])
    log("resumed", step=pos["step"], restore_s=restore_s, digest=digest(state))
else:
    log("resumed", step=0, restore_s=restore_s, digest=None)
del state
'''

TRAIN = '''\
def after_step():
    time.sleep(PACE)                      # the rest of a real step (data, logging, ...)
    step = pos["step"]
    log("step", step=step, loss=losses[-1].hex())
    if mgr.should_save(step):
        state = training_state(model, opt, sched, loader_gen, pos)
        state["losses"] = list(losses)
        log("saving", step=step, digest=digest(state))
        mgr.save(step, state)
    return False

train(model, opt, sched, loader, loader_gen, pos, TOTAL, resuming=pos["step"] > 0,
      after_step=after_step, losses=losses)
mgr.close()
log("done", step=pos["step"])
'''


def digest(state) -> str:
    """sha256 of everything the resumed run depends on: parameters, optimizer
    and scheduler state, RNG states, the loader position and the losses so far."""
    import torch

    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"{")
            for k in sorted(obj, key=repr):
                h.update(repr(k).encode())
                feed(obj[k])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for v in obj:
                feed(v)
            h.update(b"]")
        elif isinstance(obj, float):
            h.update(obj.hex().encode())
        else:
            h.update(repr(obj).encode())

    feed(state)
    return h.hexdigest()


def notebook(ckpt_dir: str, log: str, *, total: int, every: int, keep_last: int, settle: float,
             pace: float, width: int):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP.format(tests_dir=str(TESTS_DIR), ckpt_dir=ckpt_dir, log=log,
                                               total=total, every=every, keep_last=keep_last, settle=settle,
                                               pace=pace, width=width)),
        nbformat.v4.new_code_cell(RESUME),
        nbformat.v4.new_code_cell(TRAIN),
    ]
    nb.metadata["kernelspec"] = {"name": "ckptstore-soak", "display_name": "ckptstore soak", "language": "python"}
    return nb


# -- one kernel ----------------------------------------------------------------------------


def _kernel_manager(spec_dir: Path):
    """A KernelManager for an ipykernel of this very interpreter (not whatever
    ``python`` is first on PATH)."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kdir = spec_dir / "kernels" / "ckptstore-soak"
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ckptstore soak", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir / "kernels")])
    return KernelManager(kernel_name="ckptstore-soak", kernel_spec_manager=ksm)


def run_notebook(nb_path: Path, spec_dir: Path, workdir: Path) -> None:
    """Execute a notebook in a fresh ipykernel (one life's Colab frontend)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(nb_path), as_version=4)
    NotebookClient(nb, km=_kernel_manager(spec_dir), timeout=3600, startup_timeout=120,
                   resources={"metadata": {"path": str(workdir)}}).execute()


class Life:
    """One life of the VM: a process that runs the notebook through nbclient, and
    the kernel it starts. ``kill()`` is the VM dying: SIGKILL to both at once."""

    def __init__(self, nb, base: Path, name: str):
        import nbformat

        self.nb_path = base / f"{name}.ipynb"
        nbformat.write(nb, str(self.nb_path))
        self.out = open(base / f"{name}.out", "wb")
        self.launched = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "life", str(self.nb_path), str(base / "jupyter"), str(base / "work")],
            stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> list:
        """SIGKILL the notebook's process and everything under it (the kernel); returns
        them for ``reap`` (send the signals of one death first, then wait)."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return procs

    def reap(self, procs: list) -> None:
        import psutil

        psutil.wait_procs(procs, timeout=30)
        self.proc.wait(30)
        self.out.close()

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.reap(self.kill())
            raise TimeoutError(f"the notebook did not finish within {timeout:.0f} s: {self.output()}") from None
        self.out.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the notebook failed (exit {self.proc.returncode}): {self.output()}")

    def output(self) -> str:
        return (self.nb_path.with_suffix(".out")).read_text(errors="replace")[-3000:]


# -- the harness ---------------------------------------------------------------------------


@dataclass
class Death:
    at_s: float                 # seconds after the kernel was launched
    phase: str                  # "starting", "restoring" or "training" when it died
    resumed_from: int           # the step this life had resumed from
    last_step: int              # the last step this life finished (resumed_from if none)
    uploaded_step: int          # newest step fully on the remote and verifying there (0: none)
    torn_on_remote: int         # newer steps whose commit record reached the remote, their data not
    next_resumed_from: int = -1
    steps_lost: int = -1


@dataclass
class Report:
    deaths: list[Death] = field(default_factory=list)
    resume_s: list[float] = field(default_factory=list)    # kernel launch -> training resumes
    restore_s: list[float] = field(default_factory=list)   # CheckpointManager.restore() alone
    total_steps: int = 0
    every: int = 0
    pace_s: float = 0.0
    write_back_s: float = 0.0
    bwlimit: str = ""
    step_s: float = 0.0                                    # median seconds per step, paced, in the lives
    settle_s: float = 0.0
    state_mib: float = 0.0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:       # a line cut short by the SIGKILL
            pass
    return events


def newest_uploaded(remote_run: Path) -> tuple[int, int]:
    """(the newest step whose checkpoint is on the remote directory in full and
    deep-verifies there, read directly as the cloud holds it, or 0; how many
    newer steps have a commit record there but do not verify: torn ones)."""
    import ckptstore

    if not remote_run.exists():
        return 0, 0
    with_record = sorted((int(d.name[len("step-"):]) for d in remote_run.iterdir()
                          if d.name.startswith("step-") and any(f.name.endswith(".commit") for f in d.iterdir())),
                         reverse=True)
    torn = 0
    for step in with_record:
        try:
            ok = ckptstore.verify(str(remote_run / f"step-{step}"), deep=True).ok
        except ckptstore.CheckpointError:   # a record but no whole generation: not a checkpoint
            ok = False
        if ok:
            return step, torn
        torn += 1
    return 0, torn


def run_soak(base: Path, *, deaths: int, seed: int, total: int | None = None, every: int = 25,
             keep_last: int = 3, pace: float = 0.01, width: int = 16384, write_back: str = "2s",
             earliest: float = 0.0, window: float = 6.0, settle: float = 3.0, bwlimit: str = "8M",
             progress=print) -> Report:
    """Run the soak under ``base``; see the module docstring. Each death comes at
    a uniformly random instant from ``earliest`` x the kernel's start-up time
    (measured on the uninterrupted run) to ``window`` s after it. ``settle`` is
    the manager's upload_settle_seconds: a little over the mount's write-back.
    ``bwlimit`` caps rclone's upload rate, so a data file takes a while to
    upload and a commit record can reach the remote before the data it names."""
    import ckptstore

    t_start = time.monotonic()
    rng = random.Random(seed)
    base.mkdir(parents=True, exist_ok=True)
    (base / "work").mkdir(exist_ok=True)
    # A life trains at most `window` s, at most window / pace steps, and a death
    # loses at least the last write-back interval: with this total the run
    # cannot reach its end before the last planned death.
    lag = float(write_back.rstrip("s"))
    if total is None:
        most = deaths * window / pace - (deaths - 1) * lag / pace
        total = every * (int(most / every) + 2)
    report = Report(total_steps=total, every=every, pace_s=pace, write_back_s=lag, settle_s=settle,
                    bwlimit=bwlimit)
    gaps: list[float] = []

    # The uninterrupted run: the same notebook, to a local directory, no pacing, no deaths.
    ref_dir, ref_log = base / "reference", base / "reference.log"
    life = Life(notebook(str(ref_dir), str(ref_log), total=total, every=every, keep_last=keep_last,
                         settle=settle, pace=0.0, width=width), base, "reference")
    life.join(1800)
    ref_events = read_log(ref_log)
    ref_loss = {e["step"]: e["loss"] for e in ref_events if e["event"] == "step"}
    ref_saved = {e["step"]: e["digest"] for e in ref_events if e["event"] == "saving"}
    started = next(e["time"] for e in ref_events if e["event"] == "started")
    resumed = next(e["time"] for e in ref_events if e["event"] == "resumed")
    startup = resumed - life.launched       # kernel, imports, an empty restore
    with ckptstore.CheckpointManager(str(ref_dir), _probe=False) as m:
        reference = m.restore()
    report.state_mib = sum(p.numel() * p.element_size() for p in reference["model"].values()) * 3 / 2**20
    progress(f"uninterrupted run: {total} steps, kernel start {started - life.launched:.1f} s, "
             f"to the first step {startup:.1f} s")

    mount = RcloneMount(base / "remote", base / "mnt", base / "cache", write_back=write_back,
                        extra_args=("--bwlimit", bwlimit))
    mount.start()
    ckpt_dir, log = mount.mountpoint / "run", base / "soak.log"
    nb = notebook(str(ckpt_dir), str(log), total=total, every=every, keep_last=keep_last, settle=settle,
                  pace=pace, width=width)
    seen = 0
    resumed_from = 0
    try:
        for n in range(deaths + 1):
            life = Life(nb, base, f"life{n}")
            if n < deaths:
                at = rng.uniform(earliest * startup, startup + window)
                while time.time() < life.launched + at and not life.finished():
                    time.sleep(0.005)
                if life.finished():
                    report.problems.append(f"life {n} finished before its death at {at:.1f} s: {life.output()}")
                    break
                t_death, t_kill = time.time(), time.monotonic()
                procs = life.kill()              # the VM dies: the notebook's kernel ...
                mount.kill_vm()                  # ... rclone, and the cache on the VM's disk
                t_kill = time.monotonic() - t_kill
                life.reap(procs)
            else:
                life.join(3600)
            # what this life did
            mine = read_log(log)[seen:]
            seen += len(mine)
            res = [e for e in mine if e["event"] == "resumed"]
            steps = [e for e in mine if e["event"] == "step"]
            if res:
                r = res[0]
                if r["step"] != resumed_from:
                    report.problems.append(
                        f"life {n} resumed from step {r['step']}, the newest checkpoint fully uploaded "
                        f"before it was step {resumed_from}")
                if r["step"] and r["digest"] != ref_saved.get(r["step"]):
                    report.problems.append(f"life {n} restored step {r['step']} with state that differs from "
                                           f"what the uninterrupted run saved at that step")
                report.resume_s.append(r["time"] - life.launched)
                report.restore_s.append(r["restore_s"])
            gaps += [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
            for e in steps:
                if ref_loss.get(e["step"]) != e["loss"]:
                    report.problems.append(f"life {n}: step {e['step']} loss {e['loss']} differs from the "
                                           f"uninterrupted run's {ref_loss.get(e['step'])}")
            for e in (e for e in mine if e["event"] == "saving"):
                if e["digest"] != ref_saved.get(e["step"]):
                    report.problems.append(f"life {n} saved step {e['step']} with state that differs from "
                                           f"the uninterrupted run's")
            if n == deaths:
                break
            phase = ("training" if res else "restoring" if any(e["event"] == "started" for e in mine)
                     else "starting")
            up, torn = newest_uploaded(mount.remote_dir / "run")
            last = steps[-1]["step"] if steps else resumed_from
            d = Death(at_s=round(at, 3), phase=phase, resumed_from=resumed_from, last_step=last,
                      uploaded_step=up, torn_on_remote=torn)
            # retention's net: a step committed over `settle` s before the death (the
            # mount's write-back is less) had reached the remote and was not removed
            settled = max([e["step"] for e in mine if e["event"] == "saving"
                           and e["time"] < t_death - settle - 1.0], default=0)
            if up < settled:
                report.problems.append(f"death {n}: step {settled} was saved over {settle + 1:g} s before the "
                                       f"death, yet the newest whole step on the remote is {up}")
            if up < resumed_from:
                report.problems.append(f"death {n}: the remote lost step {resumed_from}, fully uploaded before "
                                       f"(newest whole step now {up})")
            report.deaths.append(d)
            resumed_from = up
            mount.remount()
            progress(f"death {n + 1}/{deaths} at {at:.1f} s while {phase}: steps {d.resumed_from}..{last} run, "
                     f"newest whole on the remote {up} ({torn} torn); kernel and rclone killed within "
                     f"{t_kill * 1000:.0f} ms")
        for i, d in enumerate(report.deaths):
            d.next_resumed_from = report.deaths[i + 1].resumed_from if i + 1 < len(report.deaths) else resumed_from
            d.steps_lost = d.last_step - d.next_resumed_from   # the resume itself is checked per life
            if d.steps_lost < 0:
                report.problems.append(f"death {i}: resumed from {d.next_resumed_from}, past the last step "
                                       f"run, {d.last_step}")

        # The run is over: wait until the final checkpoint is on the remote, then
        # the VM goes away once more, and a new one reads the result.
        mount.wait_uploaded(timeout=120)
        mount.kill_vm()
        mount.remount()
        with ckptstore.CheckpointManager(str(ckpt_dir), _probe=False) as m:
            final = m.restore()
        if final is None or final["step"] != total:
            report.problems.append(f"the final checkpoint is step {None if final is None else final['step']}, "
                                   f"not {total}")
        else:
            if final["losses"] != reference["losses"] or len(final["losses"]) != total:
                report.problems.append("the per-step losses differ from the uninterrupted run's")
            if digest(final) != digest(reference):     # every byte of every tensor, parameters included
                report.problems.append("the final state (parameters, optimizer, RNG, ...) differs from the "
                                       "uninterrupted run's")
    finally:
        mount.kill_vm()
    report.wall_s = time.monotonic() - t_start
    report.step_s = statistics.median(gaps) if gaps else 0.0
    return report


def summary(report: Report) -> str:
    lost = [d.steps_lost for d in report.deaths]
    bound = [d.last_step - d.uploaded_step for d in report.deaths]
    phases = {p: sum(d.phase == p for d in report.deaths) for p in ("starting", "restoring", "training")}
    lines = [
        f"# Colab-like soak: {len(report.deaths)} VM deaths",
        "",
        f"{report.total_steps} steps, a save every {report.every} steps (async), keep_last=3, "
        f"upload_settle_seconds={report.settle_s:g}, "
        f"{report.state_mib:.1f} MiB of training state, {report.step_s * 1000:.0f} ms per step, "
        f"rclone write-back {report.write_back_s:g} s and --bwlimit {report.bwlimit}; "
        f"{report.wall_s:.0f} s in all.",
        "",
        f"- deaths while starting / restoring / training: {phases['starting']} / {phases['restoring']} / "
        f"{phases['training']}",
        f"- steps lost per death: median {statistics.median(lost) if lost else 0}, max {max(lost, default=0)}, "
        f"mean {statistics.mean(lost) if lost else 0:.1f} "
        f"(= {statistics.mean(lost) * report.step_s if lost else 0:.2f} s of training); "
        f"bound (steps since the newest fully uploaded checkpoint) met at every death: "
        f"{all(a <= b for a, b in zip(lost, bound))}",
        f"- resume, kernel launch to training again: median {statistics.median(report.resume_s):.2f} s, "
        f"max {max(report.resume_s):.2f} s; of it `restore()`: median "
        f"{statistics.median(report.restore_s):.3f} s, max {max(report.restore_s):.3f} s",
        f"- deaths that caught a checkpoint with its commit record on the remote and its data not: "
        f"{sum(d.torn_on_remote > 0 for d in report.deaths)}",
        f"- problems: {len(report.problems)}" + "".join(f"\n  - {p}" for p in report.problems),
        "",
        "| death | at (s) | phase | resumed from | last step run | newest uploaded | torn on remote | next resume | steps lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, d in enumerate(report.deaths):
        lines.append(f"| {i + 1} | {d.at_s:.2f} | {d.phase} | {d.resumed_from} | {d.last_step} | "
                     f"{d.uploaded_step} | {d.torn_on_remote} | {d.next_resumed_from} | {d.steps_lost} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["life"]:
        run_notebook(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deaths", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--report", type=Path, default=Path("benchmarks/results/soak"))
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="ckptstore-soak-"))
    try:
        report = run_soak(base, deaths=args.deaths, seed=seed, progress=lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "report.json").write_text(json.dumps({"seed": seed, **asdict(report)}, indent=1))
    text = summary(report).replace("\n\n", f"\n\nseed {seed}\n\n", 1)
    (args.report / "report.md").write_text(text)
    print(text)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
