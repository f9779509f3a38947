"""Incremental steps: CheckpointManager(incremental=True) writes only bytes no kept step holds.

Specification: API.md's `incremental=True` bullet and guarantee 8;
docs/format.md, "Version 3.0: incremental steps".
"""
from __future__ import annotations

import shutil

import crc32c
import numpy as np
import pytest
import torch

import ckptstore
from ckptstore.format import manifest

MiB = 1 << 20


def run_uri(store):
    return store.uri("run")


def frozen_state(step: int, base: torch.Tensor, trained_mib: float = 0.5):
    n = int(trained_mib * MiB) // 4
    g = torch.Generator().manual_seed(step)
    return {"base": base, "adapter": torch.randn(n, generator=g), "step": step}


def equal(a, b) -> bool:
    return a["step"] == b["step"] and torch.equal(a["base"], b["base"]) and torch.equal(a["adapter"], b["adapter"])


def test_a_frozen_base_is_written_once_and_every_step_restores_bit_for_bit(store):
    base = torch.randn(4 * MiB // 4, generator=torch.Generator().manual_seed(0))
    states = {s: frozen_state(s, base) for s in (1, 2, 3)}
    with ckptstore.CheckpointManager(run_uri(store), incremental=True) as mgr:
        first = mgr.save(1, states[1])
        second = mgr.save(2, states[2])
        third = mgr.save(3, states[3])
        changed = states[2]["adapter"].numel() * 4
        assert first.nbytes >= base.numel() * 4
        assert second.nbytes <= 1.1 * changed and third.nbytes <= 1.1 * changed, (second.nbytes, changed)
        for s in (1, 2, 3):
            assert equal(mgr.restore(step=s), states[s])
            assert ckptstore.verify(store.uri(f"run/step-{s}"), deep=True).ok
        assert equal(ckptstore.load(store.uri("run/step-2")), states[2])
        with ckptstore.open(store.uri("run/step-3")) as ck:
            assert torch.equal(ck["adapter"], states[3]["adapter"])


def test_odd_sized_blobs_keep_every_reused_blob_aligned(tmp_path):
    # Step 1's data ends on an odd-sized blob; step 2 reuses from it and writes after it, step 3
    # reuses from both. Every shared file is a multiple of 64 bytes, so no listed file's blobs
    # shift off the 64-byte grid however the files are combined.
    g = torch.Generator().manual_seed(0)
    base, bias = torch.randn(1000, generator=g), torch.randn(3, generator=g)
    states = {1: {"base": base, "bias": bias, "n": torch.randn(5, generator=g)},
              2: {"base": base, "bias": torch.randn(3, generator=g), "n": torch.randn(7, generator=g)}}
    states[3] = {"base": base, "bias": states[2]["bias"], "n": torch.randn(11, generator=g)}
    with ckptstore.CheckpointManager(str(tmp_path / "run"), incremental=True) as mgr:
        for step, state in states.items():
            mgr.save(step, state)
        for step, state in states.items():
            got = mgr.restore(step=step)
            assert all(torch.equal(got[k], state[k]) for k in state), step
            report = ckptstore.verify(str(tmp_path / f"run/step-{step}"), deep=True)
            assert report.ok, (step, report.problems)
    sizes = [p.stat().st_size for p in (tmp_path / "run" / ".shared").glob("*.bin")]
    assert len(sizes) == 3 and all(n % 64 == 0 for n in sizes), sizes


def test_everything_changed_means_nothing_is_reused(tmp_path):
    with ckptstore.CheckpointManager(str(tmp_path / "run"), incremental=True) as mgr:
        a = mgr.save(1, {"w": torch.randn(MiB // 4)})
        b = mgr.save(2, {"w": torch.randn(MiB // 4)})
    assert a.nbytes == b.nbytes == MiB


def _same_crc_other_bytes(data: bytes, window: int, fix_at: int) -> bytes:
    """``data`` with bytes in [window, window+8) changed and 4 bytes at ``fix_at`` solved so
    that the CRC-32C is unchanged: CRC is affine over GF(2), so the change's effect is
    cancelled by a combination of the 32 single-bit changes at ``fix_at``."""
    n = len(data)
    zero = crc32c.crc32c(bytes(n))

    def effect(delta: bytes) -> int:            # the linear part of the CRC of a change
        return crc32c.crc32c(delta) ^ zero

    delta = bytearray(n)
    delta[window:window + 8] = b"\x5a\xa5\x01\x80\xff\x10\x33\xc4"
    target = effect(bytes(delta))
    columns = []
    for bit in range(32):
        d = bytearray(n)
        d[fix_at + bit // 8] = 1 << (bit % 8)
        columns.append(effect(bytes(d)))
    # Solve sum(x_j * columns[j]) == target over GF(2) by elimination.
    rows = [(c, 1 << j) for j, c in enumerate(columns)]
    basis: dict[int, tuple[int, int]] = {}
    for value, combo in rows:
        for top in sorted(basis, reverse=True):
            if value >> top & 1:
                value ^= basis[top][0]
                combo ^= basis[top][1]
        if value:
            basis[value.bit_length() - 1] = (value, combo)
    value, combo = target, 0
    for top in sorted(basis, reverse=True):
        if value >> top & 1:
            value ^= basis[top][0]
            combo ^= basis[top][1]
    assert value == 0, "the 32 bits at fix_at do not span the CRC's space"
    for bit in range(32):
        if combo >> bit & 1:
            delta[fix_at + bit // 8] ^= 1 << (bit % 8)
    out = bytes(a ^ b for a, b in zip(data, delta))
    assert out != data and crc32c.crc32c(out) == crc32c.crc32c(data)
    return out


def test_two_buffers_with_the_same_crc32c_are_not_taken_as_equal(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    other = _same_crc_other_bytes(data, window=100, fix_at=2000)
    a = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    b = torch.frombuffer(bytearray(other), dtype=torch.uint8)
    with ckptstore.CheckpointManager(str(tmp_path / "run"), incremental=True) as mgr:
        mgr.save(1, {"w": a})
        second = mgr.save(2, {"w": b})
        assert second.nbytes >= len(other), "bytes with an equal CRC-32C were taken as already stored"
        assert torch.equal(mgr.restore(step=2)["w"], b) and torch.equal(mgr.restore(step=1)["w"], a)


def test_a_flipped_shared_byte_is_caught_and_restore_falls_back_past_every_step_using_it(tmp_path):
    d = tmp_path / "run"
    old_base = torch.randn(MiB // 4)
    new_base = torch.randn(MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        mgr.save(1, frozen_state(1, old_base))
        mgr.save(2, frozen_state(2, old_base))
        mgr.save(3, frozen_state(3, new_base))     # the base changed: written again
        mgr.save(4, frozen_state(4, new_base))     # shares step 3's base
    shared = d / ".shared"
    # the file step 3 wrote holds the new base; flip one byte of it
    newest = sorted(p for p in shared.iterdir() if p.name.endswith(".bin"))
    target = [p for p in newest if p.stat().st_size >= MiB][-1]
    raw = bytearray(target.read_bytes())
    raw[1000] ^= 0x01
    target.write_bytes(bytes(raw))
    assert not ckptstore.verify(str(d / "step-4"), deep=True).ok
    assert not ckptstore.verify(str(d / "step-3"), deep=True).ok
    assert ckptstore.verify(str(d / "step-2"), deep=True).ok
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        got = mgr.restore()
    assert got["step"] == 2 and torch.equal(got["base"], old_base)


def test_keep_last_1_over_many_steps_stores_the_base_once_and_leaks_nothing(tmp_path):
    d = tmp_path / "run"
    base = torch.randn(2 * MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True, keep_last=1) as mgr:
        for s in range(1, 21):
            mgr.save(s, frozen_state(s, base, trained_mib=0.25))
        assert mgr.steps() == [20]
        assert equal(mgr.restore(), frozen_state(20, base, trained_mib=0.25))
    files = sorted(p.name for p in (d / ".shared").iterdir())
    assert all(n.endswith(".bin") for n in files), files          # no intent or condemned list left
    total = sum((d / ".shared" / n).stat().st_size for n in files)
    # the first step's file (base + its adapter) and the newest adapter: nothing else
    assert len(files) == 2 and total <= 2 * MiB + 2 * MiB // 4 + 4096, (files, total)


def test_cp_and_export_of_an_incremental_step_stand_alone(tmp_path):
    d = tmp_path / "run"
    base = torch.randn(MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        mgr.save(1, frozen_state(1, base))
        mgr.save(2, frozen_state(2, base))
    from ckptstore.cli import main as cli
    assert cli(["cp", str(d / "step-2"), str(tmp_path / "copy")]) == 0
    ckptstore.export(str(d / "step-2"), str(tmp_path / "step2.safetensors"), select=["base", "adapter"])
    shutil.rmtree(d)
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "step2.safetensors"))
    assert torch.equal(exported["base"], base) and torch.equal(exported["adapter"], frozen_state(2, base)["adapter"])
    got = ckptstore.load(str(tmp_path / "copy"))
    assert equal(got, frozen_state(2, base))
    assert ckptstore.verify(str(tmp_path / "copy"), deep=True).ok


def test_a_ckptstore_that_knows_only_version_2_refuses_an_incremental_step(tmp_path, monkeypatch):
    d = tmp_path / "run"
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    monkeypatch.setattr(manifest, "READABLE_MAJORS", (1, 2))
    with pytest.raises(ckptstore.FormatTooNewError):
        ckptstore.load(str(d / "step-1"))


def test_gc_of_the_run_frees_what_no_step_lists_and_keeps_the_rest(tmp_path):
    d = tmp_path / "run"
    base = torch.randn(MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, frozen_state(s, base))
    # a step removed by hand (as a crash in the middle of a prune would leave it)
    shutil.rmtree(d / "step-3")
    before = {p.name for p in (d / ".shared").iterdir()}
    from ckptstore.cli import main as cli
    assert cli(["gc", str(d)]) == 0
    after = {p.name for p in (d / ".shared").iterdir()}
    assert len(after) == len(before) - 1
    for s in (1, 2):
        assert ckptstore.verify(str(d / f"step-{s}"), deep=True).ok
        assert equal(ckptstore.load(str(d / f"step-{s}")), frozen_state(s, base))


def test_gc_grace_0_removes_markers_of_dead_saves_even_with_no_data_to_free(tmp_path):
    import json
    import os
    import time

    d = tmp_path / "run"
    base = torch.randn(MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        mgr.save(1, frozen_state(1, base))
    shared = d / ".shared"
    data = {p.name for p in shared.iterdir()}
    # what a save and a sweep killed with SIGKILL leave behind: no data file, only their markers
    old = time.time() - 5
    for name in ("18ee7903483a7ca2-cc85913e.intent", "18ee79027e1aeba8-0a2994e3.condemned"):
        (shared / name).write_text(json.dumps({"generation": name.split(".")[0], "files": [], "time": old}))
        os.utime(shared / name, (old, old))
    from ckptstore.cli import main as cli
    assert cli(["gc", str(d)]) == 0                       # within the default grace: kept
    assert {p.name for p in shared.iterdir()} == data | {"18ee7903483a7ca2-cc85913e.intent",
                                                          "18ee79027e1aeba8-0a2994e3.condemned"}
    assert cli(["gc", "--grace", "0", str(d)]) == 0
    assert {p.name for p in shared.iterdir()} == data
    assert ckptstore.verify(str(d / "step-1"), deep=True).ok


# ---------------------------------------------------------------- kill -9 at random instants

def _kill_rounds(writers, store, rounds: int, seed: str, megabytes: float = 1.0, longest: float = 0.8) -> int:
    """Incremental saves that also prune (keep_last=2), SIGKILLed at random instants; after every
    kill every kept step loads and deep-verifies. Returns how many steps were committed."""
    import random
    import time

    from helpers.save_loop import check_incremental_state

    rng = random.Random(seed)
    run = run_uri(store)
    version, commits = 0, 0
    for _ in range(rounds):
        pid = writers.start_writer("incremental+" + run, version, megabytes)
        time.sleep(rng.uniform(0.05, longest))
        committed = writers.kill_writer(pid)
        commits += len(committed)
        version = (committed[-1] + 1 if committed else version) + 1000   # never reuse a step number
        with ckptstore.CheckpointManager(run, _probe=False) as mgr:
            for step in mgr.steps():
                uri = store.uri(f"run/step-{step}")
                report = ckptstore.verify(uri, deep=True)
                assert report.ok, f"kept step {step} after a kill: {report.problems}"
                assert check_incremental_state(ckptstore.load(uri)) == step
    return commits


def _gc_frees_the_rest(store) -> None:
    from ckptstore.cli import main as cli

    assert cli(["gc", "--grace", "0", run_uri(store)]) == 0
    with ckptstore.CheckpointManager(run_uri(store), _probe=False) as mgr:
        steps = mgr.steps()
        listed = set()
        for step in steps:
            with ckptstore.open(store.uri(f"run/step-{step}")) as ck:
                assert ck.load()["version"] == step
            from ckptstore.format.manifest import Manifest
            from ckptstore.reader import open_commit
            from ckptstore.stores import open_store
            m, _ = open_commit(open_store(store.uri(f"run/step-{step}")))
            listed |= {f.name for f in m.files}
    left = {p.rsplit("/", 1)[-1] for p in store.files() if "/.shared/" in p}
    assert left == listed, f"gc left files no step lists: {sorted(left - listed)}"


def test_kill_9_during_incremental_saves_and_prunes_never_breaks_a_kept_step_local(writers, local_store):
    commits = _kill_rounds(writers, local_store, rounds=20, seed="incremental-kill-local")
    assert commits >= 10, "the kills came too early to test anything"
    _gc_frees_the_rest(local_store)


def test_kill_9_during_incremental_saves_and_prunes_never_breaks_a_kept_step_s3(writers, s3_store):
    commits = _kill_rounds(writers, s3_store, rounds=10, seed="incremental-kill-s3", megabytes=0.5, longest=2.5)
    assert commits >= 5, "the kills came too early to test anything"
    _gc_frees_the_rest(s3_store)


def test_ls_and_info_show_what_each_step_wrote_and_its_whole_size(tmp_path, capsys):
    from ckptstore.cli import main as cli

    d = tmp_path / "run"
    base = torch.randn(2 * MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        mgr.save(1, frozen_state(1, base))
        mgr.save(2, frozen_state(2, base))
    capsys.readouterr()
    assert cli(["ls", str(d)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "2.5 MiB (wrote 2.5 MiB)" in rows["step-1"], out
    assert "2.5 MiB (wrote 512.0 KiB)" in rows["step-2"], out
    assert cli(["info", str(d / "step-2")]) == 0
    out = capsys.readouterr().out
    assert "this step wrote 512.0 KiB (524288 bytes)" in out and "format:     3.0" in out, out


def test_ckptstore_prune_of_an_incremental_run_frees_the_bytes_only_removed_steps_listed(tmp_path):
    from ckptstore.cli import main as cli

    d = tmp_path / "run"
    base = torch.randn(MiB // 4)
    with ckptstore.CheckpointManager(str(d), incremental=True) as mgr:
        for s in range(1, 6):
            mgr.save(s, frozen_state(s, base))
    before = len(list((d / ".shared").iterdir()))
    assert cli(["prune", str(d), "--keep-last", "1"]) == 0
    after = sorted(p.name for p in (d / ".shared").iterdir())
    assert len(after) == 2 and before == 5, (before, after)   # step 1's file (the base) and step 5's
    assert equal(ckptstore.load(str(d / "step-5")), frozen_state(5, base))


def test_a_few_unchanged_bytes_do_not_keep_an_old_steps_large_file_alive(tmp_path):
    """An optimizer's zero moments (a parameter that gets no gradient) stay equal while
    everything else changes: reusing them from the first step's file would keep that whole
    file for as long as the run lasts. They are written again instead, and the file goes."""
    d = tmp_path / "run"
    zeros = torch.zeros(20_000)                                  # 80 KB, never changes
    g = torch.Generator().manual_seed(3)
    with ckptstore.CheckpointManager(str(d), incremental=True, keep_last=2) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": torch.randn(1 << 20, generator=g), "m": zeros})
        shared = d / ".shared"
        held = sum(p.stat().st_size for p in shared.iterdir() if p.suffix == ".bin")
        assert held < 2 * (4 << 20) + (1 << 20), held           # the two kept steps, no more
        assert torch.equal(mgr.restore(step=5)["m"], zeros)
