"""One benchmark measurement, run in a fresh process by ``benchmarks.bench``.

Usage: ``python -m benchmarks.worker '<json spec>'``. The spec's ``op`` picks
what to measure; the result is printed as one JSON line prefixed with
``RESULT_PREFIX`` (anything else on stdout, e.g. a library's progress output,
is ignored by the driver). A failure exits non-zero with the traceback on
stderr.

Why a fresh process per measurement: peak resident memory can only be read
for a whole process, and a process that already saved or loaded once has
allocator caches, page-cache mappings and imported modules that would make
the next measurement look better than a user's first call. The baselines
(``dd``, ``cat``) run through the same ops for the same reason: they then
start from the same conditions as the code they are compared with.

Memory accounting (all figures in bytes):
- save: ``extra = peak during save - RSS just before it`` (the state is
  already built, so anything above that is the saver's own overhead).
- load: ``extra = peak during load - RSS just before it - state bytes``
  (the loaded state itself is the result, not overhead).
The peak is the kernel's high-water mark, reset right before the operation
(see ``sysutil.reset_peak_rss``), so building the state never shows up in it.

Remote baselines (boto3, s3fs, gcsfs) run in the measured process, so their
memory is reported like the library's. Where a baseline is made of steps
(torch.save to a file, then upload it), the saver or loader records each
step's seconds in ``phases``; the driver decides which of them a ratio uses
(e.g. the upload alone), and the total is always there as ``seconds``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.state import build_state, gpt_state, iter_tensors, state_nbytes, unique_storages
from benchmarks.sysutil import current_rss, drop_caches, peak_rss, reset_peak_rss

# gcsfs probes every bucket over gRPC first and waits 60 s for that to time
# out against the emulator; this must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

RESULT_PREFIX = "BENCH_RESULT "


# --- what every loader's result goes through -------------------------------

def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over a storage, whatever dtype its tensors have."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def touch(obj: Any) -> int:
    """Read every byte of every tensor storage in ``obj``.

    A loader may hand back lazily mapped tensors (mmap); timing the call alone
    would then measure nothing. Summing forces every page in, for every loader
    alike. The sum runs over int64 words because torch's uint8 sum is ~500x
    slower than a word sum; the few tail bytes are summed as bytes. Costs
    ~0.05 s per GiB on data already in memory.
    """
    total = 0
    for storage in unique_storages(obj):
        raw = _bytes_view(storage)
        words = raw.numel() // 8 * 8
        if words:
            total += int(raw[:words].view(torch.int64).sum())
        if words < raw.numel():
            total += int(raw[words:].sum())
    return total


def crc_seconds(state: Any) -> float:
    """Time to crc32c every distinct tensor byte of an in-memory state."""
    import crc32c

    start = time.perf_counter()
    value = 0
    for storage in unique_storages(state):
        value = crc32c.crc32c(_bytes_view(storage).numpy(), value)
    return time.perf_counter() - start


def clone_seconds(state: Any) -> float:
    """Time to copy the state's tensors in memory (each shared storage once).

    This is the floor for anything that produces a second copy of the state,
    which is what a save into, or a load out of, an in-memory store does.
    """
    seen: set[int] = set()
    copies = []
    start = time.perf_counter()
    for t in iter_tensors(state):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            copies.append(t.clone())
    seconds = time.perf_counter() - start
    del copies
    gc.collect()
    return seconds


# --- savers and loaders ----------------------------------------------------
# Each maker runs before the clock starts, so importing a library is not
# counted as part of its first save or load.

def _import_backend(uri: str) -> None:
    """Import the fsspec backend a remote URI needs (s3fs, gcsfs), which ckptstore imports on
    first use: as for the peers, importing a library is not part of the timed call."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol != "file":
        import fsspec
        fsspec.get_filesystem_class(protocol)


def _ckptstore_saver(spec: dict) -> Callable[[Any], dict]:
    import ckptstore

    save = ckptstore.save  # fails here, clearly, while the library is unfinished
    _import_backend(spec["uri"])

    def run(state: Any) -> dict:
        info = save(state, spec["uri"], storage_options=spec.get("storage_options"))
        return {k: getattr(info, k, None) for k in ("nbytes", "strategy", "seconds")}

    return run


