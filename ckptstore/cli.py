"""The ckptstore command line: ls, info, export, verify, cp, prune, gc, bench.

Exit status: 0 when all is well, 1 when a verify finds a problem (or the
operation failed), 2 for usage errors, 141 (128 + SIGPIPE) when whoever reads
the output stops early (``| head``).

Only the standard library and ``errors`` are imported up here: each command
imports what it needs, so ``--help`` and usage errors answer without
waiting a second for torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from typing import Sequence

from ._version import __version__
from .errors import CallerMistake, CheckpointError, CheckpointNotFoundError


def _options(pairs: Sequence[str] | None) -> dict:
    out = {}
    for p in pairs or ():
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise SystemExit(_usage_error(f"--option takes KEY=VALUE, got {p!r}"))
        out[k] = v
    return out


def _usage_error(msg: str) -> int:
    print(f"ckptstore: error: {msg}", file=sys.stderr)
    return 2


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


# A step in a checkpoint's name: step-N (CheckpointManager), epoch=E-step=N.ckpt (Lightning),
# checkpoint-N (Hugging Face Trainer).
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(?:step|checkpoint)[=_-](\d+)(?!\d)")


def step_in_name(name: str) -> int | None:
    m = _STEP_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def _existing_directory(store):
    """The listing of ``store``, a directory; CheckpointNotFoundError naming it if there is none."""
    listing = store.list()
    if listing is None and not store.subdirs():
        if store.is_file():
            raise CheckpointNotFoundError(f"{store.uri} is a file, not a directory of checkpoints",
                                          store.uri)
        raise CheckpointNotFoundError(f"no such directory: {store.uri}", store.uri)
    return listing


def _run_hint(uri: str, options: dict, command: str) -> str:
    """If ``uri`` is a directory of checkpoints (a manager's run of steps), say so and how to name one."""
    from .format.manifest import commit_generations
    from .stores import open_store
    from .url import redact
    try:
        root = open_store(uri, options)
        names = [n for n, listing in root.tree().items() if commit_generations(listing)]
    except CheckpointError:
        return ""
    if not names:
        return ""
    names.sort(key=lambda n: (step_in_name(n) is None, step_in_name(n) or 0, n))
    shown = names if len(names) <= 8 else names[:3] + ["..."] + names[-3:]
    base, q, query = uri.partition("?") if "://" in uri else (uri, "", "")
    example = redact(base.rstrip("/") + "/" + names[-1] + q + query)
    verb = {"info": "describe"}.get(command.split()[0], command.split()[0])
    return (f"it is a directory of {len(names)} checkpoint(s) (a run of steps?): {', '.join(shown)}; "
            f"{verb} one of them, e.g. `ckptstore {command} {example}`; `ckptstore ls {redact(uri)}` "
            "lists them all")


def _not_found_with_hint(e: CheckpointNotFoundError, uri: str, options: dict, command: str):
    hint = _run_hint(uri, options, command)
    return CheckpointNotFoundError(f"{e}: {hint}", e.uri) if hint else e


def cmd_ls(args) -> int:
    from .commit import choose
    from .errors import FormatTooNewError
    from .reader import Found, find_commit
    from .stores import open_store
    root = open_store(args.dir, _options(args.option))
    top = _existing_directory(root)
    strategy = choose(root, root.location.commit).name
    header = ("NAME", "STEP", "SIZE", "COMMITTED", "STRATEGY", "METRICS", "STATUS")
    rows = []
    tree = root.tree()
    candidates = [("", root, top)] + [(n, root.child(n), tree[n]) for n in sorted(tree)]
    for name, s, listing in candidates:
        if not listing:
            continue
        try:
            found = find_commit(s, listing)
        except FormatTooNewError:
            found = Found(None, ["written by a newer ckptstore; upgrade"], 1)
        if found.manifest is None and not found.record_count:
            continue
        m = found.manifest
        meta = m.meta if m else {}
        metrics = meta.get("metrics") or {}
        size = "-" if m is None else _size_cell(m)
        step = meta.get("step", step_in_name(name or root.location.path.rstrip("/").rsplit("/", 1)[-1]))
        rows.append((name or ".", "-" if step is None else str(step), size, _when(m.created) if m else "-", strategy,
                     " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
                     or "-",
                     _status(m) if m else "damaged: " + "; ".join(found.problems)[:80]))
    if not rows:
        print(f"no checkpoints in {root.uri}")
        return 0

    def step_key(r):
        return (0, int(r[1]), r[0]) if r[1].isdigit() else (1, 0, r[0])

    rows.sort(key=step_key)
    w = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    print("  ".join(h.ljust(w[i]) if i < len(w) else h for i, h in enumerate(header)).rstrip())
    for r in rows:
        print("  ".join((c.rjust(w[i]) if i in (1, 2) else c.ljust(w[i])) if i < len(w) else c
                        for i, c in enumerate(r)).rstrip())
    return 0


def _status(m) -> str:
    """``ok``, or ``ok, thinned to model`` for a step thinning rewrote to hold only some paths."""
    kept = m.meta.get("thinned")
    if isinstance(kept, list) and kept:
        return "ok, thinned to " + ", ".join(str(p) for p in kept)
    return "ok"


def _size_cell(m) -> str:
    """A step's size for ``ls``: stored, and logical when compression makes them differ; an
    incremental step's logical size and what its save wrote (it shares the rest)."""
    shared = m.files[0].dir is not None
    if not m.blobs.codec:
        return f"{_size(m.logical)} (wrote {_size(m.nbytes)})" if shared else _size(m.nbytes)
    if shared:
        return f"{_size(m.stored)} stored, {_size(m.logical)} logical (wrote {_size(m.nbytes)})"
    return f"{_size(m.nbytes)} stored, {_size(m.logical)} logical"


def cmd_info(args) -> int:
    from .api import info
    if args.tensors:
        return _list_tensors(args)
    options = _options(args.option)
    try:
        d = info(args.uri, storage_options=options)
    except CheckpointNotFoundError as e:
        raise _not_found_with_hint(e, args.uri, options, "info") from None
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"uri:        {d['uri']}")
    print(f"format:     {d['format']}")
    print(f"generation: {d['generation']}")
    print(f"committed:  {_when(d['created'])}")
    if any(f.get("dir") for f in d["files"]):
        print(f"size:       {_size(d['logical'])} ({d['logical']} bytes) in {len(d['files'])} shared data file(s); "
              f"this step wrote {_size(d['nbytes'])} ({d['nbytes']} bytes), the rest it shares with earlier steps")
    else:
        print(f"size:       {_size(d['nbytes'])} ({d['nbytes']} bytes) in {len(d['files'])} data file(s)")
    if d["compressed"]:
        print(f"stored:     {_size(d['stored'])} ({d['stored']} bytes) of {_size(d['logical'])} ({d['logical']} "
              f"bytes) logical: {d['compressed']} blob(s) compressed ({d['codec']}), "
              f"{d['stored'] / max(d['logical'], 1):.2f} of the logical size")
    print(f"tensors:    {d['tensors']}")
    print(f"pickled:    {'yes (load needs allow_pickle=True)' if d['pickled'] else 'no'}")
    if d["writer"]:
        print("written by: " + ", ".join(f"{k} {v}" for k, v in d["writer"].items()))
    if d["meta"]:
        print(f"meta:       {json.dumps(d['meta'])}")
    return 0


