"""The command line as a process among others: a reader that stops early, and a fast start.

`ckptstore info X --tensors | head -1` stops quietly when `head` goes away (no
BrokenPipeError traceback, no "Exception ignored" at exit), and `--help` or a
usage error answers without importing torch.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ckptstore


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory):
    """A checkpoint whose tensor listing is far larger than a pipe's buffer."""
    uri = str(tmp_path_factory.mktemp("pipe") / "c")
    ckptstore.save({"model": {f"encoder.layer.{i}.attention.self.query.weight": torch.zeros(1)
                              for i in range(4000)}}, uri)
    return uri


def quiet(stderr: str) -> bool:
    return "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


def test_a_listing_piped_into_head_stops_quietly(many_tensors):
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -m ckptstore info "{many_tensors}" --tensors | head -1'],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("model/encoder.layer.0."), done.stdout
    assert len(done.stdout.splitlines()) == 1
    assert quiet(done.stderr), done.stderr


@pytest.mark.parametrize("args", [["--tensors"], ["--tensors", "--json"], []])
def test_a_reader_that_closes_early_gets_no_traceback_and_the_exit_status_of_sigpipe(many_tensors, args):
    proc = subprocess.Popen([sys.executable, "-m", "ckptstore", "info", many_tensors, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()          # before the first write: even a short output meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert quiet(err), err
    assert proc.returncode == 141, (proc.returncode, err)


def test_help_lists_the_commands_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "ckptstore", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(c in done.stdout for c in ("ls", "info", "export", "verify", "cp", "prune", "gc", "bench"))


def torch_imported_by(argv: list[str]) -> bool:
    code = ("import sys\nfrom ckptstore.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], [], ["frobnicate"], ["gc", "d", "--grace", "x"],
                                  ["--version"]])
def test_parsing_the_command_line_does_not_import_torch(argv):
    assert not torch_imported_by(argv)


def test_import_ckptstore_defers_torch_until_a_name_needs_it():
    code = ("import sys, ckptstore\nfrom ckptstore import CheckpointError, UnsafeCheckpointError\n"
            "before = 'torch' in sys.modules\n"
            "from ckptstore import save, CheckpointManager, Checkpoint\n"
            "assert ckptstore.load and ckptstore.TensorInfo and ckptstore.capture_rng_state\n"
            "assert set(ckptstore.__all__) <= set(dir(ckptstore))\n"
            "assert all(getattr(ckptstore, n) is not None for n in ckptstore.__all__)\n"
            "print(before, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        ckptstore.no_such_name  # noqa: B018
