"""torch.distributed.checkpoint in one process (no process group): the storage writers and
readers the DCP peers and the dcp scenario share. FileSystemWriter fsyncs its files by
default, so on a disk both sides are durable."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

S3TC_REGION = "us-east-1"


def dcp_storage(spec: dict, role: str) -> tuple[Any, Any]:
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
        return dcp, s3tc_dcp(spec, role)
    return dcp, (dcp.FileSystemWriter if role == "writer" else dcp.FileSystemReader)(spec["uri"])


def s3tc_client(spec: dict) -> tuple[Any, Any]:
    """s3torchconnector's client aimed at the moto server: path-style, the endpoint given, the
    server's keys in the environment (its CRT client reads credentials from there)."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    opts = spec["storage_options"]
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = opts["key"], opts["secret"]
    config = S3ClientConfig(force_path_style=True)
    return S3Client(S3TC_REGION, endpoint=opts["endpoint_url"], s3client_config=config), config


def s3tc_dcp(spec: dict, role: str) -> Any:
    """s3torchconnector's DCP S3StorageWriter / S3StorageReader. Neither takes an endpoint, so
    their S3FileSystem is rebuilt around a client that has one (the rest is theirs)."""
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
    from s3torchconnector.dcp.s3_file_system import S3FileSystem
    client, config = s3tc_client(spec)
    if role == "writer":
        storage = S3StorageWriter(S3TC_REGION, spec["uri"], s3client_config=config)
        storage.fs = S3FileSystem(S3TC_REGION, s3_client=client)
    else:
        storage = S3StorageReader(S3TC_REGION, spec["uri"], s3client_config=config)
        storage.fs = S3FileSystem(S3TC_REGION, s3_client=client, reader_constructor=storage._reader_constructor)
    storage.path = storage.fs.init_path(spec["uri"])
    return storage


def dcp_saver(spec: dict) -> Callable[[Any], dict]:
    """``dcp.save(state, storage_writer=...)`` with the writer ``spec["impl"]`` names."""
    def run(state: Any) -> dict:
        dcp, writer = dcp_storage(spec, "writer")
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


def dcp_loader(spec: dict) -> Callable[[], Any]:
    """``dcp.load`` in place: the state to fill has the saved structure, built on the meta
    device before the clock starts and allocated (untouched) in it."""
    import torch

    from benchmarks.state import gpt_state, materialize

    with torch.device("meta"):
        meta = gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))

    def run() -> Any:
        target = materialize(meta)
        dcp, reader = dcp_storage(spec, "reader")
        dcp.load(target, storage_reader=reader)
        return target

    return run
