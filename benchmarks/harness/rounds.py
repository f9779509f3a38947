"""Interleaved rounds: each round measures the baseline and every candidate once.

A slow drift in the disk's or the server's speed then hits every series alike, and every
ratio in a table shares one baseline series measured in the same rounds. ``rounds`` is the
general form (saves, then loads of what they wrote); ``measure_directory`` the one every
file backend shares (dd, ckptstore and each save peer; cat, ckptstore and each load peer),
and ``directory_rows`` its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from benchmarks.harness.context import Context, remove
from benchmarks.harness.registry import Peer
from benchmarks.harness.series import Row, Series, compare, joined, load_note, peers_note, save_note

# The targets of the local disk and, with dd/cat on the mount as the device, of FUSE mounts
# (the project brief): >= 90% of what the device does with the same bytes, <= 10% extra memory.
SPEED_TARGET = 0.90
RSS_TARGET = 0.10


def rounds(ctx: Context, label: str, s: dict[str, Series],
           saves: list[tuple[str, str, Callable[[], Any], dict]],
           loads: list[tuple[str, str, dict]]) -> None:
    """``ctx.repeat`` rounds of every save in turn, then of every load, so a drift in the
    machine's speed hits each series alike.

    saves: (series key, what it is, an untimed clear to run before it, worker spec); loads:
    (series key, the key of the save it reads, worker spec). A load whose save failed is
    marked so rather than run.
    """
    what = {key: name for key, name, _, _ in saves}
    for r in range(ctx.repeat):
        ctx.log(f"{label}: save round {r + 1}/{ctx.repeat}")
        for key, _, clear, spec in saves:
            clear()
            s[key].add(lambda: ctx.run(spec))
    for r in range(ctx.repeat):
        ctx.log(f"{label}: load round {r + 1}/{ctx.repeat}")
        for key, source, spec in loads:
            if s[source].ok:
                s[key].add(lambda: ctx.run(spec))
    for key, source, _ in loads:
        if not s[source].ok:
            s[key].fail(f"nothing saved to load ({what[source]} failed)")


def directory_series(saves: list[Peer], loads: list[Peer]) -> dict[str, Series]:
    return {k: Series() for k in ("dd", "ck_save", "cat", "ck_load", "ck_into",
                                  *(p.series for p in (*saves, *loads)))}


def measure_directory(ctx: Context, label: str, base: Path, s: dict[str, Series], saves: list[Peer],
                      loads: list[Peer], settle: Callable[[], Any] = lambda: None, crc: bool = False,
                      state: dict | None = None, into: bool = False) -> None:
    """dd / ckptstore.save / every save peer into ``base``, then cat and every loader of
    what was saved.

    ``settle`` runs, untimed, after every write and removal: on a FUSE mount it waits for
    the background upload so that it never overlaps the next measurement. ``state``:
    another state than the GPT one of ctx.size_bytes (``benchmarks.state.build_state``'s
    keys). ``into``: also ``load(into=)``, which writes into tensors that already exist.
    """
    ckpt, zeros = base / "ckpt", base / "dd.bin"
    n = ctx.state_bytes
    save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n, **(state or {})}

    def clear(path: Path) -> None:
        remove(path)
        settle()

    # Each target is removed first: a save over an existing checkpoint would also time its deletion.
    for r in range(ctx.repeat):
        ctx.log(f"{label}: save round {r + 1}/{ctx.repeat}")
        clear(zeros)
        s["dd"].add(lambda: ctx.run({**save, "impl": "dd", "uri": str(zeros)}))
        settle()
        clear(zeros)
        clear(ckpt)
        s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": str(ckpt)}))
        settle()
        for p in saves:
            path = base / p.file
            clear(path)
            # The crc32c figure rides on the torch.save process: it already holds
            # the state, and torch.save works even while ckptstore does not.
            s[p.series].add(lambda: ctx.run({**save, "impl": p.impl, "uri": str(path),
                                             "crc": crc and p.impl == "torch"}))
            settle()

    # size_bytes: DCP loads in place into tensors of the saved structure.
    load = {"op": "load", "state_bytes": n, "size_bytes": ctx.size_bytes, "cold": ctx.cold, **(state or {})}
    saved = {p.file for p in saves if s[p.series].seconds}
    for r in range(ctx.repeat):
        ctx.log(f"{label}: load round {r + 1}/{ctx.repeat}")
        if s["ck_save"].seconds:
            s["cat"].add(lambda: ctx.run({**load, "impl": "cat", "uri": str(ckpt)}))
            s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": str(ckpt)}))
            if into:
                s["ck_into"].add(lambda: ctx.run({**load, "impl": "ckptstore_into", "uri": str(ckpt)}))
        for p in loads:
            if p.file in saved:
                s[p.series].add(lambda: ctx.run({**load, "impl": p.impl, "uri": str(base / p.file)}))
    if not s["ck_save"].seconds:
        for k in ("ck_load", "cat", *(("ck_into",) if into else ())):
            s[k].fail("nothing saved to load (ckptstore.save failed)")
    for p in loads:
        if p.file not in saved:
            s[p.series].fail(f"nothing saved to load (the save of {p.file} failed)")


def directory_rows(ctx: Context, backend: str, s: dict[str, Series], n: int, saves: list[Peer],
                   loads: list[Peer], load_extra: str = "", save_label: str = "ckptstore.save (durable)",
                   into: bool = False) -> list[Row]:
    """The rows of ``measure_directory``: ckptstore's save against dd and its load (and
    load(into=), when ``into``) against cat, with the targets; each peer against the same."""
    cache = ctx.cache
    save_peers = [(p.label, s[p.series]) for p in saves]
    load_peers = [(p.label, s[p.series]) for p in loads]
    rows = [compare(backend, save_label, s["ck_save"], "dd conv=fsync", s["dd"], n, SPEED_TARGET, RSS_TARGET,
                    note=joined(save_note(s["ck_save"]), peers_note(s["ck_save"], save_peers)))]
    rows += [compare(backend, p.label, s[p.series], "dd conv=fsync", s["dd"], n) for p in saves]
    rows.append(compare(backend, f"ckptstore.load ({cache})", s["ck_load"], "cat", s["cat"], n,
                        SPEED_TARGET, RSS_TARGET,
                        note=joined(load_note(s["ck_load"], n, ctx.cold), load_extra,
                                    peers_note(s["ck_load"], load_peers))))
    if into:
        rows.append(compare(backend, f"ckptstore.load(into=) ({cache})", s["ck_into"], "cat", s["cat"], n,
                            SPEED_TARGET, RSS_TARGET,
                            note=joined(load_note(s["ck_into"], n, ctx.cold),
                                        "into tensors allocated and written before the clock, as a "
                                        "resuming model's and optimizer's are",
                                        peers_note(s["ck_into"], load_peers))))
    rows += [compare(backend, f"{p.label} ({cache}{', weights_only' if p.weights_only else ''})", s[p.series],
                     "cat", s["cat"], n, note=load_note(s[p.series], n, ctx.cold))
             for p in loads]
    return rows
