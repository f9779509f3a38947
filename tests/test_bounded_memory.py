"""Saving and loading do not hold a second full copy of the state.

Specification: API.md guarantee 4 ("Bounded memory. Saving or loading does not
hold a second full copy of the state in memory"). Each measurement runs in a
fresh process and reads the kernel's peak resident set size (ru_maxrss), so
every transient buffer counts.
"""
from __future__ import annotations

import json
import subprocess
import sys

STATE_MB = 256
TENSORS = 8  # the state is several tensors, as a model's is

PRELUDE = f"""
import json, resource, sys
import torch, ckptstore

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def make_state():
    per = {STATE_MB} * 2**20 // {TENSORS}
    return {{"layers": [torch.full((per // 4,), float(i)) for i in range({TENSORS})], "step": 1}}
"""


def measure(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def into_peak(uri: str, make_model: str, check: str = "") -> int:
    """Peak bytes (VmHWM) a fresh process adds loading ``uri`` into the resident tensors of
    ``model``, which ``make_model`` (code) builds; ``check`` (code) runs on them after."""
    result = measure(make_model + f"""
import re
from pathlib import Path
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
ptrs = {{k: t.data_ptr() for k, t in model.items()}}
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
got = ckptstore.load({uri!r}, into={{"model": model}})
extra = hwm() - before
assert all(got["model"][k] is model[k] and model[k].data_ptr() == ptrs[k] for k in model)
{check}
print(json.dumps({{"extra": extra}}))
""")
    return result["extra"]


def test_save_does_not_hold_a_second_copy_of_the_state(tmp_path):
    uri = str(tmp_path / "big")
    result = measure(f"""
state = make_state()
before = peak()
ckptstore.save(state, {uri!r})
print(json.dumps({{"extra": peak() - before}}))
""")
    state_bytes = STATE_MB * 2**20
    assert result["extra"] < state_bytes / 2, f"save peaked at {result['extra'] / 2**20:.0f} MiB above the state's {STATE_MB} MiB"


def test_load_does_not_hold_a_second_copy_of_the_state(tmp_path):
    uri = str(tmp_path / "big")
    measure(f"ckptstore.save(make_state(), {uri!r}); print('{{}}')")
    result = measure(f"""
before = peak()
state = ckptstore.load({uri!r})
assert all(bool((t == i).all()) for i, t in enumerate(state["layers"]))
print(json.dumps({{"extra": peak() - before}}))
""")
    state_bytes = STATE_MB * 2**20
    assert result["extra"] < 1.5 * state_bytes, (
        f"load peaked at {result['extra'] / 2**20:.0f} MiB for a {STATE_MB} MiB state (the state itself plus a second copy)")


def test_load_into_existing_tensors_holds_almost_nothing_more(tmp_path):
    """API.md: extra memory for the ``into`` part stays within the transfer buffers. A 512 MiB
    state restored into tensors that already exist adds at most 5% of it at peak."""
    uri = str(tmp_path / "into")
    mb = 512
    measure(f"""
per = {mb} * 2**20 // {TENSORS}
ckptstore.save({{"model": {{f"w{{i}}": torch.full((per // 4,), float(i)) for i in range({TENSORS})}}}}, {uri!r})
print('{{}}')
""")
    extra = into_peak(uri, f"""
per = {mb} * 2**20 // {TENSORS}
model = {{f"w{{i}}": torch.zeros(per // 4) for i in range({TENSORS})}}     # resident: zeros touched
for t in model.values():
    t.add_(1)
""", check="assert all(bool((t == i).all()) for i, t in enumerate(model.values()))")
    result = {"extra": extra}
    state_bytes = mb * 2**20
    assert result["extra"] <= 0.05 * state_bytes, (
        f"load(into=) peaked at {result['extra'] / 2**20:.1f} MiB above {mb} MiB of resident tensors")


# ---------------------------------------------------------------- compressed (compression="zstd")

TRAINED = """
def trained_state(mb):
    # small normal numbers, as trained weights are: they compress to ~0.85, so the compressed
    # bytes are nearly as large as the state and a second copy of them would show
    g = torch.Generator().manual_seed(0)
    per = mb * 2**20 // {tensors}
    return {{"model": {{f"w{{i}}": torch.randn(per // 4, generator=g) * 0.02 for i in range({tensors})}}}}
""".format(tensors=TENSORS)


def test_a_compressed_save_does_not_hold_its_compressed_bytes_whole(tmp_path):
    uri = str(tmp_path / "packed")
    result = measure(TRAINED + f"""
state = trained_state({STATE_MB})
before = peak()
info = ckptstore.save(state, {uri!r}, compression="zstd")
assert info.nbytes < 0.95 * info.logical_nbytes, (info.nbytes, info.logical_nbytes)
print(json.dumps({{"extra": peak() - before}}))
""")
    state_bytes = STATE_MB * 2**20
    assert result["extra"] < state_bytes / 2, \
        f"a compressed save peaked at {result['extra'] / 2**20:.0f} MiB above the state's {STATE_MB} MiB"


def test_a_compressed_load_holds_the_state_and_little_more(tmp_path):
    uri = str(tmp_path / "packed")
    measure(TRAINED + f"ckptstore.save(trained_state({STATE_MB}), {uri!r}, compression='zstd'); print('{{}}')")
    result = measure(TRAINED + f"""
before = peak()
state = ckptstore.load({uri!r})
want = trained_state({STATE_MB})
extra = peak() - before - {STATE_MB} * 2**20       # the reference state made to compare with
assert all(torch.equal(state["model"][k], want["model"][k]) for k in want["model"])
print(json.dumps({{"extra": extra}}))
""")
    state_bytes = STATE_MB * 2**20
    assert result["extra"] < 1.25 * state_bytes, (
        f"a compressed load peaked at {result['extra'] / 2**20:.0f} MiB for a {STATE_MB} MiB state")


def test_a_compressed_load_into_existing_tensors_holds_almost_nothing_more(tmp_path):
    uri = str(tmp_path / "packed-into")
    mb = 512
    measure(TRAINED + f"ckptstore.save(trained_state({mb}), {uri!r}, compression='zstd'); print('{{}}')")
    result = {"extra": into_peak(uri, TRAINED + f"""
model = {{k: torch.zeros_like(v).add_(1) for k, v in trained_state({mb})["model"].items()}}   # resident
import gc; gc.collect()
""")}
    state_bytes = mb * 2**20
    assert result["extra"] <= 0.05 * state_bytes, (
        f"load(into=) of a compressed state peaked at {result['extra'] / 2**20:.1f} MiB above {mb} MiB of tensors")
