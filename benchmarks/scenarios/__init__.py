"""The scenarios: one module per group of rows, each registering a ``Scenario``.

A scenario module declares, side by side, where it runs (its backend), its workload, its
baselines and peers, its targets, the function that measures it and, when it needs a worker
op of its own, that op. The harness (``benchmarks.harness``) owns the rest: rounds, series,
the worker processes, cold caches, peak RSS, rows, tables, JSON and plots.
"""
