"""GCS on gcp-storage-emulator: ckptstore against gcsfs with torch.save bytes, and DCP's
FsspecWriter / Reader on gcsfs as a peer.

Save: ``ckptstore.save`` against gcsfs ``pipe`` of the bytes torch.save wrote to a BytesIO,
the pipe alone timed (torch.save + pipe is a reference row). Load: ``ckptstore.load``
against gcsfs ``cat`` + ``torch.load`` from a BytesIO, both timed, both followed by reading
every byte. Targets: as for S3 (``scenarios/s3.py``).
"""

from __future__ import annotations

from typing import Any

from benchmarks.backends.gcs import GCS
from benchmarks.harness.context import Site
from benchmarks.harness.registry import Scenario, scenario
from benchmarks.harness.series import Row, Series, compare, joined, load_note, peers_note, phase_note, save_note, series
from benchmarks.harness.servers import BUCKET, clear_prefix, range_probe
from benchmarks.scenarios.s3 import REMOTE_RSS_TARGET, REMOTE_SPEED_TARGET, object_store_notes


def measure(site: Site) -> list[Row]:
    ctx = site.ctx
    n = ctx.state_bytes
    s = series("pipe", "ck_save", "ck_load", "cat", "dcp_save", "dcp_load")

    def on_server(server: Any) -> str:
        """The rows' series; returns the note on ranged reads."""
        fs = server.filesystem()
        uri = site.uri(server, "ckptstore/ckpt")
        gcsfs_obj = {"protocol": "gcs", "storage_options": server.options(), "path": f"{BUCKET}/gcsfs/state.pt"}
        dcp = {"impl": "dcp_fsspec", "uri": f"gcs://{BUCKET}/dcp_fsspec", "storage_options": server.options()}
        save = {"op": "save", "size_bytes": ctx.size_bytes, "nbytes": n}
        for r in range(ctx.repeat):
            ctx.log(f"gcs: save round {r + 1}/{ctx.repeat}")
            clear_prefix(fs, f"{BUCKET}/gcsfs")
            s["pipe"].add(lambda: ctx.run({**save, **gcsfs_obj, "impl": "fsspec_pipe"}))
            clear_prefix(fs, f"{BUCKET}/ckptstore")
            s["ck_save"].add(lambda: ctx.run({**save, "impl": "ckptstore", "uri": uri}))
            clear_prefix(fs, f"{BUCKET}/dcp_fsspec")
            s["dcp_save"].add(lambda: ctx.run({**save, **dcp}))

        load = {"op": "load", "state_bytes": n, "cold": False}
        for r in range(ctx.repeat):
            ctx.log(f"gcs: load round {r + 1}/{ctx.repeat}")
            if s["pipe"].ok:
                s["cat"].add(lambda: ctx.run({**load, **gcsfs_obj, "impl": "fsspec_cat"}))
            if s["ck_save"].ok:
                s["ck_load"].add(lambda: ctx.run({**load, "impl": "ckptstore", "uri": uri}))
            if s["dcp_save"].ok:
                s["dcp_load"].add(lambda: ctx.run({**load, **dcp, "size_bytes": ctx.size_bytes}))
        if not s["ck_save"].ok:
            s["ck_load"].fail("nothing saved to load (ckptstore.save failed)")
        if not s["dcp_save"].ok:
            s["dcp_load"].fail(f"nothing saved to load ({s['dcp_save'].error or 'the DCP save failed'})")
        if not s["pipe"].ok:
            s["cat"].fail("nothing saved to load (gcsfs pipe failed)")
            return ""
        return range_probe(fs, f"{BUCKET}/gcsfs/state.pt", "the emulator")

    range_note = site.serve(on_server, s, "")
    pipe = s["pipe"].phase("pipe")
    dcp_less_rename = s["dcp_save"].view(lambda r: r["seconds"] - r.get("phases", {}).get("metadata rename", 0.0))
    save_peers = [("torch.save + gcsfs pipe", s["pipe"]), ("DCP FsspecWriter", s["dcp_save"]),
                  ("DCP FsspecWriter less its metadata rename", dcp_less_rename)]
    load_peers = [("gcsfs cat + torch.load", s["cat"]), ("DCP FsspecReader", s["dcp_load"])]
    return [
        compare("gcs", "ckptstore.save", s["ck_save"], "gcsfs pipe", pipe, n, REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note=joined(save_note(s["ck_save"]), peers_note(s["ck_save"], save_peers))),
        compare("gcs", "torch.save to BytesIO + gcsfs pipe", s["pipe"], "gcsfs pipe", pipe, n,
                note=phase_note(s["pipe"])),
        compare("gcs", "DCP save, FsspecWriter (gcsfs)", s["dcp_save"], "gcsfs pipe", pipe, n,
                note=phase_note(s["dcp_save"])),
        # What the emulator's refused moveTo (see the note) costs, taken out.
        compare("gcs", "DCP save, FsspecWriter, less its metadata rename", dcp_less_rename, "gcsfs pipe", pipe, n),
        compare("gcs", "ckptstore.load", s["ck_load"], "gcsfs cat + torch.load", s["cat"], n,
                REMOTE_SPEED_TARGET, REMOTE_RSS_TARGET,
                note=joined(load_note(s["ck_load"], n), range_note, peers_note(s["ck_load"], load_peers))),
        compare("gcs", "gcsfs cat + torch.load (weights_only)", s["cat"], "-", Series(), n,
                note=phase_note(s["cat"])),
        compare("gcs", "DCP load, FsspecReader (gcsfs)", s["dcp_load"], "gcsfs cat + torch.load", s["cat"], n,
                note=load_note(s["dcp_load"], n)),
    ]


scenario(Scenario(
    "gcs", order=70, measure=measure, backend=GCS, remote=True, notes=object_store_notes, disk=4,
    baselines=("gcsfs pipe", "gcsfs cat + torch.load", "DCP FsspecWriter / FsspecReader (peers)")))
