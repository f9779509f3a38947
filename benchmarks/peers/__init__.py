"""The peers: the other ways a user would save or load the same state.

One worker factory per peer, registered with ``@peer(...)`` (``benchmarks.harness.registry``):
its impl name, its row label, what it writes or reads, and the scenarios it joins. Within
a module, the order of the functions is the order of the rows. Adding a peer is adding
one such function to the module of its storage; nothing else changes.
"""
