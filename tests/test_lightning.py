"""StoreCheckpointIO: real Lightning Trainers saving, pruning and resuming through ckptstore.

Every Trainer here is a real one on CPU with a real ModelCheckpoint; S3 is
the moto server of tests/conftest.py and local disk is a pytest tmp_path.
Nothing is mocked: what is asserted is what is in the bucket or on disk,
and what a second Trainer resumed into its model, optimizer and scheduler.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import ckptstore
from ckptstore import CheckpointNotFoundError, UnsafeCheckpointError, UnsupportedObjectError
from ckptstore.api import info as describe
from ckptstore.integrations.lightning import StoreCheckpointIO

# Lightning's advice for real runs, not about checkpoints.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create"),
]

BATCHES_PER_EPOCH = 8


class TinyModule(L.LightningModule):
    """A linear model with hyperparameters, SGD with momentum and a per-step LR
    schedule: every kind of state a Lightning checkpoint carries."""

    def __init__(self, lr: float = 0.05, hidden: int = 8, scores: dict | None = None, data_dir=None):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.hparams.scores:
            # A metric fixed per step, so which checkpoints top-k keeps is known in advance.
            self.log("score", float(self.hparams.scores.get(self.global_step + 1, 0.0)))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * BATCHES_PER_EPOCH, 4, generator=g),
                         torch.randn(4 * BATCHES_PER_EPOCH, 1, generator=g))
    return DataLoader(data, batch_size=4, shuffle=False)


def trainer(max_steps: int, callbacks: list, plugin: StoreCheckpointIO) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=callbacks, plugins=[plugin])


def cloned(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Record(Callback):
    """What the Trainer held when each checkpoint was written, and right after a resume."""

    def __init__(self, capture_at: int | None = None):
        self.saved: dict[int, dict] = {}      # global step -> model weights put in the checkpoint
        self.at_start: dict | None = None     # after restore, before the first step
        self.capture_at = capture_at
        self.captured: dict | None = None
        self.at_validation: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved[trainer.global_step] = cloned(checkpoint["state_dict"])

    def on_train_start(self, trainer, pl_module):
        self.at_start = {
            "global_step": trainer.global_step,
            "weights": cloned(pl_module.state_dict()),
            "momentum": [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()],
            "scheduler_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }

    def on_validation_start(self, trainer, pl_module):
        self.at_validation = cloned(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.capture_at:
            self.captured = cloned(pl_module.state_dict())


def s3_dirs(store) -> set[str]:
    """The checkpoint directories under the test's ckpts/ prefix, from the bucket itself."""
    return {p.split("/ckpts/", 1)[1].split("/", 1)[0] for p in store.files() if "/ckpts/" in p}


@pytest.fixture
def lightning_s3(s3_store, monkeypatch):
    """s3_store, with fsspec told where the moto server is.

    ModelCheckpoint makes its own filesystem with ``get_filesystem(dirpath)``,
    without options, for its existence checks and listings of ``dirpath``.
    fsspec supplies ``fsspec.config.conf["s3"]`` as default options to every
    S3 filesystem it creates, so those calls reach moto too; unlike AWS_*
    environment variables, the options are part of fsspec's instance-cache
    key, so no cached filesystem aimed elsewhere is reused.
    """
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_store.backend.options())
    return s3_store