def _torch_saver(spec: dict) -> Callable[[Any], dict]:
    def run(state: Any) -> dict:
        # What a careful torch user does for a durable checkpoint.
        with open(spec["uri"], "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return {"nbytes": os.path.getsize(spec["uri"])}

    return run


def _ckptstore_loader(spec: dict) -> Callable[[], Any]:
    import ckptstore

    load = ckptstore.load
    _import_backend(spec["uri"])
    return lambda: load(spec["uri"], storage_options=spec.get("storage_options"))


def _tensors_only(obj: Any) -> Any:
    """The tensors of a state in its structure, for ``load(into=)``: a dict keeps its tensor
    entries, a list or tuple stays only when every item is tensors; None when nothing is left."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        kept = {k: v for k, v in ((k, _tensors_only(v)) for k, v in obj.items()) if v is not None}
        return kept or None
    if isinstance(obj, (list, tuple)):
        items = [_tensors_only(v) for v in obj]
        return type(obj)(items) if items and all(v is not None for v in items) else None
    return None


def _ckptstore_into_loader(spec: dict) -> Callable[[], Any]:
    """``load(uri, into=...)``, as a resume does: the tensors already exist (allocated and
    written, as a model and optimizer in memory are) before the clock starts, and the load
    writes the checkpoint's bytes straight into them."""
    import ckptstore

    if spec.get("tensors") is None:
        with torch.device("meta"):  # the GPT state's structure, with nothing computed
            meta = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
        target = _materialize(meta, {})
    else:
        target = build_state(spec)
    for storage in unique_storages(target):
        _bytes_view(storage).zero_()
    into = _tensors_only(target)
    load = ckptstore.load

    def run() -> Any:
        load(spec["uri"], into=into, storage_options=spec.get("storage_options"))
        return target

    run.holds_state = True  # the target is counted before the clock, as the state
    return run


def _torch_loader(spec: dict) -> Callable[[], Any]:
    return lambda: torch.load(spec["uri"], weights_only=True)


def flat_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The state's tensors as one flat {dotted path: tensor} dict, each storage once: the form
    safetensors takes (it refuses two names for one memory; a tied weight is kept under its
    first name, as ``safetensors.torch.save_model`` does). Plain values are left out."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}" if prefix else str(i), v)

    walk("", state)
    return out


def _safetensors_saver(spec: dict) -> Callable[[Any], dict]:
    """``safetensors.torch.save_file`` of the flattened state (flattening timed too), then an
    fsync of the file: durable, as ckptstore's save is."""
    from safetensors.torch import save_file

    def run(state: Any) -> dict:
        save_file(flat_tensors(state), spec["uri"])
        fd = os.open(spec["uri"], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"nbytes": os.path.getsize(spec["uri"])}

    return run


def _safetensors_loader(spec: dict) -> Callable[[], Any]:
    from safetensors.torch import load_file

    return lambda: load_file(spec["uri"])


def _torch_mmap_loader(spec: dict) -> Callable[[], Any]:
    # The tensors map the file; touch() then reads every page, so the mapping is paid for.
    return lambda: torch.load(spec["uri"], weights_only=True, mmap=True)


# Baselines run as "savers" and "loaders" too, in a worker of their own, so
# they meet the same conditions as the library: a fresh process that has just
# built the state (or just dropped the page cache). On a VM whose freed memory
# goes back to the host after a moment, how recently memory was freed changes
# write speed by 2-5x; measuring dd from the idle driver instead would give the
# baseline systematically better conditions than the saves.

def _dd_saver(spec: dict) -> Callable[[Any], dict]:
    # iflag=count_bytes makes count a byte count, so dd writes exactly the
    # state's bytes in 16 MiB blocks; conv=fsync makes it durable like a save.
    cmd = ["dd", "if=/dev/zero", f"of={spec['uri']}", "bs=16M", f"count={spec['nbytes']}",
           "iflag=count_bytes", "conv=fsync", "status=none"]

    def run(state: Any) -> dict:
        subprocess.run(cmd, check=True)
        return {"nbytes": spec["nbytes"]}

    return run


def _cat_loader(spec: dict) -> Callable[[], Any]:
    root = Path(spec["uri"])
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    cmd = ["cat", *map(str, files)]

    def run() -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    return run


# --- object-store baselines ------------------------------------------------------
# What a user does today without ckptstore. Clients are built before the clock
# starts, like the library imports above; what each step took goes into the
# function's ``phases`` dict, which the op copies into the result.

def _boto3_client(spec: dict):
    import boto3

    opts = spec["storage_options"]
    return boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id=opts["key"],
                        aws_secret_access_key=opts["secret"], region_name="us-east-1")


def _fsspec_fs(spec: dict):
    import fsspec

    # skip_instance_cache: a fresh client, as a fresh training process has.
    return fsspec.filesystem(spec["protocol"], skip_instance_cache=True, **spec["storage_options"])


def _boto3_upload_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save to a local file, then boto3 ``upload_file`` with the default
    ``TransferConfig`` (multipart, 10 threads, 8 MiB parts)."""
    from boto3.s3.transfer import TransferConfig

    client, config = _boto3_client(spec), TransferConfig()
    tmp = spec["tmp"]

    def run(state: Any) -> dict:
        t0 = time.perf_counter()
        with open(tmp, "wb") as f:
            torch.save(state, f)
            t1 = time.perf_counter()
            # Not part of either step: keeps the file's write-back from
            # competing with the timed upload.
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        client.upload_file(tmp, spec["bucket"], spec["key"], Config=config)
        t3 = time.perf_counter()
        run.phases.update({"torch.save": t1 - t0, "fsync": t2 - t1, "upload": t3 - t2})
        nbytes = os.path.getsize(tmp)
        os.unlink(tmp)
        return {"nbytes": nbytes}

    run.phases = {}
    return run


def _bytes_saver(step: str, put: Callable[[bytes], Any]) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then ``put`` of its bytes (timed as ``step``)."""
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


