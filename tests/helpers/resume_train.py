"""Exact-resume trainer: a tiny, stochastic training run that can stop and resume.

    python resume_train.py full   --total N --out OUT
        Train N steps from scratch, uninterrupted.
    python resume_train.py first  --total N --stop K --ckpt CKPT [--manager DIR] --out OUT
        Train from scratch, save the full training state after step K with
        ckptstore.save to CKPT (and, with --manager, the same state with
        CheckpointManager(DIR).save(K, state)), then exit.
    python resume_train.py resume --total N (--ckpt CKPT | --manager DIR) [--skip-rng] --out OUT
        Load the training state (ckptstore.load(CKPT), or
        CheckpointManager(DIR).restore()), restore everything, train on to
        step N. --skip-rng leaves out restore_rng_state: a control run that
        must not match.

OUT receives (via ckptstore.save) {"losses": [float per step run here],
"lrs": [...], "params": model.state_dict(), "pos": loader position}.

Every source of randomness a real run has is in play: dropout (global torch
CPU RNG), input noise from numpy's global RNG, a scale from Python's random,
shuffled batches from a DataLoader with its own seeded torch.Generator, and
the resume point (STOP) falls in the middle of an epoch.
"""
from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptstore
from ckptstore.rng import capture_rng_state, restore_rng_state

N_SAMPLES, BATCH = 48, 8  # 6 batches per epoch


def build(total: int, width: int = 32):
    torch.set_num_threads(1)  # same BLAS blocking in every process
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    data_gen = torch.Generator().manual_seed(123)
    x = torch.randn(N_SAMPLES, 6, generator=data_gen)
    y = (x @ torch.randn(6, 1, generator=data_gen)).tanh()
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total)
    loader_gen = torch.Generator().manual_seed(1234)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=loader_gen)
    pos = {"step": 0, "epoch": 0, "batch": 0, "epoch_generator": loader_gen.get_state()}
    return model, opt, sched, loader, loader_gen, pos


def train(model, opt, sched, loader, loader_gen, pos, stop: int, resuming: bool = False, after_step=None,
          losses: list | None = None):
    """Train until pos["step"] == stop, or until ``after_step()`` (called after every step)
    returns True; returns the losses and learning rates of the steps run (the losses
    appended to ``losses`` when it is given, so ``after_step`` can see them)."""
    losses = [] if losses is None else losses
    lrs = []
    model.train()
    while pos["step"] < stop:
        if pos["batch"] == 0:
            # a new epoch: remember where the loader's generator was, so a resume
            # in the middle of this epoch can replay its shuffle
            pos["epoch_generator"] = loader_gen.get_state()
        elif resuming:
            loader_gen.set_state(pos["epoch_generator"])
        it = iter(loader)  # draws the epoch's permutation (and a base seed) from loader_gen
        if resuming:
            for _ in range(pos["batch"]):  # skip the batches this epoch already used
                next(it)
            resuming = False
        for xb, yb in it:
            noise = torch.from_numpy(np.random.normal(0.0, 0.01, size=tuple(xb.shape)).astype(np.float32))
            scale = 1.0 + 0.1 * random.random()
            loss = F.mse_loss(model(xb * scale + noise), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
            losses.append(loss.item())
            pos["step"] += 1
            pos["batch"] += 1
            # Saved here, after an epoch's last batch the position is (epoch, len(loader)), not
            # (epoch + 1, 0): the loader has not yet reached its end, where the sampler draws from
            # loader_gen once more; a resume replays the epoch to that end first.
            stop_now = after_step is not None and after_step()
            if pos["step"] == stop or stop_now:
                return losses, lrs
        if pos["batch"] == len(loader):
            pos["epoch"] += 1
            pos["batch"] = 0
    return losses, lrs


def training_state(model, opt, sched, loader_gen, pos) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "step": pos["step"],
        "epoch": pos["epoch"],
        "batch_in_epoch": pos["batch"],
        "loader_generator": loader_gen.get_state(),
        "epoch_generator": pos["epoch_generator"],
    }


