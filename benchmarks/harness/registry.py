"""What the harness knows about, each entry registered by the module that defines it.

- a **scenario** (``benchmarks/scenarios/*.py``): one group of rows, its key being the
  ``--backends`` name; it declares where it runs, its workload, its baselines, peers and
  targets, and the function that measures it;
- a **backend** (``benchmarks/backends/*.py``): where a checkpoint goes, and how to start
  the server or mount that holds it;
- a **peer** (``benchmarks/peers/*.py``): another way a user would save or load the same
  state, one worker factory with the row label and the scenarios it joins;
- a worker **impl** or **op**: what a worker process runs for a spec (``benchmarks.worker``).

``discover()`` imports every module of those three packages once: adding a peer, a backend
or a scenario is adding a function or a module there, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager

if TYPE_CHECKING:
    from benchmarks.harness.context import Context, Site
    from benchmarks.harness.series import Row

# Worker factories: spec -> a saver ``(state) -> dict`` or a loader ``() -> object``, made
# before the clock starts (imports, clients), so only the call itself is timed.
SAVERS: dict[str, Callable[[dict], Callable[[Any], dict]]] = {}
LOADERS: dict[str, Callable[[dict], Callable[[], Any]]] = {}
# Worker ops: spec -> result dict (``"save"`` and ``"load"`` run the factories above).
OPS: dict[str, Callable[[dict], dict]] = {}
# Baselines whose memory is another process's (dd, cat): their results carry no extra RSS.
EXTERNAL: set[str] = set()


def saver(impl: str, external: bool = False) -> Callable:
    def register(factory: Callable) -> Callable:
        SAVERS[impl] = factory
        if external:
            EXTERNAL.add(impl)
        return factory
    return register


def loader(impl: str, external: bool = False) -> Callable:
    def register(factory: Callable) -> Callable:
        LOADERS[impl] = factory
        if external:
            EXTERNAL.add(impl)
        return factory
    return register


def op(name: str) -> Callable:
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        OPS[name] = fn
        return fn
    return register


# --- peers ------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """One way a user would save or load the state instead of ckptstore.

    ``file`` is what a save writes and a load reads: a name in the scenario's directory
    (file peers) or a key under the bucket (object-store peers); a load is measured only
    when a save peer that writes the same ``file`` succeeded in the same run.
    """

    impl: str              # the worker impl (SAVERS / LOADERS key)
    kind: str              # "save" or "load"
    label: str             # its row's operation
    file: str
    on: frozenset[str]     # the scenarios it joins ("local", "fuse", "scaling", "s3", ...)
    quick: bool = False    # also in the quick run (`make bench`)
    weights_only: bool = False  # its load rows say ", weights_only"

    @property
    def series(self) -> str:
        return f"{self.impl}_{self.kind}"


PEERS: list[Peer] = []


def peer(impl: str, *, save: str | None = None, load: str | None = None, file: str,
         on: tuple[str, ...], quick: bool = False, weights_only: bool = False) -> Callable:
    """Register a saver (``save=`` its row label) or a loader (``load=``) as a peer."""
    if (save is None) == (load is None):
        raise TypeError("a peer is a saver (save=label) or a loader (load=label)")

    def register(factory: Callable) -> Callable:
        kind = "save" if save is not None else "load"
        (SAVERS if kind == "save" else LOADERS)[impl] = factory
        PEERS.append(Peer(impl, kind, save or load or "", file, frozenset(on), quick, weights_only))
        return factory
    return register


def peers(where: str, kind: str, quick: bool = False) -> list[Peer]:
    """The peers of scenario ``where`` that save (``kind="save"``) or load, in registration
    order; in a quick run only those marked ``quick``."""
    discover()
    return [p for p in PEERS if where in p.on and p.kind == kind and (p.quick or not quick)]


# --- backends and scenarios -----------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    """Where checkpoints go: ``uri(handle, name)`` builds the URI of checkpoint ``name``;
    ``launcher(site)``, a context manager, starts the server or mount first and yields its
    handle (None: nothing to start)."""

    name: str
    uri: Callable[[Any, str], str]
    launcher: Callable[["Site"], ContextManager[Any]] | None = None


@dataclass(frozen=True)
class Scenario:
    """One scenario of the benchmark: everything the driver knows about it."""

    key: str                                  # its --backends name and the backend column of its rows
    order: int                                # its place in the table and in the default --backends
    measure: Callable[["Site"], list["Row"]]  # runs it, returns its rows
    backend: Backend | None = None            # where it saves, when it needs a URI or a server
    remote: bool = False                      # measures the --remote-size state
    baselines: tuple[str, ...] = ()           # what its rows are timed against (listed by --help)
    notes: Callable[["Context"], list[str]] = field(default=lambda ctx: [])  # its notes and targets
    disk: float = 0.0                         # scratch space it needs, in multiples of its state's bytes
    nbytes: Callable[["Context"], int] | None = None  # its state's bytes when not the GPT state
    quick: bool = False                       # part of the quick run (`make bench`)

    def state_bytes(self, ctx: "Context") -> int:
        if self.nbytes is not None:
            return self.nbytes(ctx)
        return ctx.remote_state_bytes if self.remote else ctx.state_bytes


SCENARIOS: dict[str, Scenario] = {}


def scenario(s: Scenario) -> Scenario:
    if s.key in SCENARIOS:
        raise ValueError(f"two scenarios named {s.key!r}")
    SCENARIOS[s.key] = s
    return s


def scenarios() -> list[Scenario]:
    """Every scenario, in the table's order."""
    discover()
    return sorted(SCENARIOS.values(), key=lambda s: s.order)


_DISCOVERED = False


def discover() -> None:
    """Import every module of benchmarks.backends, .peers and .scenarios (once): each
    registers what it defines. None imports psutil or matplotlib at module level."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for package in ("benchmarks.backends", "benchmarks.peers", "benchmarks.scenarios"):
        pkg = importlib.import_module(package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
