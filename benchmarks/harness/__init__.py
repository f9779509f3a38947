"""The benchmark's mechanics, shared by every scenario.

- ``registry``: scenarios, backends, peers and worker ops, each registered by its module;
- ``context``: what a scenario's ``measure`` gets, and the worker process it runs;
- ``series``: repeated measurements, the rows made of them, their notes;
- ``rounds``: interleaved rounds (saves, then loads; the file backends' dd/cat/peers form);
- ``servers``: the loopback servers and mounts, object-store chores;
- ``worker``: the worker side (the save and load ops, ckptstore as the subject);
- ``driver``, ``report``, ``plot``, ``readme``: the run, its table, JSON, pictures and the
  generated tables of README.md and docs/benchmarks.md.

How a single figure is taken (the timed call, reading every byte of a load, peak RSS) is
``ckptstore.benchmeasure``, shared with ``ckptstore bench``.
"""