def load_training_state(state, model, opt, sched, loader_gen, pos, restore_rng: bool = True) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    loader_gen.set_state(state["loader_generator"])
    pos.update(step=state["step"], epoch=state["epoch"], batch=state["batch_in_epoch"],
               epoch_generator=state["epoch_generator"])
    if restore_rng:
        restore_rng_state(state["rng"])  # last: nothing after it may draw before training goes on


def preempt(args) -> None:
    """Train with async saves every --every steps and SIGTERM as the preemption signal, in the loop
    shape docs/resume.md gives; print READY once the handler is installed, then STOPPED <step>."""
    import signal
    import time

    model, opt, sched, loader, loader_gen, pos = build(args.total)
    mgr = ckptstore.CheckpointManager(args.manager, async_save=True, save_interval_steps=args.every,
                                      preemption_signals=signal.SIGTERM)
    print("READY", flush=True)

    def after_step() -> bool:
        time.sleep(args.step_sleep)           # a step that takes a while, as real ones do
        stop = mgr.preempted                  # read once: a signal after this is seen next step
        step = pos["step"]
        if stop or mgr.should_save(step):
            mgr.save(step, training_state(model, opt, sched, loader_gen, pos))
        return stop
    train(model, opt, sched, loader, loader_gen, pos, args.total, after_step=after_step)
    mgr.close()
    print(f"STOPPED {pos['step']} {int(mgr.preempted)}", flush=True)


def resume_many(args) -> None:
    """Resume each --manager directory in turn, in this one fresh process, and train to --total."""
    out = {}
    for d in args.managers:
        model, opt, sched, loader, loader_gen, pos = build(args.total)
        with ckptstore.CheckpointManager(d, _probe=False) as mgr:
            state = mgr.restore()
        load_training_state(state, model, opt, sched, loader_gen, pos)
        start = state["step"]
        del state
        losses, lrs = train(model, opt, sched, loader, loader_gen, pos, args.total, resuming=True)
        out[d] = {"start": start, "losses": losses, "lrs": lrs, "params": model.state_dict()}
    ckptstore.save(out, args.out)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["full", "first", "resume", "preempt", "resume-many"])
    ap.add_argument("--every", type=int, default=50, help="preempt: save every N steps")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="preempt: seconds added to each step")
    ap.add_argument("--managers", nargs="*", default=[], help="resume-many: the directories")
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--stop", type=int)
    ap.add_argument("--ckpt", help="checkpoint URI (first: written; resume: read)")
    ap.add_argument("--manager", help="CheckpointManager directory (first: also written; resume: read)")
    ap.add_argument("--skip-rng", action="store_true", help="control: resume without restore_rng_state")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.mode == "preempt":
        return preempt(args)
    if args.mode == "resume-many":
        return resume_many(args)

    model, opt, sched, loader, loader_gen, pos = build(args.total)
    if args.mode == "full":
        losses, lrs = train(model, opt, sched, loader, loader_gen, pos, args.total)
    elif args.mode == "first":
        losses, lrs = train(model, opt, sched, loader, loader_gen, pos, args.stop)
        state = training_state(model, opt, sched, loader_gen, pos)
        ckptstore.save(state, args.ckpt)
        if args.manager:  # the same state, also through a CheckpointManager
            with ckptstore.CheckpointManager(args.manager) as mgr:
                mgr.save(pos["step"], state)
    else:
        if args.manager:
            with ckptstore.CheckpointManager(args.manager) as mgr:
                state = mgr.restore()
            assert state is not None, f"nothing to restore in {args.manager}"
        else:
            state = ckptstore.load(args.ckpt)
        load_training_state(state, model, opt, sched, loader_gen, pos, restore_rng=not args.skip_rng)
        del state
        losses, lrs = train(model, opt, sched, loader, loader_gen, pos, args.total, resuming=True)
    ckptstore.save({"losses": losses, "lrs": lrs, "params": model.state_dict(), "pos": dict(pos)}, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