def _fsspec_pipe_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then ``fs.pipe`` of its bytes: the
    Lightning-style cloud save (s3fs) and the plain gcsfs upload."""
    fs = _fsspec_fs(spec)
    return _bytes_saver("pipe", lambda data: fs.pipe(spec["path"], data))


def _boto3_fileobj_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then boto3 ``upload_fileobj`` of it
    (default ``TransferConfig``: multipart above 8 MiB, 10 threads)."""
    from boto3.s3.transfer import TransferConfig

    client, config = _boto3_client(spec), TransferConfig()
    return _bytes_saver("upload", lambda data: client.upload_fileobj(
        io.BytesIO(data), spec["bucket"], spec["key"], Config=config))


def _boto3_download_loader(spec: dict) -> Callable[[], Any]:
    """boto3 ``download_file`` (default ``TransferConfig``: ranged GETs of
    8 MiB on 10 threads) to a local file, then ``torch.load(weights_only=True)``
    of it. With ``single_get`` the threshold is raised so boto3 streams the
    object with one plain GET instead."""
    from boto3.s3.transfer import TransferConfig

    client = _boto3_client(spec)
    config = TransferConfig(multipart_threshold=1 << 62) if spec.get("single_get") else TransferConfig()
    tmp = spec["tmp"]

    def run() -> Any:
        t0 = time.perf_counter()
        client.download_file(spec["bucket"], spec["key"], tmp, Config=config)
        t1 = time.perf_counter()
        obj = torch.load(tmp, weights_only=True)
        run.phases.update({"download": t1 - t0, "torch.load": time.perf_counter() - t1})
        os.unlink(tmp)  # read in full; nothing maps it
        return obj

    run.phases = {}
    return run


def _bytes_loader(step: str, get: Callable[[], bytes]) -> Callable[[], Any]:
    """``get`` the object's bytes (timed as ``step``), then ``torch.load``
    (weights_only) from an ``io.BytesIO``."""
    def run() -> Any:
        t0 = time.perf_counter()
        data = get()
        t1 = time.perf_counter()
        obj = torch.load(io.BytesIO(data), weights_only=True)
        run.phases.update({step: t1 - t0, "torch.load": time.perf_counter() - t1})
        return obj

    run.phases = {}
    return run


def _fsspec_cat_loader(spec: dict) -> Callable[[], Any]:
    """``fs.cat`` of the object, then ``torch.load`` from an ``io.BytesIO``."""
    fs = _fsspec_fs(spec)
    return _bytes_loader("cat", lambda: fs.cat_file(spec["path"]))


def _boto3_fileobj_loader(spec: dict) -> Callable[[], Any]:
    """boto3 ``download_fileobj`` into an ``io.BytesIO`` with one plain GET
    (``multipart_threshold`` raised: moto charges a whole-object read per
    ranged GET, see the s3 rows), then ``torch.load`` of its bytes."""
    from boto3.s3.transfer import TransferConfig

    client, config = _boto3_client(spec), TransferConfig(multipart_threshold=1 << 62)

    def get() -> bytes:
        buf = io.BytesIO()
        client.download_fileobj(spec["bucket"], spec["key"], buf, Config=config)
        return buf.getvalue()

    return _bytes_loader("download", get)


# torch.distributed.checkpoint in one process (no process group): ckptstore's
# StoreWriter/StoreReader against DCP's own FileSystemWriter/Reader (which
# fsyncs its files by default, so both sides are durable).

def _dcp_storage(spec: dict, role: str):
    import warnings
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    import torch.distributed.checkpoint as dcp
    impl = spec["impl"]
    if impl == "dcp_store":
        from ckptstore.integrations import dcp as ours
        return dcp, (ours.StoreWriter if role == "writer" else ours.StoreReader)(spec["uri"])
    if impl == "dcp_fsspec":
        # DCP's own fsspec storage (s3fs / gcsfs underneath), the storage options passed through.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
        opts = spec.get("storage_options") or {}
        if role == "writer":
            return dcp, FsspecWriter(spec["uri"], **opts)
        return dcp, FsspecReader(spec["uri"], **opts)
    if impl == "dcp_s3tc":
        return dcp, _s3tc_dcp(spec, role)
    return dcp, (dcp.FileSystemWriter if role == "writer" else dcp.FileSystemReader)(spec["uri"])


