"""Capture and restore the global random number generators, in the safe format.

A training run that resumes from a checkpoint repeats the uninterrupted run
bit for bit only if every source of randomness is where it was when the
checkpoint was taken: dropout masks and random augmentations draw from the
global torch (CPU and CUDA) generators, much data code draws from Python's
`random` and numpy's legacy global generator.

    state = {"model": model.state_dict(), ..., "rng": capture_rng_state()}
    ckptstore.save(state, uri)
    ...
    state = ckptstore.load(uri)
    restore_rng_state(state["rng"])

`capture_rng_state()` returns only values the safe format holds (tensors,
numpy arrays, ints, floats, str, None, tuples, lists, dicts), so it saves and
loads without pickle. Generators you create yourself (a `torch.Generator`
given to a DataLoader, a `numpy.random.Generator`) are not global state:
checkpoint them yourself (`g.get_state()` / `g.set_state(...)`,
`rng.bit_generator.state`).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["RNG_STATE_VERSION", "capture_rng_state", "restore_rng_state"]

log = logging.getLogger("ckptstore")

#: Version of the dict `capture_rng_state` returns (its "version" key).
RNG_STATE_VERSION = 1

_KEYS = ("version", "python", "numpy", "torch", "cuda")


def capture_rng_state() -> dict:
    """Return the state of the global random number generators, in the safe format.

    The dict holds:

    - ``"version"``: the format version (`RNG_STATE_VERSION`);
    - ``"python"``: `random.getstate()` (a tuple of ints and a float or None);
    - ``"numpy"``: numpy's legacy global generator, `np.random.get_state()`
      (the tuple ``("MT19937", uint32 array, pos, has_gauss, cached_gaussian)``;
      a dict if the global generator was replaced by a non-MT19937 one);
    - ``"torch"``: `torch.get_rng_state()`, the CPU generator (a uint8 tensor);
    - ``"cuda"``: `torch.cuda.get_rng_state_all()`, one uint8 CPU tensor per
      visible device, only when CUDA is available *and already initialised*
      (capturing never initialises CUDA; an uninitialised CUDA has drawn
      nothing, so there is nothing to record).

    Every value is a copy: later draws do not change the returned state.
    The result can be passed to `ckptstore.save` as is (no pickle needed) and
    what `ckptstore.load` returns for it can be given to `restore_rng_state`.
    """
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put the global random number generators back to a captured `state`.

    `state` is what `capture_rng_state` returned, or what `ckptstore.load`
    (with any `map_location`) returned for it: tuples that came back as lists
    are turned back into tuples, and generator tensors that were moved to
    another device are moved back to the CPU as uint8 tensors.

    Each entry present is restored; missing entries are left alone (so a
    state captured on a CPU-only machine restores fine on a GPU one). A
    ``"cuda"`` entry on a machine without CUDA, or with fewer devices than
    were recorded, is restored as far as possible and a warning is logged on
    the ``"ckptstore"`` logger. Unknown keys are ignored with a warning.

    Every entry is checked before any generator is touched: a malformed
    state raises (`TypeError`/`ValueError`) and leaves all generators as
    they were. A state written by a newer format version raises `ValueError`.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"restore_rng_state: expected a dict from capture_rng_state(), got {type(state).__name__}")
    version = state.get("version")
    if version is None:
        log.warning("restore_rng_state: the RNG state has no 'version' key; reading it as version %d",
                    RNG_STATE_VERSION)
    elif not isinstance(version, (int, np.integer)) or isinstance(version, bool):
        raise ValueError(f"restore_rng_state: bad 'version' {version!r}")
    elif int(version) > RNG_STATE_VERSION:
        raise ValueError(f"restore_rng_state: RNG state version {int(version)} is newer than this ckptstore "
                         f"understands ({RNG_STATE_VERSION}); upgrade ckptstore to restore it")

    unknown = sorted(str(k) for k in state if k not in _KEYS)
    if unknown:
        log.warning("restore_rng_state: ignoring unknown key(s) in the RNG state: %s", ", ".join(unknown))

    # Convert and check everything first, then apply: a bad entry changes nothing.
    actions: list[Callable[[], None]] = []
    if state.get("python") is not None:
        py = _python_state(state["python"])
        actions.append(lambda: random.setstate(py))
    if state.get("numpy") is not None:
        npst = _numpy_state(state["numpy"])
        actions.append(lambda: np.random.set_state(npst))
    if state.get("torch") is not None:
        cpu = _byte_tensor(state["torch"], "torch")
        actions.append(lambda: torch.set_rng_state(cpu))
    if state.get("cuda") is not None:
        cuda = _cuda_states(state["cuda"])
        actions.append(lambda: _restore_cuda(cuda))
    for act in actions:
        act()


# --- conversions -------------------------------------------------------------------


def _python_state(value: Any) -> tuple:
    """`random.getstate()` shape: (version, tuple of 625 ints, gauss_next); lists become tuples."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 3:
        raise TypeError(f"restore_rng_state: 'python' must be the 3-tuple random.getstate() returns, "
                        f"got {type(value).__name__}")
    version, internal, gauss = value
    if isinstance(internal, np.ndarray):
        internal = internal.tolist()
    if not isinstance(internal, Sequence):
        raise TypeError(f"restore_rng_state: 'python'[1] must be a sequence of ints, got {type(internal).__name__}")
    gauss = None if gauss is None else float(gauss)
    return (int(version), tuple(int(x) for x in internal), gauss)


