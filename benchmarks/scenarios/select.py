"""Reading only the weights of a training checkpoint (weights + AdamW moments, about 3x the
weights): ``load(select="model")`` against safetensors ``safe_open`` + ``get_tensor`` of
the model's keys from a safetensors file of the whole state, and a full ``load``.

select: the local disk, cold cache, the disk bytes each read in the note (/proc/self/io).
select-s3: moto on this machine (--remote-size), the bytes received on the loopback
interface in the note; ``safe_open`` reads local files, so its row downloads the whole
file first (boto3 ``download_file``), as a user would. Reference rows.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ckptstore.benchmeasure import current_rss, drop_caches, peak_rss, reset_peak_rss, state_nbytes, touch

from benchmarks.backends.s3 import S3, boto3_client
from benchmarks.harness.context import Context, Site
from benchmarks.harness.registry import Scenario, op, scenario
from benchmarks.harness.series import Row, Series, compare
from benchmarks.harness.servers import BUCKET

SELECT_PEERS = (("safetensors_safe_open", "safetensors safe_open + get_tensor (model keys)"),
                ("ckptstore_full", "ckptstore.load of everything"))


def bench_select(site: Site) -> list[Row]:
    """Reading only the weights of a training checkpoint (weights + AdamW moments, --size-gib in
    all) on the local disk, cold cache: ``load(select="model")`` against safetensors ``safe_open``
    + ``get_tensor`` of the same tensors from a safetensors file of the whole state, and a full
    ``load``; the disk bytes each read are in the note (/proc/self/io).
    """
    ctx, root = site.ctx, site.scratch
    root.mkdir(parents=True, exist_ok=True)
    setup = Series()
    setup.add(lambda: ctx.run({"op": "select_setup", "size_bytes": ctx.size_bytes, "dir": str(root)}))
    sel = {k: Series() for k in ("ckptstore_select", *[p for p, _ in SELECT_PEERS])}
    model = _select_rounds(ctx, setup, sel, {"dir": str(root), "cold": ctx.cold}, "select")
    cache = "cold" if ctx.cold else "warm cache"
    return _select_rows("select", f'load(select="model") of a 3x checkpoint ({cache})', sel, model, "disk read")


def bench_select_s3(site: Site) -> list[Row]:
    """The select benchmark against S3 (moto, on this machine), --remote-size-gib in all: the bytes
    moved are those received on the loopback interface. safetensors' ``safe_open`` reads local files,
    so its row downloads the whole file first (boto3 ``download_file``), as a user would."""
    ctx, root = site.ctx, site.scratch
    root.mkdir(parents=True, exist_ok=True)
    sel = {k: Series() for k in ("ckptstore_select", *[p for p, _ in SELECT_PEERS])}
    got: dict = {}

    def measure(server: Any) -> None:
        spec = {"dir": str(root), "uri": site.uri(server, "select/ckpt"), "storage_options": server.options(),
                "bucket": BUCKET, "key": "select/state.safetensors"}
        setup = Series()
        setup.add(lambda: ctx.run({"op": "select_setup", "size_bytes": ctx.size_bytes, **spec}))
        got["model"] = _select_rounds(ctx, setup, sel, spec, "select-s3")

    site.serve(measure, sel, None)
    model = got.get("model") or ctx.state_bytes // 3
    return _select_rows("select-s3", 'load(select="model") of a 3x checkpoint (S3)', sel, model,
                        "received")


def _select_rounds(ctx: Context, setup: Series, sel: dict, spec: dict, what: str) -> int:
    """Run the select series after ``setup`` (already run); returns the model's bytes."""
    if setup.error:
        for v in sel.values():
            v.fail(f"setup failed: {setup.error}")
        return 0
    for r in range(ctx.repeat):
        ctx.log(f"{what}: round {r + 1}/{ctx.repeat}")
        for impl, series in sel.items():
            series.add(lambda: ctx.run({"op": "select", "impl": impl, **spec}))
    return setup.results[0]["model_bytes"]


def _select_rows(backend: str, operation: str, sel: dict, model: int, moved: str) -> list[Row]:
    def note(series: Series) -> str:
        return f"{moved} {min(r['disk_read'] for r in series.results) / model:.2f}x the model" \
            if series.results and model else ""
    return [compare(backend, operation, sel["ckptstore_select"], label, sel[impl], max(model, 1),
                    note=f"ckptstore {note(sel['ckptstore_select'])}; peer {note(sel[impl])}")
            for impl, label in SELECT_PEERS]


