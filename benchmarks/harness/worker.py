"""One benchmark measurement, run in a fresh process: ``python -m benchmarks.worker '<spec>'``.

The spec's ``op`` picks what to measure (an op registered by a scenario, or ``save`` /
``load`` with ``impl`` naming a registered saver or loader: ckptstore, a baseline, a peer);
the result is printed as one JSON line prefixed with ``RESULT_PREFIX`` (anything else on
stdout, e.g. a library's progress output, is ignored by the driver). A failure exits
non-zero with the traceback on stderr.

Why a fresh process per measurement: peak resident memory can only be read for a whole
process, and a process that already saved or loaded once has allocator caches, page-cache
mappings and imported modules that would make the next measurement look better than a
user's first call. The baselines (``dd``, ``cat``) run through the same ops for the same
reason: they then start from the same conditions as the code they are compared with.

Memory accounting (``ckptstore.benchmeasure``, shared with ``ckptstore bench``):
- save: ``extra = peak during save - RSS just before it``;
- load: ``extra = peak during load - RSS just before it - state bytes``.
The peak is the kernel's high-water mark, reset right before the operation, so building
the state never shows up in it.

Remote baselines (boto3, s3fs, gcsfs) run in the measured process, so their memory is
reported like the library's. Where a baseline is made of steps (torch.save to a file, then
upload it), the saver or loader records each step's seconds in ``phases``; the driver
decides which of them a ratio uses, and the total is always there as ``seconds``.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any, Callable

from ckptstore.benchmeasure import (
    bytes_view, drop_caches, measure_load, measure_save, state_nbytes, unique_storages)

from benchmarks.harness.context import RESULT_PREFIX
from benchmarks.harness.registry import EXTERNAL, LOADERS, OPS, SAVERS, discover, loader, op, saver

# gcsfs probes every bucket over gRPC first and waits 60 s for that to time out against the
# emulator; this must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def crc_seconds(state: Any) -> float:
    """Time to crc32c every distinct tensor byte of an in-memory state."""
    import crc32c

    start = time.perf_counter()
    value = 0
    for storage in unique_storages(state):
        value = crc32c.crc32c(bytes_view(storage).numpy(), value)
    return time.perf_counter() - start


def import_backend(uri: str) -> None:
    """Import the fsspec backend a remote URI needs (s3fs, gcsfs), which ckptstore imports on
    first use: as for the peers, importing a library is not part of the timed call."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol != "file":
        import fsspec
        fsspec.get_filesystem_class(protocol)


# --- ckptstore, the subject ------------------------------------------------------------
# Each factory runs before the clock starts, so importing a library is not counted as part
# of its first save or load.

@saver("ckptstore")
def ckptstore_saver(spec: dict) -> Callable[[Any], dict]:
    import ckptstore

    save = ckptstore.save  # fails here, clearly, while the library is unfinished
    import_backend(spec["uri"])

    def run(state: Any) -> dict:
        info = save(state, spec["uri"], storage_options=spec.get("storage_options"))
        return {k: getattr(info, k, None) for k in ("nbytes", "strategy", "seconds")}

    return run


@loader("ckptstore")
def ckptstore_loader(spec: dict) -> Callable[[], Any]:
    import ckptstore

    load = ckptstore.load
    import_backend(spec["uri"])
    return lambda: load(spec["uri"], storage_options=spec.get("storage_options"))


def _tensors_only(obj: Any) -> Any:
    """The tensors of a state in its structure, for ``load(into=)``: a dict keeps its tensor
    entries, a list or tuple stays only when every item is tensors; None when nothing is left."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        kept = {k: v for k, v in ((k, _tensors_only(v)) for k, v in obj.items()) if v is not None}
        return kept or None
    if isinstance(obj, (list, tuple)):
        items = [_tensors_only(v) for v in obj]
        return type(obj)(items) if items and all(v is not None for v in items) else None
    return None


@loader("ckptstore_into")
def ckptstore_into_loader(spec: dict) -> Callable[[], Any]:
    """``load(uri, into=...)``, as a resume does: the tensors already exist (allocated and
    written, as a model and optimizer in memory are) before the clock starts, and the load
    writes the checkpoint's bytes straight into them."""
    import ckptstore
    import torch

    from benchmarks.state import build_state, gpt_state, materialize

    if spec.get("tensors") is None:
        with torch.device("meta"):  # the GPT state's structure, with nothing computed
            meta = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
        target = materialize(meta)
    else:
        target = build_state(spec)
    for storage in unique_storages(target):
        bytes_view(storage).zero_()
    into = _tensors_only(target)
    load = ckptstore.load

    def run() -> Any:
        load(spec["uri"], into=into, storage_options=spec.get("storage_options"))
        return target

    run.holds_state = True  # the target is counted before the clock, as the state
    return run


# --- baselines made of steps -----------------------------------------------------------

def bytes_saver(step: str, put: Callable[[bytes], Any]) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then ``put`` of its bytes (timed as ``step``)."""
    import torch

    def run(state: Any) -> dict:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        t1 = time.perf_counter()
        put(data)
        t2 = time.perf_counter()
        run.phases.update({"torch.save": t1 - t0, step: t2 - t1})
        return {"nbytes": len(data)}

    run.phases = {}
    return run


def bytes_loader(step: str, get: Callable[[], bytes]) -> Callable[[], Any]:
    """``get`` the object's bytes (timed as ``step``), then ``torch.load`` (weights_only)
    from an ``io.BytesIO``."""
    import torch

    def run() -> Any:
        t0 = time.perf_counter()
        data = get()
        t1 = time.perf_counter()
        obj = torch.load(io.BytesIO(data), weights_only=True)
        run.phases.update({step: t1 - t0, "torch.load": time.perf_counter() - t1})
        return obj

    run.phases = {}
    return run


# --- the two general ops -----------------------------------------------------------------

@op("save")
def op_save(spec: dict) -> dict:
    """Build the state (``build_state``: the GPT state, or ``spec["tensors"]`` small
    tensors), then save it once with ``spec["impl"]`` to ``spec["uri"]``."""
    from benchmarks.state import build_state

    save = SAVERS[spec["impl"]](spec)
    state = build_state(spec)
    nbytes = state_nbytes(state)
    result = measure_save(save, state)
    result["state_bytes"] = nbytes
    if getattr(save, "phases", None):
        result["phases"] = save.phases
    if spec["impl"] in EXTERNAL:
        del result["extra_rss"]
    if spec.get("crc"):
        # Piggybacks on a process that already holds the state; runs after the save's
        # figures are taken, so it cannot disturb them.
        result["crc_seconds"] = crc_seconds(state)
    return result


@op("load")
def op_load(spec: dict) -> dict:
    """Load ``spec["uri"]`` once with ``spec["impl"]`` and read every byte."""
    load = LOADERS[spec["impl"]](spec)
    cold, why = drop_caches() if spec.get("cold", True) else (False, "warm cache requested")
    # A loader that fills tensors made before the clock holds the state already.
    result, _ = measure_load(load, 0 if getattr(load, "holds_state", False) else spec["state_bytes"])
    result.update(cold=cold, cold_note=why)
    if getattr(load, "phases", None):
        result["phases"] = load.phases
    if spec["impl"] in EXTERNAL:
        del result["extra_rss"], result["loaded_nbytes"]
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    discover()
    result = OPS[spec["op"]](spec)
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