def _list_tensors(args) -> int:
    """Every tensor's path, dtype and shape, from the commit record alone."""
    from .api import open as open_view
    with open_view(args.uri, storage_options=_options(args.option)) as view:
        rows = [("/".join(map(str, path)), str(t.dtype).replace("torch.", ""), list(t.shape), t.nbytes)
                for path, t in view.tensors()]
    if args.json:
        print(json.dumps([{"path": p, "dtype": d, "shape": sh, "nbytes": n} for p, d, sh, n in rows], indent=2))
        return 0
    width = max([len(r[0]) for r in rows] + [4])
    for p, d, sh, n in rows:
        print(f"{p:<{width}}  {d:<10} {str(sh):<20} {_size(n)}")
    print(f"{len(rows)} tensors, {_size(sum(r[3] for r in rows))}")
    return 0


def cli_path(view, text: str) -> tuple:
    """A PATH written as keys joined by '/': each key a str, or an int where the checkpoint has one."""
    out: list = []
    at = view
    for seg in [s for s in text.split("/") if s != ""]:
        key = seg if seg in at else int(seg) if seg.lstrip("-").isdigit() and int(seg) in at else seg
        out.append(key)
        nxt = None
        for k, kind, _ in at.walk():
            if k == (key,):
                nxt = kind
                break
        at = at[key] if nxt in ("dict", "odict", "list", "tuple") else None
        if at is None:
            break
    return tuple(out)


