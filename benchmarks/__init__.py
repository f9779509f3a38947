"""Benchmarks for ckptstore.

``python -m benchmarks.bench`` (``make bench``: quick; ``make bench-full``: every row) runs
the main save/load benchmark; see ``benchmarks/README.md``. ``benchmarks.state`` builds
the GPT-like checkpoint state that benchmarks and tests share.
"""
