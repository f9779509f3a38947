"""S3 on a moto server (``python -m moto.server``, real HTTP S3 protocol, on loopback), and
the boto3 ways of doing what ckptstore does there: the S3 baselines.

Every save goes to an emptied prefix of bucket ``bench``. moto keeps objects above 16 MiB
in temporary files and answers a ranged GET by building the whole object's response
(``servers.range_probe`` measures it); the notes say so.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Callable

from benchmarks.harness.registry import Backend, loader, saver
from benchmarks.harness.servers import BUCKET, loopback_server
from benchmarks.harness.worker import bytes_loader, bytes_saver


def s3_uri(server: Any, name: str) -> str:
    opts = server.options()
    return (f"s3://{BUCKET}/{name}?endpoint_url={opts['endpoint_url']}"
            f"&key={opts['key']}&secret={opts['secret']}")


S3 = Backend("s3", uri=s3_uri, launcher=loopback_server("MotoServer", "moto"))


# --- the boto3 baselines (worker side) ----------------------------------------------------
# What a user does today without ckptstore. Clients are built before the clock starts, like
# the library imports; what each step took goes into the function's ``phases`` dict, which
# the op copies into the result.

def boto3_client(spec: dict) -> Any:
    import boto3

    opts = spec["storage_options"]
    return boto3.client("s3", endpoint_url=opts["endpoint_url"], aws_access_key_id=opts["key"],
                        aws_secret_access_key=opts["secret"], region_name="us-east-1")


@saver("boto3_upload")
def boto3_upload_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save to a local file, then boto3 ``upload_file`` with the default
    ``TransferConfig`` (multipart, 10 threads, 8 MiB parts)."""
    import torch
    from boto3.s3.transfer import TransferConfig

    client, config = boto3_client(spec), TransferConfig()
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


@loader("boto3_download")
def boto3_download_loader(spec: dict) -> Callable[[], Any]:
    """boto3 ``download_file`` (default ``TransferConfig``: ranged GETs of 8 MiB on 10
    threads) to a local file, then ``torch.load(weights_only=True)`` of it. With
    ``single_get`` the threshold is raised so boto3 streams the object with one plain GET."""
    import torch
    from boto3.s3.transfer import TransferConfig

    client = boto3_client(spec)
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


@saver("boto3_fileobj")
def boto3_fileobj_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then boto3 ``upload_fileobj`` of it (default
    ``TransferConfig``: multipart above 8 MiB, 10 threads)."""
    from boto3.s3.transfer import TransferConfig

    client, config = boto3_client(spec), TransferConfig()
    return bytes_saver("upload", lambda data: client.upload_fileobj(
        io.BytesIO(data), spec["bucket"], spec["key"], Config=config))


@loader("boto3_fileobj")
def boto3_fileobj_loader(spec: dict) -> Callable[[], Any]:
    """boto3 ``download_fileobj`` into an ``io.BytesIO`` with one plain GET
    (``multipart_threshold`` raised: moto charges a whole-object read per ranged GET, see
    the s3 rows), then ``torch.load`` of its bytes."""
    from boto3.s3.transfer import TransferConfig

    client, config = boto3_client(spec), TransferConfig(multipart_threshold=1 << 62)

    def get() -> bytes:
        buf = io.BytesIO()
        client.download_fileobj(spec["bucket"], spec["key"], buf, Config=config)
        return buf.getvalue()

    return bytes_loader("download", get)