def _s3tc_client(spec: dict):
    """s3torchconnector's client aimed at the moto server: path-style, the endpoint given, the
    server's keys in the environment (its CRT client reads credentials from there)."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    opts = spec["storage_options"]
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = opts["key"], opts["secret"]
    config = S3ClientConfig(force_path_style=True)
    return S3Client(S3TC_REGION, endpoint=opts["endpoint_url"], s3client_config=config), config


S3TC_REGION = "us-east-1"


def _s3tc_dcp(spec: dict, role: str):
    """s3torchconnector's DCP S3StorageWriter / S3StorageReader. Neither takes an endpoint, so
    their S3FileSystem is rebuilt around a client that has one (the rest is theirs)."""
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
    from s3torchconnector.dcp.s3_file_system import S3FileSystem
    client, config = _s3tc_client(spec)
    if role == "writer":
        storage = S3StorageWriter(S3TC_REGION, spec["uri"], s3client_config=config)
        storage.fs = S3FileSystem(S3TC_REGION, s3_client=client)
    else:
        storage = S3StorageReader(S3TC_REGION, spec["uri"], s3client_config=config)
        storage.fs = S3FileSystem(S3TC_REGION, s3_client=client, reader_constructor=storage._reader_constructor)
    storage.path = storage.fs.init_path(spec["uri"])
    return storage


def _s3tc_checkpoint_saver(spec: dict) -> Callable[[Any], dict]:
    """s3torchconnector's ``S3Checkpoint``: ``torch.save`` into its streaming S3 writer."""
    from s3torchconnector import S3Checkpoint
    _, config = _s3tc_client(spec)     # also puts the credentials in the environment
    ck = S3Checkpoint(S3TC_REGION, endpoint=spec["storage_options"]["endpoint_url"], s3client_config=config)

    def run(state: Any) -> dict:
        with ck.writer(spec["uri"]) as w:
            torch.save(state, w)
        return {}

    return run


def _s3tc_checkpoint_loader(spec: dict) -> Callable[[], Any]:
    """``torch.load`` (weights_only) from ``S3Checkpoint``'s reader."""
    from s3torchconnector import S3Checkpoint
    _, config = _s3tc_client(spec)
    ck = S3Checkpoint(S3TC_REGION, endpoint=spec["storage_options"]["endpoint_url"], s3client_config=config)

    def run() -> Any:
        with ck.reader(spec["uri"]) as r:
            return torch.load(r, weights_only=True)

    return run


def _dcp_saver(spec: dict) -> Callable[[Any], dict]:
    def run(state: Any) -> dict:
        dcp, writer = _dcp_storage(spec, "writer")
        fs = getattr(writer, "fs", None)
        if spec["impl"] == "dcp_fsspec" and fs is not None:
            # The commit renames the metadata file into place; timed on its own, since on
            # the GCS emulator gcsfs's moveTo is refused (501) and retried before it falls
            # back to copy and delete.
            rename = fs.rename

            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return rename(*args, **kwargs)
                finally:
                    run.phases["metadata rename"] = run.phases.get("metadata rename", 0.0) + time.perf_counter() - t0

            fs.rename = timed
        dcp.save(state, storage_writer=writer)
        return {}

    run.phases = {}
    return run


def _materialize(meta: Any, made: dict) -> Any:
    """Empty CPU tensors in the structure of ``meta`` (tied tensors stay one tensor)."""
    if isinstance(meta, torch.Tensor):
        if id(meta) not in made:
            made[id(meta)] = torch.empty(meta.shape, dtype=meta.dtype)
        return made[id(meta)]
    if isinstance(meta, dict):
        return type(meta)((k, _materialize(v, made)) for k, v in meta.items())
    if isinstance(meta, (list, tuple)):
        return type(meta)(_materialize(v, made) for v in meta)
    return meta


def _dcp_loader(spec: dict) -> Callable[[], Any]:
    # DCP loads in place: the state to fill has the saved structure, built on
    # the meta device before the clock starts and allocated (untouched) in it.
    with torch.device("meta"):
        meta = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))

    def run() -> Any:
        target = _materialize(meta, {})
        dcp, reader = _dcp_storage(spec, "reader")
        dcp.load(target, storage_reader=reader)
        return target

    return run


SAVERS = {"ckptstore": _ckptstore_saver, "torch": _torch_saver, "dd": _dd_saver, "safetensors": _safetensors_saver,
          "boto3_upload": _boto3_upload_saver, "fsspec_pipe": _fsspec_pipe_saver,
          "boto3_fileobj": _boto3_fileobj_saver, "dcp_store": _dcp_saver, "dcp_fs": _dcp_saver,
          "dcp_fsspec": _dcp_saver, "dcp_s3tc": _dcp_saver, "s3tc_checkpoint": _s3tc_checkpoint_saver}
LOADERS = {"ckptstore": _ckptstore_loader, "ckptstore_into": _ckptstore_into_loader, "torch": _torch_loader, "cat": _cat_loader,
           "safetensors": _safetensors_loader, "torch_mmap": _torch_mmap_loader,
           "boto3_download": _boto3_download_loader, "fsspec_cat": _fsspec_cat_loader,
           "boto3_fileobj": _boto3_fileobj_loader, "dcp_store": _dcp_loader, "dcp_fs": _dcp_loader,
           "dcp_fsspec": _dcp_loader, "dcp_s3tc": _dcp_loader, "s3tc_checkpoint": _s3tc_checkpoint_loader}
