"""The public API as a user's code meets it: checked by `make typecheck` (mypy), never run.

Every name API.md lists is used here as a user would, with every keyword it
documents, and the types it promises are pinned: ``assert_type`` where the
annotation must be exactly that, an annotated assignment where the package's
type need only be usable as it. A change of a public name, keyword or result
type that would break a user's type-checked code fails `make typecheck`.

Not a test module (pytest collects ``test_*.py`` only) and nothing here runs:
the functions are only type-checked.
"""
from __future__ import annotations

import pathlib
import signal
from collections import OrderedDict
from typing import Any

import torch
from typing_extensions import assert_type

import ckptstore
from ckptstore import (
    Checkpoint,
    CheckpointError,
    CheckpointExistsError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatTooNewError,
    InsufficientSpaceError,
    StorageError,
    TensorInfo,
    UnsafeCheckpointError,
    UnsupportedObjectError,
    VerifyReport,
    capture_rng_state,
    restore_rng_state,
)


def one_shot_calls(model: torch.nn.Module, uri: str, path: pathlib.Path) -> None:
    state: dict[str, Any] = {"model": model.state_dict(), "step": 3, "order": OrderedDict(a=torch.ones(2))}
    info = ckptstore.save(state, uri, storage_options={"endpoint_url": "http://127.0.0.1:9000"}, overwrite=True,
                          verify=True, allow_pickle=False, progress=False, compression="zstd")
    assert_type(info, CheckpointInfo)
    assert_type(info.uri, str)
    assert_type(info.nbytes, int)
    assert_type(info.logical_nbytes, int)
    ckptstore.save(state, uri, compression="auto")
    ckptstore.save(state, uri, compression=None)
    assert_type(info.seconds, float)
    assert_type(info.strategy, str)
    ckptstore.save(state, path)                      # a pathlib.Path is a URI too

    obj: Any = ckptstore.load(uri, map_location="cpu", storage_options=None, verify=True, allow_pickle=False,
                              select=[("model", "encoder.layer.0.weight"), "step", ("optimizer", "state", 3)],
                              into={"model": model.state_dict()})
    ckptstore.load(path, map_location=torch.device("cpu"))
    ckptstore.load(uri, map_location={"cuda:0": "cpu"}, select="model")
    ckptstore.load(uri, map_location=lambda storage, location: storage)
    model.load_state_dict(ckptstore.load(uri, select="model")["model"])
    del obj

    report = ckptstore.verify(uri, storage_options=None, deep=True)
    assert_type(report, VerifyReport)
    ok: bool = report.ok
    problems: list[str] = report.problems
    nbytes: int = report.nbytes
    if report:                                       # truthy when ok
        del ok, problems, nbytes

    assert_type(ckptstore.exists(uri, storage_options=None), bool)

    files = ckptstore.export(uri, "out/model.safetensors", select="model", format="safetensors",
                             storage_options=None, dst_options={"anon": True}, max_shard_size="5GB")
    assert_type(files, list[str])
    ckptstore.export(uri, "out/model.pt", select=[("model",), ("step",)], format="torch", max_shard_size=5 << 30)

    assert_type(ckptstore.__version__, str)


def lazy_view(uri: str, into: dict[str, torch.Tensor]) -> None:
    # open() carries no return annotation yet; a user's annotation says what API.md promises.
    view: Checkpoint = ckptstore.open(uri, storage_options=None, verify=True, allow_pickle=False)
    with view as v:
        assert_type(v, Checkpoint)
        assert_type(v.info, CheckpointInfo)
        keys: list[Any] = v.keys()
        present: bool = "model" in v
        count: int = len(v)
        for key in v:
            sub: Any = v[key]
            del sub
        for tensor_path, t in v.tensors():
            assert_type(t, TensorInfo)
            assert_type(t.dtype, torch.dtype)
            assert_type(t.shape, torch.Size)
            assert_type(t.nbytes, int)
            where: tuple[Any, ...] = tensor_path
            del where
        part: Any = v.load(select="model", into={"model": into}, map_location="cpu")
        del keys, present, count, part
    view.close()


def training_run(model: torch.nn.Module, opt: torch.optim.Optimizer, directory: str) -> None:
    mgr = CheckpointManager(
        directory, keep_last=3, keep_best=1, best_metric="val_loss", best_mode="min", keep_every=1000,
        max_age=7 * 24 * 3600.0, async_save=True, storage_options={"token": "anon"}, incremental=True,
        save_interval_steps=500, save_interval_seconds=1800.0, preemption_signals=[signal.SIGTERM],
        grace_seconds=30.0, allow_pickle=False, compression="auto", thin_after=3, thin_select="model",
        collective_timeout=600.0)
    CheckpointManager(directory, thin_after=2, thin_select=["model", "ema/weights"], compression=None)
    with mgr:
        assert_type(mgr, CheckpointManager)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state()}
        restored = mgr.restore(step=None, map_location="cpu", select=["model", "optimizer"],
                               into={"model": model.state_dict()})
        if restored is not None:
            restore_rng_state(restored.get("rng", {}))
        latest = mgr.latest_step()
        assert_type(latest, int | None)
        for step in range((latest or 0) + 1, 10_000):
            if mgr.should_save(step) or mgr.preempted:
                handle = mgr.save(step, state, metrics={"val_loss": 0.25}, force=False)
                del handle
            if mgr.preempted:
                break
        mgr.wait()
        assert_type(mgr.steps(), list[int])
        assert_type(mgr.prune(), list[int])
        assert_type(mgr.should_save(1), bool)
        assert_type(mgr.preempted, bool)
    mgr.close()


def rng_state() -> None:
    captured = capture_rng_state()
    saved: dict[str, Any] = captured
    assert_type(restore_rng_state(saved), None)


# Each error is also the stdlib error API.md's table names, so code written for
# torch.save / torch.load keeps catching it.
def not_found(e: CheckpointNotFoundError) -> FileNotFoundError:
    return e


def exists_already(e: CheckpointExistsError) -> FileExistsError:
    return e


def unsupported(e: UnsupportedObjectError) -> TypeError:
    return e


def no_space(e: InsufficientSpaceError) -> OSError:
    return e


def storage(e: StorageError) -> OSError:
    return e


def errors_say_what_happened(uri: str) -> None:
    try:
        ckptstore.load(uri)
    except (CorruptCheckpointError, UnsafeCheckpointError, FormatTooNewError) as e:
        base: CheckpointError = e
        where: str | None = e.uri
        del base, where
    except StorageError as e:
        code: int | None = e.errno
        del code
    except CheckpointError as e:
        message: str = str(e)
        del message
