"""fsspec's ``memory://`` store: it lives in the process that uses it."""

from __future__ import annotations

from benchmarks.harness.registry import Backend

MEMORY = Backend("memory", uri=lambda _, name: f"memory://bench/{name}")