# Their memory is another process's, and what they "load" is no state.
BASELINES = {"dd", "cat"}


def _measure_save(save: Callable[[Any], dict], state: Any) -> dict:
    gc.collect()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    info = save(state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss": peak_rss() - rss_before, "info": info}


def _measure_load(load: Callable[[], Any], state_bytes: int) -> tuple[dict, Any]:
    gc.collect()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    obj = load()
    touch(obj)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "extra_rss": peak_rss() - rss_before - state_bytes,
        # A loader that loses tied-weight sharing returns more bytes than saved.
        "loaded_nbytes": state_nbytes(obj),
    }
    return result, obj


# --- operations --------------------------------------------------------------

def op_save(spec: dict) -> dict:
    """Build the state (``build_state``: the GPT state, or ``spec["tensors"]``
    small tensors), then save it once with ``spec["impl"]`` to ``spec["uri"]``."""
    save = SAVERS[spec["impl"]](spec)
    state = build_state(spec)
    nbytes = state_nbytes(state)
    result = _measure_save(save, state)
    result["state_bytes"] = nbytes
    if getattr(save, "phases", None):
        result["phases"] = save.phases
    if spec["impl"] in BASELINES:
        del result["extra_rss"]
    if spec.get("crc"):
        # Piggybacks on a process that already holds the state; runs after
        # the save's figures are taken, so it cannot disturb them.
        result["crc_seconds"] = crc_seconds(state)
    return result


def op_load(spec: dict) -> dict:
    """Load ``spec["uri"]`` once with ``spec["impl"]`` and read every byte."""
    load = LOADERS[spec["impl"]](spec)
    cold, why = drop_caches() if spec.get("cold", True) else (False, "warm cache requested")
    # A loader that fills tensors made before the clock holds the state already.
    result, _ = _measure_load(load, 0 if getattr(load, "holds_state", False) else spec["state_bytes"])
    result.update(cold=cold, cold_note=why)
    if getattr(load, "phases", None):
        result["phases"] = load.phases
    if spec["impl"] in BASELINES:
        del result["extra_rss"], result["loaded_nbytes"]
    return result


def op_roundtrip(spec: dict) -> dict:
    """Clone baseline, save and load in one process.

    For backends whose data lives in the process (``memory://``), where a
    fresh process could not see what another one saved.
    """
    save = SAVERS["ckptstore"](spec)
    load = LOADERS["ckptstore"](spec)
    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    nbytes = state_nbytes(state)
    result = {"state_bytes": nbytes, "clone_seconds": clone_seconds(state)}
    result["save"] = _measure_save(save, state)
    # Drop the source state so the load is measured as a resumed run sees it.
    del state
    gc.collect()
    result["load"], _ = _measure_load(load, nbytes)
    return result


# --- CheckpointManager: async stall and training under a background save ------

def storage_clone(state: Any) -> list[torch.UntypedStorage]:
    """``UntypedStorage.clone()`` of every distinct storage: the copy an async
    save has to make before it may return (what ``CheckpointManager``'s
    snapshot does for CPU tensors), with nothing else around it."""
    return [s.clone() for s in unique_storages(state)]


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the kernel.

    Copies freed by an earlier measurement in the same process stay resident
    in the malloc heap; the next copy would reuse them without raising RSS
    and its extra memory would read low. ``malloc_trim`` (glibc) returns
    them, so every measurement's RSS-before is the state plus the
    interpreter, as in a fresh process.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figures may read low, as the docstring says


def _timed_with_peak(fn: Callable[[], Any]) -> tuple[dict, Any]:
    _release_free_memory()
    reset_peak_rss()
    rss_before = current_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss": peak_rss() - rss_before}, out