def test_trainer_checkpoints_to_s3_and_a_second_trainer_resumes(lightning_s3):
    s3 = lightning_s3
    options = s3.backend.options()
    dirpath = f"{s3.uri_root}/ckpts"      # no query: Lightning appends file names to dirpath
    record = Record()
    first = trainer(12, [ModelCheckpoint(dirpath=dirpath, every_n_train_steps=4, save_top_k=-1, save_last=True),
                         record], StoreCheckpointIO(storage_options=options))
    first.fit(TinyModule(), loader())
    assert first.global_step == 12

    names = {4: "epoch=0-step=4.ckpt", 8: "epoch=0-step=8.ckpt", 12: "epoch=1-step=12.ckpt"}
    assert s3_dirs(s3) == set(names.values()) | {"last.ckpt"}
    for name in [*names.values(), "last.ckpt"]:
        report = ckptstore.verify(s3.uri(f"ckpts/{name}"), deep=True)
        assert report.ok, (name, report.problems)
        kinds = sorted(os.path.splitext(p)[1] for p in s3.files() if f"/ckpts/{name}/" in p)
        assert kinds == [".bin", ".commit"], (name, kinds)   # one ckptstore generation, nothing else
    for step, name in names.items():
        stored = ckptstore.load(s3.uri(f"ckpts/{name}"))
        assert stored["global_step"] == step
        assert stored["hyper_parameters"] == {"lr": 0.05, "hidden": 8, "scores": None, "data_dir": None}
        assert_same_tensors(stored["state_dict"], record.saved[step])
    assert ckptstore.load(s3.uri("ckpts/last.ckpt"))["global_step"] == 12

    # Resume from step 8 (the end of epoch 0) in a fresh Trainer and model.
    resumed = Record(capture_at=12)
    second = trainer(16, [ModelCheckpoint(dirpath=dirpath, every_n_train_steps=4, save_top_k=-1), resumed],
                     StoreCheckpointIO(storage_options=options))
    with pytest.warns(UserWarning, match="exists and is not empty"):   # ModelCheckpoint saw the directories
        second.fit(TinyModule(), loader(), ckpt_path=f"{dirpath}/{names[8]}")
    assert second.global_step == 16
    start = resumed.at_start
    assert start["global_step"] == 8
    assert_same_tensors(start["weights"], record.saved[8])
    saved8 = ckptstore.load(s3.uri(f"ckpts/{names[8]}"))
    saved_momentum = [s["momentum_buffer"] for s in saved8["optimizer_states"][0]["state"].values()]
    assert len(start["momentum"]) == len(saved_momentum) == 4
    for got, want in zip(start["momentum"], saved_momentum):
        assert torch.equal(got, want)
    assert start["scheduler_epoch"] == 8 == saved8["lr_schedulers"][0]["last_epoch"]
    assert start["lr"] == pytest.approx(0.05 * 0.5 ** 2)
    # Same data, same state: steps 9-12 again give exactly the weights of the first run.
    assert_same_tensors(resumed.captured, record.saved[12])
    # ModelCheckpoint found step 12's directory already there and versioned the new one.
    assert {"epoch=1-step=12-v1.ckpt", "epoch=1-step=16.ckpt"} <= s3_dirs(s3)
    assert ckptstore.verify(s3.uri("ckpts/epoch=1-step=16.ckpt"), deep=True).ok


def test_top_k_retention_removes_checkpoint_directories_from_s3(lightning_s3):
    s3 = lightning_s3
    scores = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 2.0}
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=f"{s3.uri_root}/ckpts", filename="{step}", monitor="score", mode="max",
                                 save_top_k=2, every_n_train_steps=2)
    run = trainer(10, [checkpoint, record], StoreCheckpointIO(storage_options=s3.backend.options()))
    run.fit(TinyModule(scores=scores), loader())

    # 2 and 4 fill the top 2; 6 pushes out 4; 8 pushes out 6; 10 ranks below both.
    assert sorted(record.saved) == [2, 4, 6, 8]
    assert s3_dirs(s3) == {"step=2.ckpt", "step=8.ckpt"}
    assert not [p for p in s3.files() if "/step=4.ckpt/" in p or "/step=6.ckpt/" in p]
    assert checkpoint.best_model_path.endswith("/step=2.ckpt")
    for name in ("step=2.ckpt", "step=8.ckpt"):
        assert ckptstore.verify(s3.uri(f"ckpts/{name}"), deep=True).ok
    with pytest.raises(CheckpointNotFoundError):
        ckptstore.load(s3.uri("ckpts/step=4.ckpt"))
    # Removing what is not there is no error.
    StoreCheckpointIO(storage_options=s3.backend.options()).remove_checkpoint(f"{s3.uri_root}/ckpts/step=4.ckpt")


