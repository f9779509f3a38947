"""S3 on a moto server: ckptstore against boto3's transfers and the S3 peers.

Save: ``ckptstore.save`` against ``upload_file`` (default ``TransferConfig``) of a
torch.save file, the upload alone timed; torch.save + upload and the Lightning-style save
(torch.save to BytesIO, s3fs ``pipe``) are reference rows. Load: ``ckptstore.load``
against ``download_file`` + ``torch.load`` (8 MiB ranged GETs, and with one GET), both
followed by reading every byte. Peers: ``peers/s3.py``. Every save goes to an emptied
prefix. Targets (the object-store issue): at least as fast as the boto3 way, at most a
quarter of the state extra in memory. The quick run keeps the one-GET download (moto
charges a whole-object read per ranged GET) and the quick peers.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.backends.s3 import S3
from benchmarks.harness.context import Context, Site
from benchmarks.harness.registry import Scenario, peers, scenario
from benchmarks.harness.series import Row, Series, compare, joined, load_note, peers_note, phase_note, save_note
from benchmarks.harness.servers import BUCKET, clear_prefix, range_probe

REMOTE_SPEED_TARGET = 1.0
REMOTE_RSS_TARGET = 0.25


def measure(site: Site) -> list[Row]:
    ctx = site.ctx
    n = ctx.state_bytes
    full = not ctx.quick
    saves, loads = peers("s3", "save", ctx.quick), peers("s3", "load", ctx.quick)
    s = {k: Series() for k in ("upload", "ck_save", "lightning", "ck_load", "download", "download_one",
                               *(p.series for p in (*saves, *loads)))}

    def on_server(server: Any) -> str:
        """The rows' series; returns the note on ranged reads."""
        opts = server.options()
        fs = server.filesystem()  # the driver's, for emptying prefixes
        uri = site.uri(server, "ckptstore/ckpt")
        boto = {"storage_options": opts, "bucket": BUCKET, "key": "boto3/state.pt"}
        lightning = {"protocol": "s3", "storage_options": opts, "path": f"{BUCKET}/lightning/state.pt"}
        save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
        for r in range(ctx.repeat):
            ctx.log(f"s3: save round {r + 1}/{ctx.repeat}")
            clear_prefix(fs, f"{BUCKET}/boto3")
            s["upload"].add(lambda: ctx.run({**save, **boto, "impl": "boto3_upload",
                                             "tmp": str(site.scratch / "upload.pt")}))
            clear_prefix(fs, f"{BUCKET}/ckptstore")
            s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": uri}))
            if full:
                clear_prefix(fs, f"{BUCKET}/lightning")
                s["lightning"].add(lambda: ctx.run({**save, **lightning, "impl": "fsspec_pipe"}))
            for p in saves:
                clear_prefix(fs, f"{BUCKET}/{p.file.split('/')[0]}")
                s[p.series].add(lambda: ctx.run({**save, "impl": p.impl, "uri": f"s3://{BUCKET}/{p.file}",
                                                 "storage_options": opts}))
        clear_prefix(fs, f"{BUCKET}/lightning")  # only saved, never loaded

        load = {"op": "load", "state_bytes": n, "cold": False}
        saved = {p.file for p in saves if s[p.series].ok}
        for r in range(ctx.repeat):
            ctx.log(f"s3: load round {r + 1}/{ctx.repeat}")
            if s["upload"].ok:
                down = {**load, **boto, "impl": "boto3_download", "tmp": str(site.scratch / "download.pt")}
                if full:
                    s["download"].add(lambda: ctx.run(down))
                s["download_one"].add(lambda: ctx.run({**down, "single_get": True}))
            if s["ck_save"].ok:
                s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": uri}))
            for p in loads:
                if p.file in saved:
                    s[p.series].add(lambda: ctx.run({**load, "impl": p.impl, "uri": f"s3://{BUCKET}/{p.file}",
                                                     "storage_options": opts, "size_bytes": ctx.size_bytes}))
        for p in loads:
            if p.file not in saved:
                s[p.series].fail(f"nothing saved to load (the save of {p.file} failed)")
        if not s["ck_save"].ok:
            s["ck_load"].fail("nothing saved to load (ckptstore.save failed)")
        if not s["upload"].ok:
            for k in ("download", "download_one"):
                s[k].fail("nothing saved to load (boto3 upload failed)")
            return ""
        return range_probe(fs, f"{BUCKET}/boto3/state.pt", "moto")

    range_note = site.serve(on_server, s, "")
    upload = s["upload"].phase("upload")
    download = s["download"] if full else s["download_one"]
    save_peers = [("torch.save + upload_file", s["upload"].phase("torch.save", "upload")),
                  *((p.label, s[p.series]) for p in saves)]
    load_peers = [("download_file + torch.load" if full else "download_file one GET + torch.load", download),
                  *((p.label, s[p.series]) for p in loads)]
    peer_rows = [compare("s3", p.label, s[p.series], "boto3 upload_file", upload, n) for p in saves]
    peer_rows += [compare("s3", p.label, s[p.series], "download_file + torch.load", s["download"], n,
                          note=load_note(s[p.series], n)) if full else
                  compare("s3", p.label, s[p.series], "download_file one GET + torch.load", s["download_one"], n,
                          note=load_note(s[p.series], n))
                  for p in loads]
    rows = [
        compare("s3", "ckptstore.save", s["ck_save"], "boto3 upload_file", upload, n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note=joined(save_note(s["ck_save"]), peers_note(s["ck_save"], save_peers))),
        compare("s3", "torch.save to file + upload_file", s["upload"].phase("torch.save", "upload"),
                "boto3 upload_file", upload, n, note=phase_note(s["upload"])),
    ]
    if full:
        rows += [
            compare("s3", "Lightning-style: torch.save to BytesIO + s3fs pipe", s["lightning"],
                    "boto3 upload_file", upload, n, note=phase_note(s["lightning"])),
            compare("s3", "ckptstore.load", s["ck_load"], "download_file + torch.load", s["download"], n,
                    REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                    note=joined(load_note(s["ck_load"], n), range_note, peers_note(s["ck_load"], load_peers)))]
    # The same load against a baseline that makes a single GET, which moto's ranged-GET
    # cost (see the note) does not touch.
    rows.append(compare("s3", "ckptstore.load", s["ck_load"], "download_file one GET + torch.load",
                        s["download_one"], n,
                        note="" if full else joined(load_note(s["ck_load"], n), range_note,
                                                    peers_note(s["ck_load"], load_peers))))
    if full:
        rows.append(compare("s3", "download_file + torch.load (weights_only)", s["download"], "-", Series(), n,
                            note=phase_note(s["download"])))
    rows.append(compare("s3", "download_file one GET + torch.load (weights_only)", s["download_one"], "-",
                        Series(), n, note=phase_note(s["download_one"])))
    return rows + peer_rows


def object_store_notes(ctx: Context) -> list[str]:
    """Shared by s3 and gcs (the driver lists a note once)."""
    return [
        f"the servers (moto, gcp-storage-emulator) run on this machine and share its "
        f"{os.cpu_count()} CPUs with the client, so a client that uses more CPU (parallel parts, "
        "checksums) slows the server it talks to; their loads are served from the server's "
        "memory or temp files, not a cold disk.",
        f"s3/gcs targets: ratio >= {REMOTE_SPEED_TARGET:.2f} against the boto3/gcsfs baseline and "
        f"extra peak RSS <= {REMOTE_RSS_TARGET:.2f}x; baseline saves are timed from the bytes on "
        "hand (a torch.save file for upload_file, torch.save bytes for pipe), baseline loads "
        "in full (download/cat + torch.load + reading every byte). Baselines' extra RSS covers "
        "all their steps."]


scenario(Scenario(
    "s3", order=60, measure=measure, backend=S3, remote=True, notes=object_store_notes, disk=4, quick=True,
    baselines=("boto3 upload_file", "download_file + torch.load")))