def _clear_dir(path: Path) -> None:
    """Untimed: remove a checkpoint and sync, so no measurement pays for
    writing back or discarding an earlier one."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def _stall_section(state: Any, nbytes: int, root: Path, rnd: int) -> dict:
    """How long saving blocks the training loop, against copying the state.

    Measures, in an order rotated by the round: the storage clone (the
    floor for an async save, which must copy before returning),
    ``CheckpointManager(async_save=True).save`` until it returns (the stall)
    and on until the background write is committed (its peak RSS is taken
    over that whole span), ``CheckpointManager(async_save=False).save`` and
    ``torch.save`` + fsync. An untimed clone first pays the process's first
    touch of fresh pages, which on a VM can cost several times a copy into
    recycled ones and would otherwise fall on whichever goes first.
    """
    import ckptstore

    warm = storage_clone(state)
    del warm

    def clone() -> dict:
        result, copies = _timed_with_peak(lambda: storage_clone(state))
        del copies
        return result

    def async_save() -> dict:
        mgr = ckptstore.CheckpointManager(root / "async", async_save=True)
        _release_free_memory()
        reset_peak_rss()
        rss_before = current_rss()
        start = time.perf_counter()
        handle = mgr.save(1, state)
        stall = time.perf_counter() - start
        stall_rss = peak_rss() - rss_before
        info = handle.result()
        committed = time.perf_counter() - start
        result = {"seconds": stall, "committed_seconds": committed,
                  "extra_rss": peak_rss() - rss_before, "stall_extra_rss": stall_rss,
                  "strategy": str(info.strategy)}
        mgr.close()
        _clear_dir(root / "async")
        return result

    def sync_save() -> dict:
        mgr = ckptstore.CheckpointManager(root / "sync", async_save=False)
        result, info = _timed_with_peak(lambda: mgr.save(1, state))
        result["strategy"] = str(info.strategy)
        mgr.close()
        _clear_dir(root / "sync")
        return result

    def torch_save() -> dict:
        path = root / "state.pt"
        result, _ = _timed_with_peak(lambda: _torch_saver({"uri": str(path)})(state))
        path.unlink()
        os.sync()
        return result

    steps = [("clone", clone), ("async", async_save), ("sync", sync_save), ("torch", torch_save)]
    k = rnd % len(steps)
    steps = steps[k:] + steps[:k]
    out: dict[str, Any] = {"order": [name for name, _ in steps]}
    for name, fn in steps:
        out[name] = fn()
    return out


def _training_loop(seed: int = 0) -> Callable[[], None]:
    """One step of a small CPU training run: a 3-layer MLP (512 -> 1024 ->
    1024 -> 512, 1.6 M parameters), batch 256, cross-entropy, AdamW. About
    25 ms a step on 2 idle cores with torch's default threads, 40-50 ms with
    one; fixed, never tuned to the save."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(256, 512, generator=gen)
    y = torch.randint(0, 512, (256,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _steps_until(step: Callable[[], None], done: Callable[[], bool]) -> tuple[int, float]:
    """Training steps (at least one) until ``done()``; returns (steps, seconds)."""
    start = time.perf_counter()
    n = 0
    while True:
        step()
        n += 1
        if done():
            return n, time.perf_counter() - start


def _train_section(state: Any, nbytes: int, root: Path, rnd: int, settings: list[int]) -> dict:
    """Training steps/s while an async save of the state runs, and without.

    For each thread setting (0: torch's default), in an order rotated by the
    round: warm up; call ``CheckpointManager(async_save=True).save`` and,
    once it returns, run training steps until the save is committed; run the
    same number of steps with nothing else going on; then, as a reference
    for what the machine allows, run steps while ``dd conv=fsync`` (another
    process, no checksums, no Python) writes the same byte count. The save's
    writer runs in a thread of this process, as it does for a user.
    """
    import ckptstore

    step = _training_loop()
    default_threads = torch.get_num_threads()
    k = rnd % len(settings)
    out: dict[str, Any] = {"default_threads": default_threads}
    for i, threads in enumerate(settings[k:] + settings[:k]):
        torch.set_num_threads(threads or default_threads)
        for _ in range(10):
            step()
        mgr = ckptstore.CheckpointManager(root / f"train-{i}", async_save=True)
        start = time.perf_counter()
        handle = mgr.save(1, state)
        stall = time.perf_counter() - start
        n, with_save = _steps_until(step, handle.done)
        handle.result()  # raises if the save failed
        mgr.close()
        _clear_dir(root / f"train-{i}")

        t0 = time.perf_counter()
        for _ in range(n):
            step()
        without = time.perf_counter() - t0

        target = root / "dd.bin"
        dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={nbytes}",
                               "iflag=count_bytes", "conv=fsync", "status=none"])
        n_dd, with_dd = _steps_until(step, lambda: dd.poll() is not None)
        if dd.wait() != 0:
            raise RuntimeError(f"dd exited with status {dd.returncode}")
        target.unlink()
        os.sync()
        out[str(threads)] = {
            "threads": torch.get_num_threads(), "steps": n, "with_save_seconds": with_save,
            "without_seconds": without, "stall_seconds": stall, "save_seconds": stall + with_save,
            "dd_steps": n_dd, "with_dd_seconds": with_dd}
    torch.set_num_threads(default_threads)
    return out


def op_manager(spec: dict) -> dict:
    """``CheckpointManager`` on local disk, one round: the stall figures,
    then training throughput during a background save (see the two
    sections). Both share one process and one built state; every
    measurement frees what it made and hands it back to the kernel first."""
    root = Path(spec["dir"])
    root.mkdir(parents=True, exist_ok=True)
    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    nbytes = state_nbytes(state)
    rnd = spec.get("round", 0)
    return {"state_bytes": nbytes,
            "stall": _stall_section(state, nbytes, root, rnd),
            "train": _train_section(state, nbytes, root, rnd, list(spec["threads"]))}


# --- preemption: from the signal to a committed checkpoint -----------------------