def test_local_disk_top_1_with_last_link_resumes_from_last(local_store):
    ckpts = Path(local_store.root) / "ckpts"
    record = Record()

    def checkpointing():
        return ModelCheckpoint(dirpath=ckpts, every_n_train_steps=4, save_top_k=1, save_last="link")

    first = trainer(8, [checkpointing(), record], StoreCheckpointIO())
    first.fit(TinyModule(), loader())
    # top 1 without a monitor: each save removes the one before.
    assert sorted(record.saved) == [4, 8]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=8.ckpt", "last.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "epoch=0-step=8.ckpt").is_dir()
    assert ckptstore.verify(ckpts / "last.ckpt", deep=True).ok

    # An explicit path that is not there: Lightning does not check it, the plugin's load does.
    with pytest.raises(FileNotFoundError):
        trainer(12, [], StoreCheckpointIO()).fit(TinyModule(), loader(), ckpt_path=ckpts / "epoch=9-step=99.ckpt")

    # ckpt_path="last": Lightning lists dirpath, takes the newest last*.ckpt by mtime
    # (a directory has one locally) and loads it through the plugin.
    resumed = Record()
    second = trainer(12, [checkpointing(), resumed], StoreCheckpointIO())
    with pytest.warns(UserWarning, match="exists and is not empty"):
        second.fit(TinyModule(), loader(), ckpt_path="last")
    assert resumed.at_start["global_step"] == 8
    assert_same_tensors(resumed.at_start["weights"], record.saved[8])
    assert second.global_step == 12
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=1-step=12.ckpt", "last.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "epoch=1-step=12.ckpt"
    assert ckptstore.load(ckpts / "last.ckpt")["global_step"] == 12

    # validate/test/predict(ckpt_path=...) load through the plugin as well.
    checked = Record()
    trainer(12, [checked], StoreCheckpointIO()).validate(TinyModule(), loader(), ckpt_path=ckpts / "last.ckpt",
                                                         verbose=False)
    assert_same_tensors(checked.at_validation, ckptstore.load(ckpts / "last.ckpt")["state_dict"])


class SigtermAt(Callback):
    """Sends this process a real SIGTERM from another thread during training step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            t.start()
            t.join()
            time.sleep(0.01)   # the handler runs in the main thread at its next bytecode


def test_lightnings_sigterm_handling_saves_through_the_plugin_with_on_exception_checkpoint(local_store):
    """What docs/integrations.md says: Lightning records SIGTERM itself, stops after that batch with
    SIGTERMException, and OnExceptionCheckpoint then saves through StoreCheckpointIO; a manager's
    handler installed before fit is called too."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    ckpts = Path(local_store.root) / "ckpts"
    mgr = ckptstore.CheckpointManager(Path(local_store.root) / "mgr", preemption_signals=signal.SIGTERM)
    record = Record()
    first = trainer(20, [OnExceptionCheckpoint(ckpts), SigtermAt(6), record], StoreCheckpointIO())
    try:
        with pytest.raises(SIGTERMException):
            first.fit(TinyModule(), loader())
        assert mgr.preempted                                  # Lightning called the handler before it
    finally:
        mgr.close()
    assert first.global_step == 6
    saved = ckpts / "on_exception.ckpt"
    assert ckptstore.verify(saved, deep=True).ok
    state = ckptstore.load(saved)
    assert state["global_step"] == 6
    assert_same_tensors(state["state_dict"], {k: v for k, v in first.lightning_module.state_dict().items()})

    resumed = Record()
    second = trainer(20, [resumed, ModelCheckpoint(dirpath=ckpts / "later")], StoreCheckpointIO())
    second.fit(TinyModule(), loader(), ckpt_path=saved)
    assert resumed.at_start["global_step"] == 6 and second.global_step == 20


def test_resume_from_a_file_lightnings_default_plugin_wrote(local_store):
    ckpts = Path(local_store.root) / "ckpts"
    record = Record()
    default = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=ckpts, every_n_train_steps=8),
                                                               record])
    default.fit(TinyModule(), loader())
    legacy = ckpts / "epoch=0-step=8.ckpt"
    assert legacy.is_file()                       # torch.save, through TorchCheckpointIO

    resumed = Record()
    second = trainer(12, [ModelCheckpoint(dirpath=ckpts, every_n_train_steps=4), resumed], StoreCheckpointIO())
    with pytest.warns(UserWarning, match="exists and is not empty"):
        second.fit(TinyModule(), loader(), ckpt_path=legacy)
    assert resumed.at_start["global_step"] == 8 and second.global_step == 12
    assert_same_tensors(resumed.at_start["weights"], record.saved[8])
    assert ckptstore.verify(ckpts / "epoch=1-step=12.ckpt", deep=True).ok


