"""Series of repeated measurements, and the rows made of them.

A ``Series`` holds one thing measured once per round; a ``Row`` is a series against a
baseline series of the same rounds (``compare``): best time of each, their ratio, the worst
extra peak memory, the targets and whether they are met. The ``*_note`` helpers say what
a row's numbers alone would hide (the commit strategy, lost tied weights, each step of a
multi-step baseline, ckptstore's best against each peer's).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.harness.context import WorkerError


@dataclass
class Series:
    """Repeated measurements of one thing; stops repeating after an error."""

    seconds: list[float] = field(default_factory=list)
    extra_rss: list[int] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    error: str | None = None

    def add(self, fn: Callable[[], dict]) -> dict | None:
        if self.error:
            return None  # a broken operation fails the same way every time
        try:
            out = fn()
        except WorkerError as e:
            self.error = str(e)
            return None
        self.seconds.append(out["seconds"])
        if "extra_rss" in out:
            self.extra_rss.append(out["extra_rss"])
        self.results.append(out)
        return out

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None

    @property
    def ok(self) -> bool:
        """Measured, and never failed: something to load from."""
        return bool(self.seconds) and not self.error

    def view(self, seconds: Callable[[dict], float]) -> "Series":
        """The same runs timed differently: e.g. only the upload step of a baseline that
        first torch.saves to a file and then uploads it."""
        return Series([seconds(r) for r in self.results], list(self.extra_rss), list(self.results), self.error)

    def phase(self, *names: str) -> "Series":
        """The runs timed as the sum of the named steps in their ``phases``."""
        return self.view(lambda r: sum(r["phases"][n] for n in names))

    def fail(self, error: str) -> None:
        """Record an error from outside the worker (a server that would not start, a
        cleanup that failed); the first error is kept."""
        self.error = self.error or error


def series(*keys: str) -> dict[str, Series]:
    return {k: Series() for k in keys}


@dataclass
class Row:
    backend: str
    operation: str
    seconds: float | None  # best of the repeats
    nbytes: int
    gb_per_s: float | None
    baseline: str
    baseline_seconds: float | None
    ratio: float | None  # baseline_seconds / seconds unless ratio_meaning says otherwise
    ratio_meaning: str = "baseline time / time (higher is better)"
    target: float | None = None  # minimum ratio (maximum with target_is_max)
    extra_rss: float | None = None  # worst extra peak RSS, fraction of nbytes
    rss_target: float | None = None  # maximum extra_rss
    meets_target: bool | None = None
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    extra_rss_bytes: list[int] = field(default_factory=list)
    note: str = ""
    error: str | None = None
    target_is_max: bool = False  # the ratio must be at most the target (e.g. bytes per tensor)
    # A point of a scaling curve (scaling.png): the curve's name, its axis ("size": x is the
    # state's bytes; "tensors": x is the tensor count) and x.
    curve: str = ""
    axis: str = ""
    x: int | None = None


def compare(backend: str, operation: str, series: Series, baseline: str, base: Series, nbytes: int,
            target: float | None = None, rss_target: float | None = None, note: str = "") -> Row:
    """Row for an operation timed against a baseline doing the same work."""
    row = Row(backend, operation, series.best, nbytes, None, baseline, base.best, None,
              target=target, rss_target=rss_target, samples=series.seconds,
              baseline_samples=base.seconds, extra_rss_bytes=series.extra_rss, note=note,
              error=series.error or base.error)
    if row.seconds:
        row.gb_per_s = nbytes / row.seconds / 1e9
        if row.baseline_seconds:
            row.ratio = row.baseline_seconds / row.seconds
    if series.extra_rss:
        row.extra_rss = max(series.extra_rss) / nbytes
    if target is not None and row.ratio is not None:
        row.meets_target = row.ratio >= target and (
            rss_target is None or (row.extra_rss is not None and row.extra_rss <= rss_target))
    return row


# --- notes ------------------------------------------------------------------------------

def joined(*notes: str) -> str:
    return "; ".join(x for x in notes if x)


def peers_note(ours: Series, peers: list[tuple[str, Series]]) -> str:
    """ckptstore's best time against each peer's best, measured in the same rounds."""
    if not ours.seconds:
        return ""
    parts = [f"{min(p.seconds) / min(ours.seconds):.2f}x {label}" for label, p in peers if p.seconds]
    return ("against " + ", ".join(parts)) if parts else ""


def phase_note(series: Series) -> str:
    """The steps of the fastest run of a multi-step baseline."""
    runs = [r for r in series.results if r.get("phases")]
    if not runs:
        return ""
    best = min(runs, key=lambda r: r["seconds"])
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in best["phases"].items())
    return f"fastest run's steps: {steps} (of {best['seconds']:.2f} s in all)"


def save_note(series: Series) -> str:
    infos = [r.get("info") or {} for r in series.results]
    strategies = sorted({str(i.get("strategy")) for i in infos if i.get("strategy")})
    return f"commit strategy: {', '.join(strategies)}" if strategies else ""


def load_note(series: Series, nbytes: int, expect_cold: bool = False) -> str:
    """Flag loads that returned a different number of tensor bytes than were saved:
    typically tied weights (lm_head / wte) loaded as two copies."""
    got = {r["loaded_nbytes"] for r in series.results}
    if got and got != {nbytes}:
        return f"loaded {sorted(got)} tensor bytes, saved {nbytes} (storage sharing lost?)"
    if expect_cold and any(not r.get("cold", True) for r in series.results):
        return "the worker could not drop the page cache: warm-cache figure"
    return ""


def medians(ours: Series, base: Series) -> str:
    """The medians of two series measured in the same rounds, next to the best-of ratio: on
    a disk or server whose speed varies from round to round they say more than one lucky sample."""
    if not ours.seconds or not base.seconds:
        return ""
    a, b = statistics.median(ours.seconds), statistics.median(base.seconds)
    return f"medians {a:.3f} s against {b:.3f} s ({b / a:.2f}x)"