def op_preempt(spec: dict) -> dict:
    """A training loop with ``CheckpointManager(async_save=True, preemption_signals=SIGTERM)`` at
    spec["uri"]: another thread sends this process SIGTERM part-way through a step, the loop
    sees it at the step's end and saves, and the clock runs from the signal until ``save``
    returns (the step committed). The baseline, in the same process on the same state: a
    blocking ``CheckpointManager.save`` of it (no signal), to another directory."""
    import signal
    import threading

    import ckptstore
    state = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))
    opts = spec.get("storage_options")
    base = spec["uri"].rstrip("/")

    def child(name: str) -> str:
        path, q, query = base.partition("?")
        return f"{path}/{name}" + (q + query if q else "")
    rnd = spec.get("round", 0)
    with ckptstore.CheckpointManager(child(f"r{rnd}-warmup"), storage_options=opts) as warm:
        warm.save(0, {"w": torch.ones(1 << 16)})        # first-call costs out of both figures
    blocking = ckptstore.CheckpointManager(child(f"r{rnd}-blocking"), storage_options=opts)
    start = time.perf_counter()
    blocking.save(1, state)
    blocking_seconds = time.perf_counter() - start
    blocking.close()

    mgr = ckptstore.CheckpointManager(child(f"r{rnd}-preempted"), async_save=True, save_interval_steps=10**9,
                                      preemption_signals=signal.SIGTERM, storage_options=opts)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    sent: list[float] = []

    def send() -> None:
        time.sleep(0.2)
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)
    t = threading.Thread(target=send)
    t.start()
    step = 0
    while True:
        for _ in range(20):               # a step of a few milliseconds of compute
            a = (a @ b).tanh_()
        step += 1
        stop = mgr.preempted
        if stop or mgr.should_save(step):
            mgr.save(step, state)
        if stop:
            break
    seconds = time.perf_counter() - sent[0]
    t.join()
    mgr.close()
    return {"seconds": seconds, "blocking_seconds": blocking_seconds, "steps": step,
            "state_bytes": state_nbytes(state)}


