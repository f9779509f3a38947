"""Peers on S3: AWS's s3torchconnector (its S3Checkpoint and its DCP storage) and DCP's
fsspec storage on s3fs.

``file`` is the key under the bucket (a prefix for DCP); ``on``: "s3" (the s3 rows),
"scaling-s3" (the S3 scaling curves, saves only: on moto a ranged reader pays the whole
object per range, which grows with the square of the size). The s3 scenario passes the
moto server's ``storage_options`` in the spec.
"""

from __future__ import annotations

from typing import Any, Callable

from benchmarks.harness.registry import peer
from benchmarks.peers._dcp import S3TC_REGION, dcp_loader, dcp_saver, s3tc_client


def _s3tc_checkpoint(spec: dict) -> Any:
    from s3torchconnector import S3Checkpoint
    _, config = s3tc_client(spec)     # also puts the credentials in the environment
    return S3Checkpoint(S3TC_REGION, endpoint=spec["storage_options"]["endpoint_url"], s3client_config=config)


@peer("s3tc_checkpoint", save="s3torchconnector S3Checkpoint writer + torch.save", file="s3tc/state.pt",
      on=("s3", "scaling-s3"), quick=True)
def s3tc_checkpoint_saver(spec: dict) -> Callable[[Any], dict]:
    """s3torchconnector's ``S3Checkpoint``: ``torch.save`` into its streaming S3 writer."""
    import torch

    ck = _s3tc_checkpoint(spec)

    def run(state: Any) -> dict:
        with ck.writer(spec["uri"]) as w:
            torch.save(state, w)
        return {}

    return run


# Not in the quick run: its reader makes ranged GETs, and moto builds the whole object for each
# (about 7 s at 256 MiB here), a figure of the test server rather than of the connector.
@peer("s3tc_checkpoint", load="s3torchconnector S3Checkpoint reader + torch.load", file="s3tc/state.pt",
      on=("s3",))
def s3tc_checkpoint_loader(spec: dict) -> Callable[[], Any]:
    """``torch.load`` (weights_only) from ``S3Checkpoint``'s reader."""
    import torch

    ck = _s3tc_checkpoint(spec)

    def run() -> Any:
        with ck.reader(spec["uri"]) as r:
            return torch.load(r, weights_only=True)

    return run


peer("dcp_s3tc", save="DCP save, s3torchconnector S3StorageWriter", file="dcp_s3tc", on=("s3",))(dcp_saver)
peer("dcp_fsspec", save="DCP save, FsspecWriter (s3fs)", file="dcp_fsspec", on=("s3",))(dcp_saver)
peer("dcp_s3tc", load="DCP load, s3torchconnector S3StorageReader", file="dcp_s3tc", on=("s3",))(dcp_loader)
peer("dcp_fsspec", load="DCP load, FsspecReader (s3fs)", file="dcp_fsspec", on=("s3",))(dcp_loader)