def test_an_unsupported_hyperparameter_fails_the_save_naming_it(local_store):
    ckpts = Path(local_store.root) / "ckpts"
    run = trainer(4, [ModelCheckpoint(dirpath=ckpts, every_n_train_steps=4)], StoreCheckpointIO())
    with pytest.raises(UnsupportedObjectError) as err:
        run.fit(TinyModule(data_dir=Path("/data/set")), loader())
    msg = str(err.value)
    assert 'state["hyper_parameters"]["data_dir"]' in msg
    assert "PosixPath" in msg
    assert "epoch=0-step=4.ckpt" in msg
    assert "StoreCheckpointIO(allow_pickle=True)" in msg and "save_hyperparameters(ignore=" in msg
    assert not [p for p in ckpts.rglob("*") if p.is_file()]   # refused before a byte was written


def test_attribute_dicts_become_dicts_and_pickle_is_opt_in(local_store):
    nested = AttributeDict(lr=0.1, sizes=[AttributeDict(a=1)], t=torch.arange(3))
    checkpoint = {"hyper_parameters": nested, "state_dict": {"w": torch.ones(2)}}
    path = local_store.path("attr.ckpt")
    StoreCheckpointIO().save_checkpoint(checkpoint, path)
    assert type(checkpoint["hyper_parameters"]) is AttributeDict          # the caller's dict is untouched
    loaded = StoreCheckpointIO().load_checkpoint(path)
    hp = loaded["hyper_parameters"]
    assert type(hp) is dict and type(hp["sizes"][0]) is dict and hp["sizes"][0] == {"a": 1}
    assert hp["lr"] == 0.1 and torch.equal(hp["t"], torch.arange(3))

    pickled = local_store.path("pickled.ckpt")
    StoreCheckpointIO(allow_pickle=True).save_checkpoint({"data_dir": Path("/data/set")}, pickled)
    assert StoreCheckpointIO(allow_pickle=True).load_checkpoint(pickled) == {"data_dir": Path("/data/set")}
    with pytest.raises(UnsafeCheckpointError):
        StoreCheckpointIO().load_checkpoint(pickled)
    with pytest.raises(UnsafeCheckpointError):
        StoreCheckpointIO(allow_pickle=True).load_checkpoint(pickled, weights_only=True)


def test_remove_handles_missing_paths_links_and_torch_save_files(local_store):
    io = StoreCheckpointIO()
    io.remove_checkpoint(local_store.path("never-saved.ckpt"))

    target = local_store.path("epoch=0-step=1.ckpt")
    io.save_checkpoint({"global_step": 1}, target)
    link = Path(local_store.path("last.ckpt"))
    link.symlink_to("epoch=0-step=1.ckpt")
    io.remove_checkpoint(link)
    assert not link.exists() and not link.is_symlink()
    assert io.load_checkpoint(target) == {"global_step": 1}            # the target is intact
    io.remove_checkpoint(target)
    assert not Path(target).exists()

    # A checkpoint Lightning's own TorchCheckpointIO wrote: one torch.save file.
    legacy = Path(local_store.path("legacy.ckpt"))
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, legacy)
    assert io.load_checkpoint(legacy)["global_step"] == 3               # weights-only unpickler
    io.remove_checkpoint(legacy)
    assert not legacy.exists()


def test_per_call_storage_options_win_over_the_constructor(s3_store):
    good = s3_store.backend.options()
    # The constructor's endpoint answers nothing: only the per-call one can make this save work.
    io = StoreCheckpointIO(storage_options={**good, "endpoint_url": "http://127.0.0.1:9"})
    path = f"{s3_store.uri_root}/per-call.ckpt"
    io.save_checkpoint({"global_step": 7}, path, storage_options={"endpoint_url": good["endpoint_url"]})
    assert ckptstore.load(s3_store.uri("per-call.ckpt")) == {"global_step": 7}
    with pytest.raises(TypeError, match="storage_options must be a mapping"):
        io.save_checkpoint({}, path, storage_options="endpoint_url=x")