def op_incremental(spec: dict) -> dict:
    """Incremental steps against whole ones, on the same bytes, in one process: a state of
    ``size_bytes`` frozen (unchanged between steps) plus ``trained_bytes`` that change.

    * second save: step 2 of an ``incremental=True`` run, after step 1 saved the same
      frozen part (seconds and bytes written), against a whole save of step 2 in a plain run;
    * full change: every byte new, incremental against plain;
    * restore: a cold ``load`` of the incremental step 2 against the plain step 2.
    """
    import ckptstore
    base = spec["uri"].rstrip("/")

    def child(name: str) -> str:
        path, q, query = base.partition("?")
        return f"{path}/{name}" + (q + query if q else "")
    opts = spec.get("storage_options")
    rnd = spec.get("round", 0)
    g = torch.Generator().manual_seed(rnd)
    piece = 64 << 20
    frozen = {f"frozen{i}": torch.randn(min(piece, spec["size_bytes"] - i * piece) // 4, generator=g)
              for i in range(-(-spec["size_bytes"] // piece))}
    trained = {"adapter": torch.randn(spec["trained_bytes"] // 4, generator=g)}
    state = {"frozen": frozen, "trained": trained, "step": 1}
    inc = ckptstore.CheckpointManager(child(f"r{rnd}-inc"), incremental=True, storage_options=opts)
    plain = ckptstore.CheckpointManager(child(f"r{rnd}-plain"), storage_options=opts)
    inc.save(1, state)
    plain.save(1, state)
    trained["adapter"].add_(1.0)
    state["step"] = 2
    out: dict = {"changed_bytes": spec["trained_bytes"]}
    # Which of the two goes first alternates between rounds, so neither is always the one
    # that meets a cache or a server just warmed (or still busy) from the other.
    order = (("inc", inc), ("plain", plain)) if rnd % 2 == 0 else (("plain", plain), ("inc", inc))
    for name, mgr in order:
        t = time.perf_counter()
        info = mgr.save(2, state)
        out[f"{name}_second_s"], out[f"{name}_second_bytes"] = time.perf_counter() - t, info.nbytes
    for name, mgr in order:
        fresh = {k: torch.randn(v.numel(), generator=g) for k, v in {**frozen, **trained}.items()}
        t = time.perf_counter()
        mgr.save(3, {"all": fresh, "step": 3})
        out[f"{name}_full_change_s"] = time.perf_counter() - t
        del fresh
    for name, _ in order:
        cold, _ = drop_caches() if spec.get("cold", True) else (False, "")
        t = time.perf_counter()
        got = ckptstore.load(child(f"r{rnd}-{name}/step-2"), storage_options=opts)
        # Every byte of every tensor read, so a lazily mapped result is paid for.
        touch = sum(float(v.sum()) for part in ("frozen", "trained") for v in got[part].values())
        out[f"{name}_restore_s"] = time.perf_counter() - t
        del got, touch
    inc.close()
    plain.close()
    out["seconds"] = out["inc_second_s"]
    out["state_bytes"] = spec["size_bytes"] + spec["trained_bytes"]
    return out


# --- inspecting a checkpoint: verify, info, ls ----------------------------------

def _inspect_calls(uri: str, parent: str) -> dict[str, tuple[Callable[[], int], list[str]]]:
    """For each inspection: the call in this process (returns an exit status)
    and the same as ``python -m ckptstore`` arguments."""
    import ckptstore
    from ckptstore import cli

    return {
        "verify": (lambda: 0 if ckptstore.verify(uri).ok else 1, ["verify", uri]),
        "info": (lambda: cli.main(["info", uri]), ["info", uri]),
        "ls": (lambda: cli.main(["ls", parent]), ["ls", parent]),
    }


def op_inspect(spec: dict) -> dict:
    """One inspection of a saved checkpoint, ``spec["command"]``: a shallow
    ``ckptstore.verify(uri)``, ``ckptstore.cli.main(["info", uri])`` or
    ``ckptstore.cli.main(["ls", parent])``, timed as the first call in this
    process (ckptstore and its CLI imported beforehand, output to a buffer),
    then the same through the command line, ``python -m ckptstore ...`` in a
    subprocess (interpreter start and imports included). Either failing
    (a non-zero status) fails the measurement."""
    command = spec["command"]
    call, argv = _inspect_calls(spec["uri"], spec["parent"])[command]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        start = time.perf_counter()
        status = call()
        seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{command} returned {status}: {(err.getvalue() or out.getvalue())[-500:]}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckptstore", *argv], capture_output=True, text=True)
    subprocess_seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"python -m ckptstore {command} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-500:]}")
    return {"seconds": seconds, "subprocess_seconds": subprocess_seconds,
            "output_lines": len(out.getvalue().splitlines())}


# --- restoring into a model that already exists ---------------------------------

def model_state(spec: dict) -> dict:
    """The GPT model's weights alone (untied, so every peer can store them), about spec["model_bytes"]."""
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in gpt_state(3 * spec["model_bytes"])["model"].items()
                  if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    return {k: torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen) for k, (shape, dtype) in shapes.items()}


def op_restore_setup(spec: dict) -> dict:
    """Write the model in every peer's format under spec["dir"]."""
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
    with torch.no_grad():
        for k, t in model.items():
            t.copy_(saved[k])


def op_restore(spec: dict) -> dict:
    """Restore spec["dir"]'s model into an existing, resident one with spec["impl"]; cold cache.

    The model exists before the clock starts (allocated and written, as a
    built model is); extra RSS is everything beyond it.
    """
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


def _flat(state: dict) -> dict[str, torch.Tensor]:
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


def op_select_setup(spec: dict) -> dict:
    """A training checkpoint (weights + AdamW moments, about 3x the weights) in ckptstore and safetensors,
    under spec["dir"], or (with spec["uri"]) at that S3 URL and as s3://bucket/key (boto3)."""
    import ckptstore
    from safetensors.torch import save_file
    state = gpt_state(spec["size_bytes"])
    del state["model"]["lm_head.weight"]           # untied, so safetensors can hold it too
    root = Path(spec["dir"])
    if "uri" in spec:
        ckptstore.save(state, spec["uri"])
        local = root / "upload.safetensors"
        save_file(_flat(state), str(local))
        _boto3_client(spec).upload_file(str(local), spec["bucket"], spec["key"])
        local.unlink()
    else:
        ckptstore.save(state, str(root / "ckptstore"))
        save_file(_flat(state), str(root / "state.safetensors"))
    model = sum(t.numel() * t.element_size() for t in state["model"].values())
    return {"seconds": 0.0, "model_bytes": model, "state_bytes": state_nbytes(state)}


def op_select(spec: dict) -> dict:
    """Read only the model's weights of the select_setup checkpoint with spec["impl"]: from spec["dir"]
    on local disk (cold cache; disk bytes read), or from S3 (spec["uri"]; bytes received on loopback)."""
    import ckptstore
    root = Path(spec["dir"])
    impl = spec["impl"]
    remote = "uri" in spec
    uri = spec["uri"] if remote else str(root / "ckptstore")
    client = _boto3_client(spec) if remote else None       # built before the clock, like the imports
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


def op_export(spec: dict) -> dict:
    """Write the model's weights (restore_setup's checkpoint) as .safetensors: ckptstore.export from
    the checkpoint (cold cache, or warm: as right after the save), or safetensors.save_file of the same
    tensors already in memory (+ fsync, as export is durable), or load + save_file."""
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
        _fsync(out)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(out))
        _fsync(out)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


OPS = {"save": op_save, "load": op_load, "roundtrip": op_roundtrip, "manager": op_manager,
       "incremental": op_incremental,
       "restore_setup": op_restore_setup, "restore": op_restore, "select_setup": op_select_setup,
       "select": op_select, "export": op_export, "preempt": op_preempt,
       "inspect": op_inspect}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    result = OPS[spec["op"]](spec)
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
