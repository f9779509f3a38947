"""A 2-process Lightning DDP fit on CPU (gloo) that saves through StoreCheckpointIO.

    python lightning_ddp_train.py CKPT_DIR RESULTS_DIR MAX_EPOCHS [RESUME_PATH]

Started as one process by tests/test_ddp_adapters.py; with
``strategy="ddp"`` Lightning starts rank 1 itself by running this script
again. ModelCheckpoint keeps every epoch's checkpoint and ``last.ckpt`` in
CKPT_DIR; with RESUME_PATH the fit resumes from it (``ckpt_path=``).

Each rank appends JSON lines to ``RESULTS_DIR/rank-<rank>.jsonl`` (a file of
its own: the ranks share one stdout, where their lines could interleave):
``"start"`` right after the restore (global step, epoch, the weights as
lists), ``"save_call"`` for each ``save_checkpoint`` that reached the plugin
on that rank (the path and the checkpoint's global step), and ``"done"`` at
the end (global step, epoch, world size, ModelCheckpoint's last path).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptstore.integrations.lightning import StoreCheckpointIO


class TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    return DataLoader(data, batch_size=4, shuffle=False)   # 4 batches a rank an epoch under DDP


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def report(kind: str, **fields) -> None:
    with open(Path(sys.argv[2], f"rank-{rank()}.jsonl"), "a") as f:
        f.write(json.dumps({"kind": kind, "rank": rank(), **fields}) + "\n")


class RecordingIO(StoreCheckpointIO):
    """StoreCheckpointIO that also reports every save Lightning hands it, on the rank that got it."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        report("save_call", path=str(path), global_step=checkpoint["global_step"])


class Report(Callback):
    def on_train_start(self, trainer, module):
        weights = {k: v.detach().cpu().tolist() for k, v in module.state_dict().items()}
        report("start", global_step=trainer.global_step, epoch=trainer.current_epoch, weights=weights)


def main() -> None:
    ckpt_dir, max_epochs = sys.argv[1], int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[checkpoint, Report()], plugins=[RecordingIO()])
    trainer.fit(TinyModule(), loader(), ckpt_path=resume)
    report("done", global_step=trainer.global_step, epoch=trainer.current_epoch, world_size=trainer.world_size,
           last=checkpoint.last_model_path)


if __name__ == "__main__":
    main()