def _numpy_state(value: Any) -> Any:
    """`np.random.get_state()` shape: the legacy 5-tuple (or a bit generator state dict)."""
    if isinstance(value, Mapping):  # legacy=False form, or a non-MT19937 global generator
        return dict(value)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) not in (3, 5):
        raise TypeError(f"restore_rng_state: 'numpy' must be the tuple np.random.get_state() returns, "
                        f"got {type(value).__name__}")
    name, key, pos, *rest = value
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    key = np.ascontiguousarray(np.asarray(key), dtype=np.uint32)
    out = [str(name), key, int(pos)]
    if rest:
        has_gauss, cached = rest
        out += [int(has_gauss), float(cached)]
    return tuple(out)


def _byte_tensor(value: Any, where: str) -> torch.Tensor:
    """A generator state as `torch.set_rng_state` wants it: a contiguous uint8 CPU tensor."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (bytes, bytearray)):
        value = torch.frombuffer(bytearray(value), dtype=torch.uint8)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"restore_rng_state: {where!r} must be a uint8 tensor, got {type(value).__name__}")
    if value.dtype != torch.uint8:
        raise TypeError(f"restore_rng_state: {where!r} must be a uint8 tensor, got dtype {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"restore_rng_state: {where!r} is on the meta device and holds no data")
    return value.detach().to("cpu").contiguous().clone()


def _cuda_states(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):  # a single device's state
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"restore_rng_state: 'cuda' must be a list of uint8 tensors, got {type(value).__name__}")
    return [_byte_tensor(v, f"cuda[{i}]") for i, v in enumerate(value)]


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        log.warning("restore_rng_state: the RNG state holds CUDA generator states for %d device(s) but CUDA "
                    "is not available here; CUDA RNG not restored (CPU, numpy and Python RNGs were)",
                    len(states))
        return
    count = torch.cuda.device_count()
    if count < len(states):
        log.warning("restore_rng_state: the RNG state holds CUDA generator states for %d device(s) but only "
                    "%d are visible; restoring the first %d", len(states), count, count)
    elif count > len(states):
        log.warning("restore_rng_state: %d CUDA devices are visible but the RNG state holds %d; devices "
                    "%d.. keep their current state", count, len(states), len(states))
    for i, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s, i)  # lazy: does not initialise CUDA before it is used