def cmd_export(args) -> int:
    from .api import open as open_view
    from .exporter import export
    options = _options(args.option)
    select = None
    if args.select:
        with open_view(args.uri, storage_options=options) as view:
            select = [cli_path(view, s) for s in args.select]
    written = export(args.uri, args.dst, select=select, format=args.format, storage_options=options,
                     dst_options=_options(args.dst_option), max_shard_size=args.max_shard_size,
                     spell_select=lambda keys: " or ".join(f"--select {k}" for k in keys))
    for w in written:
        print(f"wrote {w}")
    return 0


def cmd_verify(args) -> int:
    from .api import verify
    options = _options(args.option)
    try:
        rep = verify(args.uri, storage_options=options, deep=args.deep)
    except CheckpointNotFoundError as e:
        raise _not_found_with_hint(e, args.uri, options, "verify" + (" --deep" if args.deep else "")) from None
    kind = "deep" if args.deep else "shallow"
    if rep.ok:
        print(f"ok: {rep.uri} ({_size(rep.nbytes)}, {kind} check)")
        return 0
    print(f"PROBLEM: {rep.uri} ({kind} check)")
    for p in rep.problems:
        print(f"  - {p}")
    return 1


def cmd_gc(args) -> int:
    from .gc import collect
    from .stores import open_store
    store = open_store(args.dir, _options(args.option))
    _existing_directory(store)
    young: list = []
    found = collect(store, grace=args.grace, dry_run=args.dry_run, young=young)
    verb = "would remove" if args.dry_run else "removed"
    for g in found:
        print(f"{verb} {g.uri} ({_size(g.size)}, {g.reason})")
    for g in young:
        print(f"kept {g.uri} ({_size(g.size)}, {g.reason})")
    print(f"{verb} {len(found)} leftover file(s), {_size(sum(g.size for g in found))}")
    if young:
        # Silence here would read as "nothing left behind" right after a crash.
        print(f"kept {len(young)} leftover file(s), {_size(sum(g.size for g in young))}, younger than the "
              f"grace period of {args.grace:g} s (they may belong to a save in progress); "
              "pass --grace 0 if no save is running")
    return 0


def cmd_cp(args) -> int:
    from .api import load, save
    from .copy import copy_checkpoint
    from .stores import open_store
    common = _options(args.option)
    src = open_store(args.src, {**common, **_options(args.src_option)})
    dst_options = {**common, **_options(args.dst_option)}
    dst = open_store(args.dst, dst_options)
    progress = args.progress or (args.progress is None and sys.stderr.isatty())
    if src.is_file():
        # A torch.save or safetensors file: loaded safely, saved in ckptstore's format.
        state = load(args.src, storage_options={**common, **_options(args.src_option)})
        info = save(state, args.dst, storage_options=dst_options, overwrite=not args.no_overwrite,
                    progress=progress)
        print(f"converted {src.uri} -> {info.uri} ({_size(info.nbytes)}, {info.strategy} commit, verified)")
        return 0
    m = copy_checkpoint(src, dst, overwrite=not args.no_overwrite, progress=progress)
    print(f"copied {src.uri} -> {dst.uri} ({_size(m.nbytes)} in {len(m.files)} data file(s), "
          "verified at the destination)")
    return 0


