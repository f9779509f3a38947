"""Smoke test of ckptstore as a user installs it: the wheel, in a venv of its own.

`make wheel-check` builds the sdist and the wheel, installs the wheel (not
editable) into a new venv that holds only torch and the wheel's own
dependencies, and runs this script with that venv's Python, isolated (``-I``)
and from outside the repository:

    VENV/bin/python -I tests/smoke_wheel.py REPO

It checks that the installed package is the one imported (not the sources in
REPO), that the wheel carries its version, license and ``py.typed``, and that
the basics work from there: a save/load round trip (compressed too), a CheckpointManager save
and restore, and the ``ckptstore`` console script. Not a pytest module: it
must run without the test dependencies.
"""
from __future__ import annotations

import ast
import collections
import importlib.metadata as metadata
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

import ckptstore


def check(ok: object, what: str) -> None:
    if not ok:
        sys.exit(f"smoke_wheel: FAILED: {what}")


def source_version(repo: Path) -> str:
    tree = ast.parse((repo / "ckptstore" / "_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    sys.exit("smoke_wheel: no __version__ in ckptstore/_version.py")


def installed_wheel(repo: Path) -> None:
    where = Path(ckptstore.__file__).resolve()
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    check(where.is_relative_to(purelib), f"ckptstore imported from {where}, not from this venv's {purelib}")
    check(not where.is_relative_to(repo), f"ckptstore imported from the repository: {where}")
    check(Path(sys.prefix).resolve() != Path(sys.base_prefix).resolve(), "not running in a venv")

    version = source_version(repo)
    check(ckptstore.__version__ == version, f"ckptstore.__version__ {ckptstore.__version__} != {version}")
    dist = metadata.distribution("ckptstore")
    check(dist.version == version, f"installed metadata says {dist.version}, the sources {version}")
    check(dist.metadata["License-Expression"] == "Apache-2.0",
          f"License-Expression is {dist.metadata['License-Expression']!r}")
    license_files = [f for f in dist.files or [] if f.name == "LICENSE"]
    check(license_files, "the wheel has no LICENSE")
    text = license_files[0].read_text()
    check("Apache License" in text and "Version 2.0, January 2004" in text
          and "Copyright 2026 the ckptstore authors" in text, "LICENSE is not the Apache 2.0 text of ckptstore")
    check((where.parent / "py.typed").is_file(), "the wheel has no ckptstore/py.typed")
    tops = {str(f).split("/")[0] for f in dist.files or []}
    stray = {t for t in tops if t not in ("ckptstore", "..") and not t.endswith(".dist-info")}   # "..": bin/
    check(not stray, f"the wheel installs more than the package: {sorted(stray)}")
    print(f"smoke_wheel: ckptstore {version} from {where.parent}, LICENSE and py.typed present")


def round_trip(tmp: Path) -> None:
    weight = torch.nn.Parameter(torch.randn(4, 3))
    state = {
        "model": collections.OrderedDict(weight=weight, tied=weight, bias=torch.arange(3, dtype=torch.float16)),
        "view": weight.detach()[1:3],
        "step": 7,
        "misc": [None, "text", b"\x00\x01", (1.5, float("inf")), torch.Size([2, 3]), torch.bfloat16],
    }
    uri = str(tmp / "one")
    info = ckptstore.save(state, uri)
    check(info.strategy == "rename" and info.nbytes > 0, f"save returned {info}")
    check(ckptstore.exists(uri), "exists() is False after save")
    check(ckptstore.verify(uri, deep=True).ok, "verify(deep=True) failed")
    back = ckptstore.load(uri)
    check(type(back["model"]) is collections.OrderedDict, "OrderedDict not kept")
    check(isinstance(back["model"]["weight"], torch.nn.Parameter), "Parameter not kept")
    check(torch.equal(back["model"]["weight"], weight.detach()), "weight differs")
    shared = back["model"]["weight"].untyped_storage().data_ptr()
    check(back["model"]["tied"].untyped_storage().data_ptr() == shared, "tied weights no longer share storage")
    check(back["view"].untyped_storage().data_ptr() == shared, "a view no longer shares its base's storage")
    check(torch.equal(back["model"]["bias"], state["model"]["bias"]), "bias differs")
    check(back["step"] == 7 and back["misc"] == state["misc"], f"plain values differ: {back['misc']!r}")
    # compression: its codec (zstandard) comes with the wheel's own dependencies
    big = torch.randn(1 << 18) * 0.02
    info = ckptstore.save({"w": big}, str(tmp / "packed"), compression="zstd")
    check(info.nbytes < info.logical_nbytes == big.numel() * 4, f"compressed save returned {info}")
    check(torch.equal(ckptstore.load(str(tmp / "packed"))["w"], big), "a compressed tensor differs")
    print("smoke_wheel: save/load round trip ok, compressed too")


def manager(tmp: Path) -> Path:
    run = tmp / "run"
    with ckptstore.CheckpointManager(str(run), keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"step": step, "w": torch.full((2, 2), float(step))}, metrics={"loss": 1.0 / step})
        check(mgr.steps() == [2, 3], f"steps() is {mgr.steps()} with keep_last=2")
        latest = mgr.restore()
        check(latest["step"] == 3 and torch.equal(latest["w"], torch.full((2, 2), 3.0)), "restore() is not step 3")
        check(mgr.restore(step=2)["step"] == 2, "restore(step=2) is not step 2")
    print("smoke_wheel: CheckpointManager save/restore ok")
    return run


def console_script(run: Path, version: str) -> None:
    exe = Path(sys.executable).parent / "ckptstore"
    check(exe.is_file(), f"no console script at {exe}")
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    check(done.returncode == 0 and done.stdout.strip() == f"ckptstore {version}",
          f"ckptstore --version: rc {done.returncode}, {done.stdout!r} {done.stderr!r}")
    done = subprocess.run([str(exe), "ls", str(run)], capture_output=True, text=True, timeout=120)
    steps = sorted(line.split()[1] for line in done.stdout.splitlines()[1:] if len(line.split()) > 1)
    check(done.returncode == 0 and steps == ["2", "3"],
          f"ckptstore ls: rc {done.returncode}, {done.stdout!r} {done.stderr!r}")
    print(f"smoke_wheel: console script ok ({done.stdout.count(chr(10)) - 1} steps listed)")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    repo = Path(sys.argv[1]).resolve()
    installed_wheel(repo)
    with tempfile.TemporaryDirectory(prefix="ckptstore-smoke-") as d:
        tmp = Path(d)
        round_trip(tmp)
        run = manager(tmp)
        console_script(run, source_version(repo))
    print("smoke_wheel: all ok")


if __name__ == "__main__":
    main()
