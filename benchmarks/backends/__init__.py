"""Where the benchmark's checkpoints go: one module per storage backend.

Each declares a ``Backend`` (how a checkpoint URI is built, and the launcher that starts
its server or mount) and the raw baselines of that storage (dd and cat for a path,
boto3 for S3, gcsfs for GCS) as worker savers and loaders.
"""
