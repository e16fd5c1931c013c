"""A tiny Lightning task (MLP on 8x8 digits, Adam) recorded with the real TrainOrderRecorder: shared fixture code."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset

from lpl.data.base import IndexedDataModule

NUM_BATCHES = 10


class DigitsSet(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


class TinyDigits(IndexedDataModule):
    def __init__(self, batch_size: int = 32, seed: int = 0, batches=None, order=None, eval_batch_size: int = 256,
                 num_train: int = 320) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()
        self.num_train = num_train

    def build_datasets(self):
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        train, val = perm[: self.num_train], perm[-300:]
        return DigitsSet(x[train], y[train]), DigitsSet(x[val], y[val])


class TinyClassifier(L.LightningModule):
    """64-hidden-10 tanh MLP; ``norm`` adds BatchNorm and ``dropout`` Dropout (layers whose training mode matters)."""

    def __init__(self, hidden: int = 16, lr: float = 0.003, weight_decay: float = 0.0, dropout: float = 0.0,
                 norm: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden) if norm else nn.Identity(), nn.Tanh(),
                                 nn.Dropout(dropout), nn.Linear(hidden, 10))

    def loss(self, batch):
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def record(path: Path, lr: float = 0.003, proj_dim: int = 512, curvature_rank: int = 2, probe_every: int = 1,
           model: L.LightningModule | None = None, precision: str = "32-true", val_curvature_rank: int = 0,
           datamodule: L.LightningDataModule | None = None, trainer_kwargs: dict | None = None,
           **model_kwargs) -> Path:
    from lpl.order import TrainOrderRecorder

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    recorder = TrainOrderRecorder(path, proj_dim=proj_dim, probe_every_n_steps=probe_every,
                                  curvature_rank=curvature_rank, val_curvature_rank=val_curvature_rank,
                                  store_dtype="float32")
    settings = dict(max_steps=NUM_BATCHES, max_epochs=1, accelerator="cpu", precision=precision, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[recorder])
    trainer = L.Trainer(**{**settings, **(trainer_kwargs or {})})
    trainer.fit(model or TinyClassifier(lr=lr, **model_kwargs), datamodule=datamodule or TinyDigits())
    return path


class BiasesWithoutDecay(TinyClassifier):
    """The common optimiser setup: weight decay on weights only (two param groups); Adam's coupled decay or AdamW's."""

    def __init__(self, decoupled: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def configure_optimizers(self):
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        weights = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        groups = [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
        cls = torch.optim.AdamW if self.hparams.decoupled else torch.optim.Adam
        return cls(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class PenalisedClassifier(TinyClassifier):
    """Trains on its loss plus a weight penalty that ``loss(batch)`` leaves out: gradients probed from ``loss`` are
    not the ones training fed Adam."""

    def training_step(self, batch, batch_idx):
        return self.loss(batch) + 0.05 * sum(p.pow(2).sum() for p in self.parameters())
