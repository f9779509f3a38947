"""Restoring a model that already exists (resume), and exporting its weights as .safetensors.

``load(into=)`` against every way a user would do it instead, each from its own format of
the same weights, cold cache: the model (the GPT state's weights, untied, about --size) is
allocated and written before the clock starts; extra RSS is the peak beyond it. Targets:
faster than every peer, extra RSS at most 5% of the model.

export: ``ckptstore.export(select="model")`` from the checkpoint (cold cache, and warm as
right after the save) against ``safetensors.torch.save_file`` of the same tensors already
in memory (+ fsync; export is durable). Targets: at least 0.9x, extra RSS at most 10%.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from ckptstore.benchmeasure import current_rss, drop_caches, peak_rss, reset_peak_rss, state_nbytes

from benchmarks.harness.context import Context, Site, fsync_path
from benchmarks.harness.registry import Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare

RESTORE_PEERS = (
    ("ckptstore_copy", "ckptstore.load + copy_"),
    ("torch_copy", "torch.load + copy_"),
    ("torch_mmap_copy", "torch.load(mmap=True) + copy_"),
    ("safetensors_copy", "safetensors load_file + copy_ (= load_model)"),
    ("dcp_inplace", "dcp.load in place (FileSystemReader)"),
)
RESTORE_RSS_TARGET = 0.05
EXPORT_SPEED_TARGET = 0.9
EXPORT_RSS_TARGET = 0.10
EXPORTS = ("export", "export_warm", "save_file", "load_save_file")


def _restore_model_bytes(ctx: Context) -> int:
    return ctx.size_bytes


def measure(site: Site) -> list[Row]:
    """The restore and export rows (see the module docstring)."""
    ctx, root = site.ctx, site.scratch
    n = _restore_model_bytes(ctx)
    s = {k: Series() for k in ("ckptstore_into", *[p for p, _ in RESTORE_PEERS])}
    exp = {k: Series() for k in EXPORTS}
    root.mkdir(parents=True, exist_ok=True)
    setup = Series()
    setup.add(lambda: ctx.run({"op": "restore_setup", "model_bytes": n, "dir": str(root)}))
    if setup.error:
        for v in (*s.values(), *exp.values()):
            v.fail(f"setup failed: {setup.error}")
    else:
        n = setup.results[0]["nbytes"]
        for r in range(ctx.repeat):
            ctx.log(f"restore: round {r + 1}/{ctx.repeat}")
            for impl, series in s.items():
                out = series.add(lambda: ctx.run({"op": "restore", "impl": impl, "dir": str(root),
                                                  "model_bytes": _restore_model_bytes(ctx), "cold": ctx.cold}))
                if out is not None and not out.get("correct"):
                    series.fail(f"{impl} restored wrong values")
            for impl, series in exp.items():
                out = series.add(lambda: ctx.run({"op": "export", "impl": impl, "dir": str(root),
                                                  "cold": ctx.cold, "check": r == 0}))
                if out is not None and out.get("correct") is False:
                    series.fail(f"{impl} wrote a file that does not equal the checkpoint")
    cache = "cold" if ctx.cold else "warm cache"
    rows = []
    for impl, label in RESTORE_PEERS:
        rows.append(compare("restore", f"load(into=) existing model ({cache})", s["ckptstore_into"], label,
                            s[impl], n, target=1.0, rss_target=RESTORE_RSS_TARGET,
                            note=f"peer extra RSS +{max(s[impl].extra_rss) / n:.2f}x" if s[impl].extra_rss
                            else ""))
    peer = "safetensors save_file (tensors in memory) + fsync"
    rows += [
        compare("restore", f'export(select="model") to .safetensors ({cache})', exp["export"], peer,
                exp["save_file"], n, target=EXPORT_SPEED_TARGET, rss_target=EXPORT_RSS_TARGET,
                note="export reads the checkpoint and writes the file; the peer only writes"),
        compare("restore", 'export(select="model") to .safetensors (checkpoint in page cache)',
                exp["export_warm"], peer, exp["save_file"], n, target=EXPORT_SPEED_TARGET,
                rss_target=EXPORT_RSS_TARGET, note="as right after the save: the checkpoint's pages cached"),
        compare("restore", f'export(select="model") to .safetensors ({cache})', exp["export"],
                "load(select) + safetensors save_file + fsync", exp["load_save_file"], n,
                rss_target=EXPORT_RSS_TARGET, note="the same work: read the checkpoint, write the file"),
    ]
    return rows


def notes(ctx: Context) -> list[str]:
    return [f"restore: the model already exists (allocated and written) when the clock starts; each way "
            f"reads the same weights from its own format; extra RSS is the peak beyond the model; targets: "
            f"faster than each peer and extra RSS at most {RESTORE_RSS_TARGET:.0%} of the model. "
            f"export target: at least {EXPORT_SPEED_TARGET}x save_file, extra RSS at most "
            f"{EXPORT_RSS_TARGET:.0%} of the weights."]



# --- worker side ------------------------------------------------------------------

def model_state(spec: dict) -> dict:
    """The GPT model's weights alone (untied, so every peer can store them), about spec["model_bytes"]."""
    import torch

    from benchmarks.state import gpt_state

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in gpt_state(3 * spec["model_bytes"])["model"].items()
                  if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    return {k: torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen) for k, (shape, dtype) in shapes.items()}


