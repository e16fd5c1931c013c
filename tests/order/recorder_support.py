"""Tiny model, datamodule and a command-line training run shared by the recorder tests (no tests in here).

``python tests/order/recorder_support.py --dirpath D --ckpt-dir C [--resume] [--kill-at STEP:HOOK] [--devices 2]
[--metrics] [--dropout P] [--then-retrain] [--then-record D2]`` trains TinyNet (MetricNet with ``--metrics``; both
with dropout P) on TinyDataModule with a TrainOrderRecorder and a per-2-step ModelCheckpoint (last.ckpt);
``--then-retrain`` then retrains the recorded order and re-runs it for the sensitivity data in the same process
(global rank 0), printing both final validation losses; ``--then-record D2`` then records the same run again into D2
with a one-device Trainer in that process (global rank 0) and prints ``rank_and_world()`` after it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lpl.data.base import IndexedDataModule  # noqa: E402
from lpl.order.recorder import TrainOrderRecorder  # noqa: E402


class TinyDataset(Dataset):
    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 6, generator=generator)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class TinyDataModule(IndexedDataModule):
    def __init__(self, batch_size: int = 8, seed: int = 0, batches=None, order=None, eval_batch_size: int = 10) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()

    def loader_kwargs(self):
        # a worker prefetches batches: the sampler runs ahead of the steps trained (what resume must not trust)
        workers = int(os.environ.get("TINY_WORKERS", "0"))
        return {"num_workers": workers, "persistent_workers": workers > 0}

    def build_datasets(self):
        return TinyDataset(48, 1), TinyDataset(20, 2)


class TinyNet(L.LightningModule):
    def __init__(self, dropout: float = 0.0, lr: float = 0.05, optimizer: str = "adamw",
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))

    def loss(self, batch):
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.hparams.optimizer]
        opt = cls(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class MetricNet(TinyNet):
    """TinyNet logging a torchmetrics accuracy per epoch: Lightning computes it at the epoch's end, which gathers its
    state over the initialised process group (``sync_on_compute``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["x"])
        self.accuracy(logits.detach(), batch["y"])
        self.log("train_acc", self.accuracy, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, batch["y"])


def trainer_kwargs(**overrides):
    kwargs = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, deterministic=True,
        enable_checkpointing=False,
    )
    kwargs.update(overrides)
    return kwargs


class KillAt(L.Callback):
    """SIGKILLs this process at a given step in a given hook (a crash at a chosen instant)."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _maybe_kill(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer, pl_module):
        self._maybe_kill(trainer, "epoch_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_kill(trainer, "batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe_kill(trainer, "before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step already counts this batch's step here
        self._maybe_kill(trainer, "batch_end")


def main(argv: list[str] | None = None) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath", required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--probe-every", type=int, default=2)
    parser.add_argument("--kill-at", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--then-retrain", action="store_true")
    parser.add_argument("--then-record", default="")
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = MetricNet(dropout=args.dropout) if args.metrics else TinyNet(dropout=args.dropout)
    callbacks = [TrainOrderRecorder(args.dirpath, proj_dim=16, probe_every_n_steps=args.probe_every, resume=args.resume,
                                    store_dtype="float32")]
    if args.kill_at:
        step, hook = args.kill_at.split(":")
        callbacks.append(KillAt(int(step), hook))
    callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=2, save_last=True, save_top_k=0))
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(**trainer_kwargs(max_steps=args.max_steps, callbacks=callbacks, devices=args.devices,
                                         strategy=strategy, enable_checkpointing=True, deterministic=args.devices == 1,
                                         precision=args.precision))
    last = Path(args.ckpt_dir) / "last.ckpt"
    trainer.fit(model, datamodule=TinyDataModule(), ckpt_path=str(last) if args.resume and last.exists() else None)
    if args.then_retrain and trainer.global_rank == 0:
        from lpl.order import Recording, record_sensitivities, retrain

        retrained = retrain(args.dirpath, Recording.open(args.dirpath).order, accelerator="cpu").final_loss
        record_sensitivities(args.dirpath, curvature_rank=0, hessian_rank=0, accelerator="cpu", check_orders=0,
                             verbose=False)
        rerun = Recording.open(args.dirpath).manifest["sensitivity"]["rerun_val_loss"]
        print(f"retrained {retrained!r} re-run {rerun!r}")
    if args.then_record and trainer.global_rank == 0:
        L.seed_everything(0, verbose=False)
        recorder = TrainOrderRecorder(args.then_record, proj_dim=16, probe_every_n_steps=args.probe_every,
                                      store_dtype="float32")
        alone = L.Trainer(**trainer_kwargs(max_steps=args.max_steps, callbacks=[recorder]))
        alone.fit(MetricNet() if args.metrics else TinyNet(), datamodule=TinyDataModule())
        # a one-device checkpoint saves alone (the recorder's state must not gather over the leftover group)
        alone.save_checkpoint(Path(args.then_record) / "after.ckpt")
        from lpl.utils.trainer import rank_and_world

        print(f"after the one-device fit: {rank_and_world()}")  # the DDP group's view again


if __name__ == "__main__":
    main()
