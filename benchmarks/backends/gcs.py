"""GCS on gcp-storage-emulator (``--in-memory``, single-threaded, HTTP/1.0), and the fsspec
baselines: torch.save bytes piped with ``fs.pipe``, read with ``fs.cat`` + torch.load
(gcsfs here; the s3 scenario's Lightning-style row is the same pipe on s3fs).

``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` keeps gcsfs from waiting 60 s for a gRPC probe
(set by the driver and the worker before anything imports gcsfs).
"""

from __future__ import annotations

from typing import Any, Callable

from benchmarks.harness.registry import Backend, loader, saver
from benchmarks.harness.servers import BUCKET, loopback_server
from benchmarks.harness.worker import bytes_loader, bytes_saver


def gcs_uri(server: Any, name: str) -> str:
    opts = server.options()
    return (f"gs://{BUCKET}/{name}?endpoint_url={opts['endpoint_url']}"
            f"&token={opts['token']}&project={opts['project']}")


GCS = Backend("gcs", uri=gcs_uri, launcher=loopback_server("GcsEmulator", "emulator"))


def fsspec_fs(spec: dict) -> Any:
    import fsspec

    # skip_instance_cache: a fresh client, as a fresh training process has.
    return fsspec.filesystem(spec["protocol"], skip_instance_cache=True, **spec["storage_options"])


@saver("fsspec_pipe")
def fsspec_pipe_saver(spec: dict) -> Callable[[Any], dict]:
    """torch.save into an ``io.BytesIO``, then ``fs.pipe`` of its bytes: the plain gcsfs
    upload and the Lightning-style cloud save (s3fs)."""
    fs = fsspec_fs(spec)
    return bytes_saver("pipe", lambda data: fs.pipe(spec["path"], data))


@loader("fsspec_cat")
def fsspec_cat_loader(spec: dict) -> Callable[[], Any]:
    """``fs.cat`` of the object, then ``torch.load`` from an ``io.BytesIO``."""
    fs = fsspec_fs(spec)
    return bytes_loader("cat", lambda: fs.cat_file(spec["path"]))