@op("restore_setup")
def op_restore_setup(spec: dict) -> dict:
    """Write the model in every peer's format under spec["dir"]."""
    import torch

    import ckptstore
    from safetensors.torch import save_file
    model = model_state(spec)
    root = Path(spec["dir"])
    ckptstore.save({"model": model}, str(root / "ckptstore"))
    torch.save({"model": model}, root / "model.pt")
    save_file(model, str(root / "model.safetensors"))
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model}, storage_writer=dcp.FileSystemWriter(str(root / "dcp")))
    return {"seconds": 0.0, "nbytes": state_nbytes(model)}


def _copy_into(model: dict, saved: dict) -> None:
    import torch

    with torch.no_grad():
        for k, t in model.items():
            t.copy_(saved[k])


@op("restore")
def op_restore(spec: dict) -> dict:
    """Restore spec["dir"]'s model into an existing, resident one with spec["impl"]; cold cache.

    The model exists before the clock starts (allocated and written, as a
    built model is); extra RSS is everything beyond it.
    """
    import torch

    import ckptstore
    root = Path(spec["dir"])
    model = model_state({**spec, "seed": 1})
    impl = spec["impl"]

    def run() -> None:
        if impl == "ckptstore_into":
            ckptstore.load(str(root / "ckptstore"), into={"model": model})
        elif impl == "ckptstore_copy":
            _copy_into(model, ckptstore.load(str(root / "ckptstore"))["model"])
        elif impl == "torch_copy":
            _copy_into(model, torch.load(root / "model.pt", weights_only=True)["model"])
        elif impl == "torch_mmap_copy":
            _copy_into(model, torch.load(root / "model.pt", weights_only=True, mmap=True)["model"])
        elif impl == "safetensors_copy":
            from safetensors.torch import load_file
            _copy_into(model, load_file(str(root / "model.safetensors")))
        elif impl == "dcp_inplace":
            import torch.distributed.checkpoint as dcp
            dcp.load({"model": model}, storage_reader=dcp.FileSystemReader(str(root / "dcp")))
        else:
            raise ValueError(impl)

    cold, why = drop_caches() if spec.get("cold", True) else (False, "warm cache requested")
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    extra = peak_rss() - before
    gc.collect()
    ok = all(torch.equal(t, s) for t, s in zip(model.values(), model_state(spec).values()))
    return {"seconds": seconds, "extra_rss": extra, "cold": cold, "cold_note": why, "correct": ok}


@op("export")
def op_export(spec: dict) -> dict:
    """Write the model's weights (restore_setup's checkpoint) as .safetensors: ckptstore.export from
    the checkpoint (cold cache, or warm: as right after the save), or safetensors.save_file of the same
    tensors already in memory (+ fsync, as export is durable), or load + save_file."""
    import torch

    import ckptstore
    root = Path(spec["dir"])
    out = root / f"out-{spec['impl']}.safetensors"
    if out.exists():
        out.unlink()
    tensors = None
    if spec["impl"] == "save_file":     # the tensors are in memory before the clock starts
        tensors = ckptstore.load(str(root / "ckptstore"), select="model")["model"]
    if spec["impl"] == "export_warm":   # the checkpoint's files in the page cache, as after a save
        os.sync()
        for f in (root / "ckptstore").rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(8 << 20):
                        pass
        cold, why = False, "warm cache requested"
    else:
        cold, why = drop_caches() if spec.get("cold", True) else (False, "warm cache requested")
    gc.collect()
    reset_peak_rss()
    before = current_rss()
    start = time.perf_counter()
    if spec["impl"] in ("export", "export_warm"):
        ckptstore.export(str(root / "ckptstore"), str(out), select="model")
    elif spec["impl"] == "load_save_file":  # what a user does without export: load, then save_file
        from safetensors.torch import save_file
        save_file(ckptstore.load(str(root / "ckptstore"), select="model")["model"], str(out))
        fsync_path(out)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(out))
        fsync_path(out)
    seconds = time.perf_counter() - start
    extra = peak_rss() - before
    size = out.stat().st_size
    if spec.get("check"):
        from safetensors.torch import load_file
        saved = ckptstore.load(str(root / "ckptstore"), select="model")["model"]
        got = load_file(str(out))
        ok = got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    else:
        ok = None
    out.unlink()
    return {"seconds": seconds, "extra_rss": extra, "file_bytes": size, "cold": cold, "cold_note": why,
            "correct": ok}



scenario(Scenario(
    "restore", order=80, measure=measure, notes=notes, disk=6, nbytes=_restore_model_bytes,
    baselines=tuple(label for _, label in RESTORE_PEERS) + ("safetensors save_file", "load + safetensors save_file")))