def test_fabric_save_and_load_go_through_the_plugin(local_store):
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[StoreCheckpointIO()])
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model, opt = fabric.setup(model, opt)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    path = Path(local_store.path("fabric.ckpt"))
    fabric.save(path, AttributeDict(model=model, optimizer=opt, iteration=1, hparams=AttributeDict(lr=0.01)))
    assert path.is_dir() and ckptstore.verify(path, deep=True).ok

    fresh = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    fresh, fresh_opt = fabric.setup(fresh, fresh_opt)
    rest = fabric.load(path, {"model": fresh, "optimizer": fresh_opt})
    assert rest == {"iteration": 1, "hparams": {"lr": 0.01}}
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def test_standalone_pytorch_lightning_trainer_accepts_the_plugin(local_store):
    import pytorch_lightning as PL

    class Module(PL.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ckpts = Path(local_store.root) / "pl"
    run = PL.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, plugins=[StoreCheckpointIO()],
                     callbacks=[PL.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2)])
    run.fit(Module(), loader())
    assert ckptstore.verify(ckpts / "epoch=0-step=2.ckpt", deep=True).ok


class FrozenBase(L.LightningModule):
    """A frozen 1 MiB embedding (a pretrained base) and a small trained head."""

    def __init__(self, scores: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(1)
        self.base = torch.nn.Embedding(4096, 64)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(4096, 64, generator=g))
        self.base.weight.requires_grad_(False)
        self.head = torch.nn.Linear(64, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("score", float(self.hparams.scores.get(self.global_step + 1, 0.0)))
        return torch.nn.functional.mse_loss(self.head(self.base(x)), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.head.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def token_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 4096, (4 * BATCHES_PER_EPOCH,), generator=g),
                         torch.randn(4 * BATCHES_PER_EPOCH, 1, generator=g))
    return DataLoader(data, batch_size=4, shuffle=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_incremental_checkpoints_store_the_frozen_base_once_and_pruning_frees_the_rest(where, request):
    store = request.getfixturevalue("lightning_s3" if where == "s3" else "local_store")
    options = store.backend.options() if where == "s3" else {}
    root = f"{store.uri_root}/ckpts"       # no query: Lightning appends file names to it

    def ckpts(name: str) -> str:
        return store.uri(f"ckpts/{name}")

    def listing(path: str) -> dict[str, int]:
        """{name: size} under ckpts/<path>, from the bucket or the disk itself."""
        return {e["name"].rstrip("/").rsplit("/", 1)[1]: int(e.get("size") or 0)
                for e in store.fs.ls(store.path(f"ckpts/{path}".rstrip("/")), detail=True)}

    def names() -> set[str]:
        return set(listing("")) - {".shared"}
    frozen_bytes = 4096 * 64 * 4
    scores = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 2.0}
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=root, filename="{step}", monitor="score", mode="max", save_top_k=2,
                                 every_n_train_steps=2, save_last=True)
    plugin = StoreCheckpointIO(storage_options=options, incremental=True)
    trainer(10, [checkpoint, record], plugin).fit(FrozenBase(scores=scores), token_loader())

    # Top 2 by score (as in the plain test above), and last.ckpt, rewritten at every save.
    assert names() == {"step=2.ckpt", "step=8.ckpt", "last.ckpt"}
    kept = {"step=2.ckpt": 2, "step=8.ckpt": 8, "last.ckpt": 10}
    infos = {}
    for name, step in kept.items():
        report = ckptstore.verify(ckpts(name), deep=True)
        assert report.ok, (name, report.problems)
        stored = ckptstore.load(ckpts(name))
        assert stored["global_step"] == step
        assert_same_tensors(stored["state_dict"], record.saved[step])
        infos[name] = describe(ckpts(name))     # what `ckptstore info` prints
        assert infos[name]["format"].startswith("3."), infos[name]["format"]
        assert infos[name]["logical"] > frozen_bytes
    # The first save wrote the base; every later one wrote only the head, its momentum and the rest.
    assert infos["step=2.ckpt"]["nbytes"] > frozen_bytes
    assert infos["step=8.ckpt"]["nbytes"] < 64 << 10
    assert infos["last.ckpt"]["nbytes"] < 64 << 10
    # Removed checkpoints (4 and 6, and every earlier last.ckpt) took their bytes with them:
    # the shared directory holds exactly the data files the kept records list.
    listed = {f["name"] for i in infos.values() for f in i["files"]}
    data = {n: size for n, size in listing(".shared").items() if n.endswith(".bin")}
    assert set(data) == listed
    assert frozen_bytes < sum(data.values()) < frozen_bytes + 3 * (64 << 10)
    assert not [n for n in listing(".shared") if n.endswith((".intent", ".condemned"))]

    # A fresh Trainer (a new plugin: it learns the run from the records) resumes from a kept
    # checkpoint, and its own checkpoint reuses the base the first Trainer wrote.
    resumed = Record()
    again = trainer(10, [ModelCheckpoint(dirpath=root, filename="again-{step}", every_n_train_steps=2,
                                         save_top_k=-1), resumed],
                    StoreCheckpointIO(storage_options=options, incremental=True))
    with pytest.warns(UserWarning, match="exists and is not empty"):
        again.fit(FrozenBase(scores=scores), token_loader(), ckpt_path=ckpts("step=8.ckpt"))
    assert describe(ckpts("again-step=10.ckpt"))["nbytes"] < 64 << 10
    assert_same_tensors(ckptstore.load(ckpts("again-step=10.ckpt"))["state_dict"], record.saved[10])
    assert resumed.at_start["global_step"] == 8
    assert_same_tensors(resumed.at_start["weights"], record.saved[8])
    saved8 = ckptstore.load(ckpts("step=8.ckpt"))
    saved_momentum = [s["momentum_buffer"] for s in saved8["optimizer_states"][0]["state"].values()]
    assert len(resumed.at_start["momentum"]) == len(saved_momentum) == 2      # the head's weight and bias
    for got, want in zip(resumed.at_start["momentum"], saved_momentum):
        assert torch.equal(got, want)
    assert resumed.at_start["scheduler_epoch"] == 8