def cmd_bench(args) -> int:
    """Save and load a synthetic state at URI, against writing and reading the same bytes raw.

    Each figure is taken as the repository's benchmark takes it (``benchmeasure``): a save is
    the call alone, a load includes reading every byte it returned, extra memory is the peak
    resident size beyond the state. Here they run in this process, warm, best of --repeat.
    """
    import time

    import torch

    from .api import load, save
    from .benchmeasure import measure_load, measure_save, ratio
    from .stores import open_store
    from .url import parse_size
    from .writer import remove_files
    try:
        total = parse_size(args.size)
    except ValueError as e:
        return _usage_error(str(e))
    if total < 1 << 20:
        return _usage_error("--size must be at least 1MiB")
    options = _options(args.option)
    root = open_store(args.uri, options)
    n = max(1, total // (8 << 20))
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn((total // n) // 4, generator=g) for i in range(n)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    raw = b"".join(t.numpy().tobytes() for t in state.values()) if not args.no_baseline else b""
    ck, blob = root.child("ckptstore-bench"), root.child("ckptstore-bench-raw")
    rows = []

    def best(measure, before=None) -> tuple[float, float | None]:
        """Best seconds and worst extra RSS (a fraction of the state) of --repeat runs."""
        times, extra = [], []
        for _ in range(args.repeat):
            if before is not None:
                before()
            out = measure()
            times.append(out["seconds"])
            if "extra_rss" in out:
                extra.append(out["extra_rss"] / nbytes)
        return min(times), (max(extra) if extra else None)

    def timed(fn) -> dict:      # a raw baseline: its time alone
        t0 = time.perf_counter()
        fn()
        return {"seconds": time.perf_counter() - t0}

    try:
        save_s = best(lambda: measure_save(lambda s: save(s, ck.location.uri, storage_options=options), state))
        load_s = best(lambda: measure_load(lambda: load(ck.location.uri, storage_options=options), nbytes)[0])
        if not args.no_baseline:
            blob.makedirs()
            put_s = best(lambda: timed(lambda: blob.put("state.raw", raw)), before=lambda: blob.remove(["state.raw"]))
            get_s = best(lambda: timed(lambda: blob.get("state.raw")))
            rows = [("ckptstore.save", save_s, "raw write", put_s), ("ckptstore.load", load_s, "raw read", get_s)]
        else:
            rows = [("ckptstore.save", save_s, "-", None), ("ckptstore.load", load_s, "-", None)]
    finally:
        if not args.keep:
            for s in (ck, blob):
                try:
                    remove_files(s, s.list() or {})
                    s.remove_dir()
                except CheckpointError:
                    pass
    print(f"{root.uri}: {_size(total)} in {n} tensors, best of {args.repeat}")
    print(f"{'operation':<16}{'seconds':>9}{'MB/s':>9}  {'baseline':<10}{'seconds':>9}{'ratio':>7}{'extra RSS':>11}")
    for op, (t, rss), base, b in rows:
        bt = b[0] if b else None
        r = ratio(bt, t)
        print(f"{op:<16}{t:9.3f}{total / t / 1e6:9.0f}  {base:<10}"
              f"{f'{bt:9.3f}' if bt else '        -'}{f'{r:7.2f}' if r else '      -'}"
              f"{f'{rss:+10.3f}x' if rss is not None else '          -'}")
    print("ratio = baseline seconds / ckptstore seconds (1.0: as fast as writing or reading the bytes raw, "
          "which checks nothing and commits nothing); a load includes reading every byte; extra RSS = "
          "peak resident memory beyond the state, as a fraction of it (figures taken as `make bench` takes them)")
    return 0


def cmd_prune(args) -> int:
    from .manager import CheckpointManager
    from .thin import spelled
    policy = dict(keep_last=args.keep_last, keep_best=args.keep_best, keep_every=args.keep_every,
                  max_age=args.max_age)
    if all(v is None for v in policy.values()) and args.thin_after is None and not args.thin_select:
        return _usage_error("prune needs a policy: --keep-last, --keep-best, --keep-every and/or --max-age, "
                            "or --thin-after N with --thin-select PATH")
    if args.keep_best is not None and not args.best_metric:
        return _usage_error("--keep-best needs --best-metric")
    if (args.thin_after is None) != (not args.thin_select):
        return _usage_error("--thin-after N and --thin-select PATH go together: steps older than the N newest "
                            "keep only PATH (e.g. --thin-after 2 --thin-select model)")
    try:
        thin = [spelled(t) for t in args.thin_select] if args.thin_select else None
        mgr = CheckpointManager(args.dir, best_metric=args.best_metric, best_mode=args.best_mode,
                                storage_options=_options(args.option), _probe=not args.dry_run,
                                thin_after=args.thin_after, thin_select=thin, **policy)
    except ValueError as e:
        return _usage_error(str(e))
    steps, thinned = mgr._prune_and_thin(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(steps)} step(s){': ' + ', '.join(map(str, steps)) if steps else ''}")
    if thin is not None:
        verb = "would thin" if args.dry_run else "thinned"
        print(f"{verb} {len(thinned)} step(s){': ' + ', '.join(map(str, thinned)) if thinned else ''} "
              f"to {', '.join('/'.join(p) for p in thin)}")
    print(f"kept: {', '.join(str(s) for s in mgr.steps() if not args.dry_run or s not in steps) or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckptstore",
        description="Inspect, verify and clean up ckptstore checkpoints on any storage "
                    "(local paths, file://, memory://, s3://, gs://, any fsspec URL).",
        epilog="Exit status: 0 all well, 1 a problem was found or the operation failed, 2 usage error.")
    p.add_argument("--version", action="version", version=f"ckptstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        sp.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                        help="a storage option for the backend (repeatable), e.g. endpoint_url=http://...")
        return sp

    sp = add("ls", cmd_ls, "list the checkpoints in a directory")
    sp.add_argument("dir", metavar="DIR")
    sp = add("info", cmd_info, "describe one checkpoint")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sp.add_argument("--tensors", action="store_true",
                    help="list every tensor's path, dtype and shape (read from the commit record alone)")
    sp = add("export", cmd_export, "write part of a checkpoint as .safetensors (optionally sharded, the "
                                   "Hugging Face layout) or as a torch.save file")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("dst", metavar="DST", help="a file (.safetensors, .pt, .pth, .bin) or, with "
                                               "--max-shard-size, a directory")
    sp.add_argument("--select", action="append", metavar="PATH",
                    help="a value to export, as keys joined by '/', e.g. model (repeatable)")
    sp.add_argument("--format", choices=("safetensors", "torch"), help="default: from DST's name")
    sp.add_argument("--max-shard-size", metavar="SIZE", help="shard safetensors output, e.g. 5GB")
    sp.add_argument("--dst-option", action="append", metavar="KEY=VALUE", help="a storage option for DST only")
    sp = add("verify", cmd_verify, "check a checkpoint's commit and sizes; --deep re-reads every byte")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("--deep", action="store_true", help="re-read every byte and check its CRC-32C")
    sp = add("cp", cmd_cp, "copy a checkpoint between any two backends, verified at the destination "
                           "(a torch.save or .safetensors file is converted)")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dst", metavar="DST")
    sp.add_argument("--src-option", action="append", metavar="KEY=VALUE", help="a storage option for SRC only")
    sp.add_argument("--dst-option", action="append", metavar="KEY=VALUE", help="a storage option for DST only")
    sp.add_argument("--no-overwrite", action="store_true", help="fail if DST already holds a checkpoint")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show a progress bar (default: when stderr is a terminal)")
    sp = add("prune", cmd_prune, "remove the steps of a CheckpointManager directory that a retention "
                                 "policy does not keep (never the newest, the best, or anything uncommitted), "
                                 "and thin old steps to part of their state (--thin-after, --thin-select)")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--keep-last", type=int, metavar="N", help="keep the N most recently committed steps")
    sp.add_argument("--keep-best", type=int, metavar="N", help="keep the N best steps by --best-metric")
    sp.add_argument("--best-metric", metavar="NAME", help="the metric saved with each step to rank by")
    sp.add_argument("--best-mode", choices=("min", "max"), default="min", help="lower or higher is better")
    sp.add_argument("--keep-every", type=int, metavar="K", help="keep every step divisible by K")
    sp.add_argument("--max-age", type=float, metavar="SECONDS", help="keep steps committed less than this ago")
    sp.add_argument("--thin-after", type=int, metavar="N",
                    help="thin the kept steps older than the N newest to hold only --thin-select")
    sp.add_argument("--thin-select", action="append", metavar="PATH",
                    help="what a thinned step keeps, as keys joined by '/', e.g. model (repeatable)")
    sp.add_argument("--dry-run", action="store_true", help="only print what would be removed or thinned")
    sp = add("bench", cmd_bench, "time save and load of a synthetic state at URI against writing and "
                                 "reading the same bytes raw there (the repository's `make bench` compares "
                                 "every backend)")
    sp.add_argument("uri", metavar="URI", help="a directory to benchmark in (subdirectories ckptstore-bench*)")
    sp.add_argument("--size", default="256MiB", help="state size (default: 256MiB)")
    sp.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown (default: 3)")
    sp.add_argument("--no-baseline", action="store_true", help="skip the raw write/read baseline")
    sp.add_argument("--keep", action="store_true", help="leave the benchmark's checkpoint in place")
    sp = add("gc", cmd_gc, "remove what interrupted or superseded saves left behind")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="leave uncommitted files younger than this alone; a save may still be "
                         "writing them (default: 3600)")
    sp.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "grace", 0) is None:
        from .gc import DEFAULT_GRACE
        args.grace = DEFAULT_GRACE
    try:
        code = args.func(args)
        sys.stdout.flush()      # a closed pipe shows here, not as noise at interpreter exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except SystemExit as e:
        return int(e.code or 0)
    except CheckpointError as e:
        print(f"ckptstore: {e}", file=sys.stderr)
        return 1
    except (CallerMistake, ValueError) as e:
        print(f"ckptstore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as SIGPIPE would have."""
    try:
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass                # not a real file (tests capture stdout): nothing will flush to a pipe
    return 141


if __name__ == "__main__":
    sys.exit(main())
