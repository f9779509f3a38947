"""How the cost grows: seconds per GiB and extra RSS of ckptstore and its peers at each of
--scaling-sizes-mib on the local disk (the file peers, dd and cat), at the sizes up to
1 GiB on S3 (moto; torch.save + upload_file and the "scaling-s3" peers; load against one
GET + torch.load), and at each of --tensor-counts splitting a fixed 256 MiB on the local
disk. Every point runs its baseline and every peer in the same rounds. The plot is
``scaling.png`` next to ``latest.png``.

Targets: at each point ckptstore ahead of the fastest peer there (ratio >= 1.0), and across
sizes its seconds per GiB may spread at most 1.2x (slowest / fastest).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from benchmarks.backends.s3 import S3
from benchmarks.harness.context import GIB, MIB, Context, Site, remove
from benchmarks.harness.registry import Scenario, peers, scenario
from benchmarks.harness.rounds import directory_series, measure_directory, rounds
from benchmarks.harness.series import Row, Series, compare, peers_note
from benchmarks.harness.servers import BUCKET, clear_prefix
from benchmarks.state import expected_nbytes, tensors_nbytes

SCALING_S3_MAX_MIB = 1024                  # S3 measures the sizes up to this
SCALING_COUNT_MIB = 256                    # the fixed size the tensor counts split
SCALING_FLAT_TARGET = 1.20                 # slowest / fastest seconds per GiB across sizes
SCALING_PEER_TARGET = 1.0                  # ckptstore against the fastest peer at each point


def _mib(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


def measure(site: Site) -> list[Row]:
    """The curves' points (see the module docstring), then each curve's spread."""
    ctx = site.ctx
    saves, loads = peers("scaling", "save"), peers("scaling", "load")
    rows: list[Row] = []
    for mib in ctx.scaling_sizes_mib:
        size = mib * MIB
        pctx = replace(ctx, size_bytes=size, state_bytes=expected_nbytes(size))
        s = directory_series(saves, loads)
        where = site.scratch / f"size-{mib}"
        where.mkdir()
        measure_directory(pctx, f"scaling: local {_mib(size)}", where, s, saves, loads, into=True)
        remove(where)
        rows += _scaling_rows(pctx, "size", size, s, pctx.state_bytes, saves, loads)
    for n in ctx.tensor_counts:
        weights = n - n // 3
        tb = max(4, SCALING_COUNT_MIB * MIB // weights // 64 * 64)
        nbytes = tensors_nbytes(n, tb)
        pctx = replace(ctx, state_bytes=nbytes)
        s = directory_series(saves, loads)
        where = site.scratch / f"count-{n}"
        where.mkdir()
        measure_directory(pctx, f"scaling: local {n:,} tensors", where, s, saves, loads,
                          state={"tensors": n, "tensor_bytes": tb}, into=True)
        remove(where)
        rows += _scaling_rows(pctx, "tensors", n, s, nbytes, saves, loads)
    rows += _flat_rows(rows)

    s3_sizes = [m for m in ctx.scaling_sizes_mib if m <= ctx.scaling_s3_max_mib]
    s3_saves = peers("scaling-s3", "save")
    s3 = {m: {k: Series() for k in ("ck_save", "ck_load", "upload", "download_one", *(p.series for p in s3_saves))}
          for m in s3_sizes}

    def on_server(server: Any) -> None:
        for mib in s3_sizes:
            _scaling_s3(ctx, site, server, mib, s3[mib], s3_saves)

    site.serve(on_server, {f"{m} {k}": v for m in s3_sizes for k, v in s3[m].items()}, None)
    s3_rows: list[Row] = []
    for mib in s3_sizes:
        s = s3[mib]
        n = expected_nbytes(mib * MIB)
        upload = s["upload"].phase("torch.save", "upload")
        # The ranged-read loaders are left out: on moto each ranged GET costs the whole object (see
        # the s3 rows), which grows with the square of the size; the one-GET download is fair there.
        s3_rows += _point_rows("s3", "size", mib * MIB, n, s["ck_save"], s["ck_load"],
                               [("torch.save + boto3 upload_file", upload), *((p.label, s[p.series]) for p in s3_saves)],
                               [("boto3 download_file one GET + torch.load", s["download_one"])], None, None)
    return rows + s3_rows + _flat_rows(s3_rows)


def _scaling_s3(ctx: Context, site: Site, server: Any, mib: int, s: dict[str, Series], s3_saves: list) -> None:
    fs = server.filesystem()
    opts = server.options()
    size = mib * MIB
    n = expected_nbytes(size)
    prefix = f"scaling/{mib}"
    uri = site.uri(server, f"{prefix}/ckptstore")
    save = {"op": "save", "size_bytes": size, "nbytes": n}
    load = {"op": "load", "state_bytes": n, "cold": False}
    boto = {"storage_options": opts, "bucket": BUCKET, "key": f"{prefix}/boto3/state.pt"}
    tmp = {"tmp": str(site.scratch / "s3-staging.pt")}
    peer_saves = [(p.series, p.label, lambda p=p: clear_prefix(fs, f"{BUCKET}/{prefix}/{p.file.split('/')[0]}"),
                   {**save, "impl": p.impl, "uri": f"s3://{BUCKET}/{prefix}/{p.file}", "storage_options": opts})
                  for p in s3_saves]
    rounds(ctx, f"scaling: s3 {_mib(size)}", s,
           saves=[("upload", "boto3 upload_file", lambda: clear_prefix(fs, f"{BUCKET}/{prefix}/boto3"),
                   {**save, **boto, **tmp, "impl": "boto3_upload"}),
                  ("ck_save", "ckptstore.save", lambda: clear_prefix(fs, f"{BUCKET}/{prefix}/ckptstore"),
                   {**save, "impl": "ckptstore", "uri": uri}),
                  *peer_saves],
           loads=[("download_one", "upload", {**load, **boto, **tmp, "impl": "boto3_download", "single_get": True}),
                  ("ck_load", "ck_save", {**load, "impl": "ckptstore", "uri": uri})])
    clear_prefix(fs, f"{BUCKET}/{prefix}")


def _scaling_rows(ctx: Context, axis: str, x: int, s: dict[str, Series], nbytes: int,
                  saves: list, loads: list) -> list[Row]:
    return _point_rows("local", axis, x, nbytes, s["ck_save"], s["ck_load"],
                       [("dd conv=fsync", s["dd"]), *((p.label, s[p.series]) for p in saves)],
                       [("cat", s["cat"]), *((p.label, s[p.series]) for p in loads)],
                       "dd conv=fsync", "cat", ctx.cache, s["ck_into"])


def _point_rows(where: str, axis: str, x: int, nbytes: int, ck_save: Series, ck_load: Series,
                saves: list[tuple[str, Series]], loads: list[tuple[str, Series]],
                save_floor: str | None, load_floor: str | None, cache: str | None = None,
                ck_into: Series | None = None) -> list[Row]:
    """One point of a curve: ckptstore's save and load against the fastest peer there (target:
    ahead of it), and every peer and baseline as a row of its own, for the curves. ``*_floor``
    names the raw-I/O baseline among them (dd, cat), which is no peer."""
    at = _mib(x) if axis == "size" else f"{x:,} tensors"
    backend = f"scaling-{where}"
    rows = []
    ours_load = [("ckptstore", "ckptstore.load", ck_load)]
    if ck_into is not None and (ck_into.seconds or ck_into.error):
        ours_load.append(("ckptstore load(into=)", "ckptstore.load(into=)", ck_into))
    for what, ours_all, others, floor in (("save", [("ckptstore", "ckptstore.save", ck_save)], saves, save_floor),
                                          ("load", ours_load, loads, load_floor)):
        peers = [(label, p) for label, p in others if label != floor and p.seconds]
        best = min(peers, key=lambda lp: lp[1].best, default=None)
        for curve, op, ours in ours_all:
            op += f" ({cache})" if what == "load" and cache else ""
            row = compare(backend, f"{op}, {at}", ours, best[0] if best else "-", best[1] if best else Series(),
                          nbytes, SCALING_PEER_TARGET,
                          note="; ".join(x for x in (f"{ours.best * GIB / nbytes:.3f} s/GiB" if ours.best else "",
                                                      peers_note(ours, peers)) if x))
            row.ratio_meaning = "fastest peer's time / time (higher is better)"
            row.curve, row.axis, row.x = f"{where} {what}: {curve}", axis, x
            rows.append(row)
        for label, p in others:
            peer = compare(backend, f"{label} ({what}), {at}", p, "-", Series(), nbytes,
                           note=f"{p.best * GIB / nbytes:.3f} s/GiB" if p.best else "")
            peer.curve, peer.axis, peer.x = f"{where} {what}: {label}", axis, x
            rows.append(peer)
    return rows


def _flat_rows(rows: list[Row]) -> list[Row]:
    """Per curve of ckptstore over sizes: slowest / fastest seconds per GiB (target <= 1.2);
    the same figure for every other curve goes into the note, dd's and cat's say what the
    storage itself does."""
    curves: dict[str, list[Row]] = {}
    for r in rows:
        if r.axis == "size" and r.curve:
            curves.setdefault(r.curve, []).append(r)

    def spread(rs: list[Row]) -> float | None:
        per = [r.seconds / r.nbytes * GIB for r in rs if r.seconds]
        return max(per) / min(per) if len(per) == len(rs) and len(per) > 1 else None

    out = []
    for curve, rs in curves.items():
        if not curve.split(": ", 1)[1].startswith("ckptstore"):
            continue
        where_what = curve.split(":")[0]
        others = [f"{c.split(': ', 1)[1]} {spread(v):.2f}" for c, v in curves.items()
                  if c.startswith(where_what + ":") and c != curve and spread(v) is not None]
        ratio = spread(rs)
        sizes = ", ".join(_mib(r.x) for r in rs)
        name = curve.split(": ", 1)[1]
        op = f"ckptstore.{where_what.split()[1]}" if name == "ckptstore" else name.replace("ckptstore ", "ckptstore.")
        row = Row(rs[0].backend, f"{op} seconds per GiB, {sizes}", None,
                  max(r.nbytes for r in rs), None, "-", None, ratio,
                  ratio_meaning="slowest / fastest seconds per GiB across sizes (lower is better)",
                  target=SCALING_FLAT_TARGET, target_is_max=True,
                  note=("the same spread for " + ", ".join(others)) if others else "",
                  error=None if ratio is not None else "a size has no figure")
        row.meets_target = None if ratio is None else ratio <= SCALING_FLAT_TARGET
        out.append(row)
    return out


def notes(ctx: Context) -> list[str]:
    return [
        f"scaling: at each point ckptstore is timed against the fastest peer there (target >= "
        f"{SCALING_PEER_TARGET:.2f}: ahead of every peer), and across sizes its seconds per GiB may "
        f"spread at most {SCALING_FLAT_TARGET:.1f}x (slowest / fastest); the notes give the same "
        "spread for the peers and for dd and cat, which is what the storage itself does. Sizes: "
        f"{', '.join(_mib(m * MIB) for m in ctx.scaling_sizes_mib)} of the GPT state on the local disk, "
        f"those up to {_mib(ctx.scaling_s3_max_mib * MIB)} on S3 (moto); tensor counts "
        f"{', '.join(f'{n:,}' for n in ctx.tensor_counts)} split {SCALING_COUNT_MIB} MiB on the local "
        "disk. Each point is its own rounds (baseline and every peer, best of --repeat). The "
        "curves are scaling.png."]



scenario(Scenario(
    "scaling", order=120, measure=measure, backend=S3, notes=notes, disk=5,
    nbytes=lambda ctx: expected_nbytes(max(ctx.scaling_sizes_mib) * MIB),
    baselines=("the fastest peer at each size and tensor count (torch.save, safetensors, "
               "torch.load plain and mmap, load_file; boto3 and S3Checkpoint on S3)",
               "a 1.2x spread of seconds per GiB across sizes")))