def test_incremental_plugin_arguments_are_checked():
    with pytest.raises(TypeError, match="incremental"):
        StoreCheckpointIO(incremental="yes")
    with pytest.raises(ValueError, match="allow_pickle"):
        StoreCheckpointIO(incremental=True, allow_pickle=True)
    assert "incremental=True" in repr(StoreCheckpointIO(incremental=True))


# --- AsyncCheckpointIO: saves in a worker thread, removals from the training thread ---------------

class Gates:
    """Per-path events, shared by the training thread and AsyncCheckpointIO's worker."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], threading.Event] = {}

    def __call__(self, what: str, path) -> threading.Event:
        with self._lock:
            return self._events.setdefault((what, os.path.basename(os.fspath(path))), threading.Event())


def test_async_removal_of_a_checkpoint_whose_save_is_in_flight_waits_for_it(local_store, monkeypatch):
    """AsyncCheckpointIO saves in its worker thread while ModelCheckpoint (top 1, a save every step)
    removes the previous checkpoint from the training thread. Here every removal arrives while the save
    of that very path is inside the plugin, and that save is slowed down after it began: a removal that
    did not wait for it would find nothing, and the save would then commit a checkpoint ModelCheckpoint
    no longer knows (or the removal would delete the files the save is writing). The removal waits: what
    is left is exactly what ModelCheckpoint keeps, each one complete."""
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    import ckptstore.integrations.lightning as integration

    steps = 5
    final = f"epoch=0-step={steps}.ckpt"
    gate = Gates()
    real_save = integration.save

    def slow_save(state, path, **kwargs):
        # Runs inside StoreCheckpointIO.save_checkpoint, in AsyncCheckpointIO's worker thread.
        name = os.path.basename(os.fspath(path))
        gate("saving", name).set()
        if name.startswith("epoch=") and name != final:     # ModelCheckpoint removes it at the next step
            assert gate("removing", name).wait(timeout=30)
            time.sleep(0.2)                                   # the removal runs now, unless it waits
        return real_save(state, path, **kwargs)

    monkeypatch.setattr(integration, "save", slow_save)

    class RemovesWhileSaving(StoreCheckpointIO):
        removed: list[str] = []

        def remove_checkpoint(self, path):
            # Lightning's training thread: let the save of ``path`` begin before the removal goes on,
            # so the removal meets the save in flight (not still waiting in AsyncCheckpointIO's queue).
            assert gate("saving", path).wait(timeout=30)
            gate("removing", path).set()
            super().remove_checkpoint(path)
            assert not os.path.exists(path)                   # removed when remove_checkpoint returns
            self.removed.append(os.path.basename(path))

    ckpts = Path(local_store.root) / "ckpts"
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=1, save_top_k=1, save_last=True)
    run = trainer(steps, [checkpoint, record], AsyncCheckpointIO(RemovesWhileSaving()))
    run.fit(TinyModule(), loader())          # teardown waits for the worker, and re-raises its errors

    assert run.global_step == steps
    assert RemovesWhileSaving.removed == [f"epoch=0-step={s}.ckpt" for s in range(1, steps)]
    assert checkpoint.best_model_path == str(ckpts / final)
    assert checkpoint.last_model_path == str(ckpts / "last.ckpt")
    assert {p.name for p in ckpts.iterdir()} == {final, "last.ckpt"}
    for name in (final, "last.ckpt"):
        assert ckptstore.verify(ckpts / name, deep=True).ok, name
        stored = ckptstore.load(ckpts / name)
        assert stored["global_step"] == steps
        assert_same_tensors(stored["state_dict"], record.saved[steps])
        kinds = sorted(p.suffix for p in (ckpts / name).iterdir())
        assert kinds == [".bin", ".commit"], (name, kinds)     # one generation, no partial files


def test_save_and_removal_of_one_path_from_two_threads_never_overlap(local_store, monkeypatch):
    import ckptstore.integrations.lightning as integration

    io = StoreCheckpointIO()
    path = local_store.path("epoch=0-step=1.ckpt")
    io.save_checkpoint({"global_step": 0, "w": torch.zeros(4)}, path)

    # A removal meets a save of the same path in progress: it waits, then removes what the save committed.
    in_save, go_on = threading.Event(), threading.Event()
    real_save, real_remove_files = integration.save, integration.remove_files

    def held_save(*args, **kwargs):
        in_save.set()
        assert go_on.wait(timeout=30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(integration, "save", held_save)
    saver = threading.Thread(target=io.save_checkpoint, args=({"global_step": 1, "w": torch.ones(4)}, path))
    saver.start()
    assert in_save.wait(timeout=30)
    remover = threading.Thread(target=io.remove_checkpoint, args=(Path(path),))   # another spelling of it
    remover.start()
    remover.join(timeout=0.3)
    assert remover.is_alive()                                  # waiting for the save
    assert io.load_checkpoint(path)["global_step"] == 0        # nothing removed yet
    go_on.set()
    saver.join(timeout=30)
    remover.join(timeout=30)
    assert not saver.is_alive() and not remover.is_alive()
    assert not os.path.exists(path)
    monkeypatch.setattr(integration, "save", real_save)

    # A save of a path being removed waits for the removal, and is a new save: nothing of it is removed.
    io.save_checkpoint({"global_step": 2, "w": torch.ones(4)}, path)
    in_remove, go_on = threading.Event(), threading.Event()

    def held_remove_files(*args, **kwargs):
        in_remove.set()
        assert go_on.wait(timeout=30)
        return real_remove_files(*args, **kwargs)

    monkeypatch.setattr(integration, "remove_files", held_remove_files)
    remover = threading.Thread(target=io.remove_checkpoint, args=(path,))
    remover.start()
    assert in_remove.wait(timeout=30)
    saver = threading.Thread(target=io.save_checkpoint, args=({"global_step": 3, "w": torch.ones(4)}, path))
    saver.start()
    saver.join(timeout=0.3)
    assert saver.is_alive()                                    # waiting for the removal
    go_on.set()
    remover.join(timeout=30)
    saver.join(timeout=30)
    assert not saver.is_alive() and not remover.is_alive()
    assert ckptstore.verify(path, deep=True).ok
    assert io.load_checkpoint(path)["global_step"] == 3
    assert sorted(p.suffix for p in Path(path).iterdir()) == [".bin", ".commit"]
    assert not integration._PATH_LOCKS._locks                   # nothing kept per path afterwards


def test_lightnings_own_async_checkpoint_test_passes_with_the_plugin(local_store):
    """Lightning's test_async_checkpoint_plugin (tests/tests_pytorch/plugins/test_checkpoint_io_plugin.py,
    marked flaky there) with StoreCheckpointIO as the base plugin. The save of step 1 is often still
    running when ModelCheckpoint removes it at step 3; before removals waited, that broke the save
    (files gone under it) or left the removed checkpoint behind."""
    from unittest.mock import Mock

    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    tmp_path = Path(local_store.root) / "async"
    checkpoint_plugin = AsyncCheckpointIO(StoreCheckpointIO())
    checkpoint_plugin.save_checkpoint = Mock(wraps=checkpoint_plugin.save_checkpoint)
    checkpoint_plugin.remove_checkpoint = Mock(wraps=checkpoint_plugin.remove_checkpoint)

    class CustomBoringModel(BoringModel):
        def on_fit_start(self):
            base_ckpt_io = self.trainer.strategy.checkpoint_io.checkpoint_io
            base_ckpt_io.save_checkpoint = Mock(wraps=base_ckpt_io.save_checkpoint)
            base_ckpt_io.remove_checkpoint = Mock(wraps=base_ckpt_io.remove_checkpoint)

    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=2, monitor="step", mode="max")
    model = CustomBoringModel()
    run = L.Trainer(default_root_dir=tmp_path, plugins=[checkpoint_plugin], callbacks=ck, max_epochs=3,
                    limit_train_batches=1, limit_val_batches=0, enable_progress_bar=False,
                    enable_model_summary=False, logger=False, accelerator="cpu")
    run.validate(model)            # async saving must work when fit or validate is called more than once
    run.fit(model)

    assert checkpoint_plugin.save_checkpoint.call_count == 3
    assert checkpoint_plugin.remove_checkpoint.call_count == 1
    base_ckpt_io = run.strategy.checkpoint_io.checkpoint_io
    assert base_ckpt_io.save_checkpoint.call_count == 3
    assert base_ckpt_io.remove_checkpoint.call_count == 1
    # And what is stored: the two ModelCheckpoint keeps, complete.
    assert {p.name for p in tmp_path.iterdir()} == {"epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"}
    for name in ("epoch=1-step=2.ckpt", "epoch=2-step=3.ckpt"):
        assert ckptstore.verify(tmp_path / name, deep=True).ok, name


def test_the_plugin_still_pickles():
    import pickle

    io = StoreCheckpointIO(storage_options={"anon": True}, verify=False)
    copy = pickle.loads(pickle.dumps(io))      # strategies that spawn processes pickle the plugin
    assert (copy.storage_options, copy.verify, copy.allow_pickle, copy.incremental) == ({"anon": True}, False,
                                                                                          False, False)


@pytest.mark.parametrize("base", ["store", "torch"])
def test_removal_of_a_save_still_queued_finds_nothing_and_the_save_commits_later(base, local_store):
    """AsyncCheckpointIO gives the plugin no sight of its queue: removing a path whose save is still
    waiting there removes nothing, and the save, when it runs, writes a complete checkpoint. Lightning's
    own TorchCheckpointIO gives the same (Lightning-AI/pytorch-lightning#14035)."""
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    go_on = threading.Event()

    class Held(StoreCheckpointIO if base == "store" else TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if os.path.basename(path) == "first.ckpt":
                assert go_on.wait(timeout=30)               # keeps the worker busy: what follows queues
            super().save_checkpoint(checkpoint, path, storage_options)

    io = AsyncCheckpointIO(Held())
    first, queued = local_store.path("first.ckpt"), local_store.path("queued.ckpt")
    io.save_checkpoint({"global_step": 1, "w": torch.ones(2)}, first)
    io.save_checkpoint({"global_step": 2, "w": torch.ones(2)}, queued)
    io.remove_checkpoint(queued)                              # returns at once: nothing there yet
    assert not os.path.exists(queued)
    go_on.set()
    io.teardown()                                             # waits for the worker
    loaded = ckptstore.load(queued)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.ones(2))
    if base == "store":
        assert ckptstore.verify(queued, deep=True).ok