def notes(ctx: Context) -> list[str]:
    return ["select: the checkpoint is the GPT training state (weights plus AdamW moments, about 3x the "
            "weights); each way reads the weights only; local: cold cache, disk bytes read from "
            "/proc/self/io; select-s3: moto on this machine, bytes received on loopback (machine-wide)."]



# --- worker side ------------------------------------------------------------------

def _flat(state: dict) -> dict[str, Any]:
    """Every tensor of a GPT state under a dotted name (the layout a safetensors file needs)."""
    out = {f"model.{k}": v for k, v in state["model"].items() if k != "lm_head.weight"}
    for pid, moments in state["optimizer"]["state"].items():
        for k, v in moments.items():
            out[f"optimizer.state.{pid}.{k}"] = v
    return out


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


@op("select_setup")
def op_select_setup(spec: dict) -> dict:
    """A training checkpoint (weights + AdamW moments, about 3x the weights) in ckptstore and safetensors,
    under spec["dir"], or (with spec["uri"]) at that S3 URL and as s3://bucket/key (boto3)."""
    import ckptstore
    from safetensors.torch import save_file

    from benchmarks.state import gpt_state
    state = gpt_state(spec["size_bytes"])
    del state["model"]["lm_head.weight"]           # untied, so safetensors can hold it too
    root = Path(spec["dir"])
    if "uri" in spec:
        ckptstore.save(state, spec["uri"])
        local = root / "upload.safetensors"
        save_file(_flat(state), str(local))
        boto3_client(spec).upload_file(str(local), spec["bucket"], spec["key"])
        local.unlink()
    else:
        ckptstore.save(state, str(root / "ckptstore"))
        save_file(_flat(state), str(root / "state.safetensors"))
    model = sum(t.numel() * t.element_size() for t in state["model"].values())
    return {"seconds": 0.0, "model_bytes": model, "state_bytes": state_nbytes(state)}


@op("select")
def op_select(spec: dict) -> dict:
    """Read only the model's weights of the select_setup checkpoint with spec["impl"]: from spec["dir"]
    on local disk (cold cache; disk bytes read), or from S3 (spec["uri"]; bytes received on loopback)."""
    import ckptstore
    root = Path(spec["dir"])
    impl = spec["impl"]
    remote = "uri" in spec
    uri = spec["uri"] if remote else str(root / "ckptstore")
    client = boto3_client(spec) if remote else None       # built before the clock, like the imports
    if remote:
        cold, why = False, "from S3"
    else:
        cold, why = drop_caches() if spec.get("cold", True) else (False, "warm cache requested")
    gc.collect()
    reset_peak_rss()
    before, moved = current_rss(), (_loopback_received() if remote else _disk_read_bytes())
    start = time.perf_counter()
    if impl == "ckptstore_select":
        got = ckptstore.load(uri, select="model")["model"]
    elif impl == "ckptstore_full":
        got = ckptstore.load(uri)["model"]
    elif impl == "safetensors_safe_open":
        from safetensors import safe_open
        path = root / "state.safetensors"
        if remote:          # safe_open reads a local file: download it first
            path = root / "download.safetensors"
            client.download_file(spec["bucket"], spec["key"], str(path))
        with safe_open(str(path), "pt") as f:
            got = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
        if remote:
            path.unlink()
    else:
        raise ValueError(impl)
    touch(got)
    seconds = time.perf_counter() - start
    moved = (_loopback_received() if remote else _disk_read_bytes()) - moved
    nbytes = state_nbytes(got)
    return {"seconds": seconds, "extra_rss": peak_rss() - before - nbytes, "disk_read": moved,
            "nbytes": nbytes, "cold": cold, "cold_note": why}


def _loopback_received() -> int:
    """Bytes received on the loopback interface, machine-wide: what an S3 server on it sent."""
    import psutil
    return psutil.net_io_counters(pernic=True)["lo"].bytes_recv



scenario(Scenario("select", order=90, measure=bench_select, notes=notes, disk=3,
                  baselines=tuple(label for _, label in SELECT_PEERS)))
scenario(Scenario("select-s3", order=91, measure=bench_select_s3, backend=S3, remote=True, disk=2,
                  baselines=tuple(label for _, label in SELECT_PEERS)))
