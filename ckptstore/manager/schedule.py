"""Preemption signals and step checks for the save schedule.

A handler only records the signal (no I/O, no lock): ``Preemption`` counts what
arrived, and the manager compares that count with the one it saw when the last
save started.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("ckptstore")


def signal_numbers(signals: Any) -> tuple[int, ...]:
    """``preemption_signals`` as signal numbers: None, one signal, or an iterable of them."""
    if signals is None:
        return ()
    items = (signals,) if isinstance(signals, (int, signal.Signals, str)) else signals
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError("preemption_signals must be a signal (signal.SIGTERM), an iterable of them, or None, "
                        f"got {type(signals).__name__}") from None
    out = []
    for sig in items:
        if isinstance(sig, str):
            try:
                sig = signal.Signals[sig if sig.startswith("SIG") else "SIG" + sig]
            except KeyError:
                raise ValueError(f"preemption_signals: no signal named {sig!r}") from None
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError(f"preemption_signals: {sig!r} is not a signal")
        try:
            sig = signal.Signals(sig)
        except ValueError:
            raise ValueError(f"preemption_signals: {sig!r} is not a signal of this platform") from None
        if sig in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
            raise ValueError(f"preemption_signals: {sig.name} cannot be caught; nothing can save on it")
        if int(sig) not in out:
            out.append(int(sig))
    return tuple(out)


def check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


class Preemption:
    """The preemption signals of one manager: handlers that only count what arrives."""

    def __init__(self, signals: tuple[int, ...], owner: str):
        self.count = 0                 # signals received
        self.last: int | None = None   # the last one
        self.owner = owner
        self._previous: dict[int, Any] = {}
        if not signals:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("preemption_signals: signal handlers can only be installed from the main thread; "
                             "create the CheckpointManager there")

        def on_signal(signum, frame):    # records the signal, nothing more: no I/O, no lock
            self.last = signum
            self.count += 1
        for sig in signals:
            self._previous[sig] = signal.signal(sig, on_signal)

    def uninstall(self) -> None:
        """Put the previous handlers back (from the main thread; elsewhere they stay, harmless)."""
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("%s: close() ran outside the main thread, so the preemption signal handlers stay "
                        "installed (they only record the signal)", self.owner)
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
