"""The lpl batch samplers' epochs: a sampler attached to a fitting Trainer trains the Trainer's epoch (a loader rebuilt
every epoch continues the run), and an explicit order may give each epoch its own list of batches."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset

from lpl.data.base import IndexedDataModule, ResumableDataLoader
from lpl.data.samplers import OrderedBatchSampler, SeededBatchSampler
from lpl.utils.errors import LplError

NUM_TRAIN, BATCH = 96, 32  # 3 batches an epoch


class Points(Dataset):
    def __init__(self, count: int) -> None:
        self.x = torch.randn(count, 4, generator=torch.Generator().manual_seed(count))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "index": torch.tensor(i)}


class PointsData(IndexedDataModule):
    def __init__(self, seed: int = 0, batches=None, order=None) -> None:
        super().__init__(batch_size=BATCH, seed=seed, batches=batches, order=order, eval_batch_size=BATCH)

    def build_datasets(self):
        return Points(NUM_TRAIN), Points(BATCH)


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BatchesSeen(L.Callback):
    """(epoch, sample ids) of every training step."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch["index"].tolist()))


def _fit(datamodule, ckpt_path=None, callbacks=(), **settings) -> tuple[L.Trainer, list]:
    """Fit ``datamodule`` (3 epochs unless ``settings`` say otherwise); returns the Trainer and (epoch, sample ids)
    of every step."""
    seen = BatchesSeen()
    checkpoints = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    defaults = dict(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=checkpoints,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                    use_distributed_sampler=False)
    trainer = L.Trainer(**{**defaults, **settings}, callbacks=[seen, *callbacks])
    trainer.fit(Regressor(), datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, seen.seen


def _fitting(epoch: int) -> SimpleNamespace:
    """A Trainer as a sampler sees it while fitting ``epoch``."""
    return SimpleNamespace(state=SimpleNamespace(fn="fit", status="running"), current_epoch=epoch,
                           distributed_sampler_kwargs=None)


@pytest.mark.parametrize("reload", [0, 1])
def test_every_epoch_trains_its_own_shuffle_also_from_a_loader_rebuilt_every_epoch(reload):
    _, seen = _fit(PointsData(seed=5), reload_dataloaders_every_n_epochs=reload)
    expected = SeededBatchSampler(NUM_TRAIN, BATCH, seed=5)
    assert seen == [(epoch, batch) for epoch in range(3) for batch in expected.global_batches(epoch)]


def test_a_sampler_attached_to_a_fitting_trainer_yields_the_trainers_epoch():
    sampler = SeededBatchSampler(NUM_TRAIN, BATCH, seed=1)
    sampler.trainer = _fitting(2)  # a sampler built anew in epoch 2
    assert list(sampler) == sampler.global_batches(2)
    stream = iter(sampler)
    next(stream)  # a pass begun (Lightning prefetches when it builds the loader's iterator), then begun again
    assert list(sampler) == sampler.global_batches(2)
    sampler.load_state_dict({"epoch": 2, "consumed": 1})  # a checkpoint's position goes first
    assert list(sampler) == sampler.global_batches(2)[1:]
    sampler.trainer.state.status = "finished"  # after the fit: its own count, as without a Trainer
    fresh = SeededBatchSampler(NUM_TRAIN, BATCH, seed=1)
    fresh.trainer = sampler.trainer
    assert list(fresh) == fresh.global_batches(0)


def test_a_per_epoch_order_yields_each_epochs_batches_and_resumes_mid_epoch():
    pool = [[0, 1], [2, 3], [4, 5]]
    sampler = OrderedBatchSampler(pool, order=[[2, 0], [1, 1, 0], [2]])
    assert [len(sampler), list(sampler), len(sampler), list(sampler)] == [2, [[4, 5], [0, 1]], 3,
                                                                         [[2, 3], [2, 3], [0, 1]]]
    assert list(sampler) == [[4, 5]] and list(sampler) == [[4, 5], [0, 1]]  # then the epochs repeat
    resumed = OrderedBatchSampler(pool, order=[[2, 0], [1, 1, 0], [2]])
    resumed.load_state_dict({"epoch": 1, "consumed": 2})
    assert list(resumed) == [[0, 1]] and list(resumed) == [[4, 5]]
    attached = OrderedBatchSampler(pool, order=[[2, 0], [1, 1, 0], [2]])
    attached.trainer = _fitting(1)
    assert len(attached) == 3 and list(attached) == [[2, 3], [2, 3], [0, 1]]
    with pytest.raises(LplError, match="mixes batch positions and lists"):
        OrderedBatchSampler(pool, order=[[0], 1])
    with pytest.raises(LplError, match="epoch 1 of the per-epoch order lists no batch"):
        OrderedBatchSampler(pool, order=[[0], []])
    with pytest.raises(LplError, match="order names batch 3"):
        OrderedBatchSampler(pool, order=[[0], [3]])


@pytest.mark.parametrize("reload", [0, 1])
def test_lightning_trains_a_per_epoch_order_in_its_epochs_a_shorter_last_one_included(reload):
    pool = SeededBatchSampler(NUM_TRAIN, BATCH, seed=0).global_batches(0)
    order = [[2, 0, 1], [1, 1, 2], [0]]
    trainer, seen = _fit(PointsData(batches=pool, order=order), max_epochs=-1, max_steps=7,
                         reload_dataloaders_every_n_epochs=reload)
    assert trainer.global_step == 7
    assert seen == [(epoch, pool[i]) for epoch, ids in enumerate(order) for i in ids]


def test_a_per_epoch_order_resumes_from_a_mid_epoch_checkpoint(tmp_path):
    pool = SeededBatchSampler(NUM_TRAIN, BATCH, seed=0).global_batches(0)
    order = [[2, 0, 1], [1, 1, 2], [0]]
    every_4_steps = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _, whole = _fit(PointsData(batches=pool, order=order), max_epochs=-1, max_steps=7, callbacks=[every_4_steps])
    _, resumed = _fit(PointsData(batches=pool, order=order), ckpt_path=tmp_path / "epoch=1-step=4.ckpt",
                      max_epochs=-1, max_steps=7)
    assert resumed == whole[4:]  # the checkpoint was taken after the first batch of epoch 1


def test_a_checkpoint_at_the_end_of_a_shorter_epoch_resumes_at_the_next_epoch():
    """Lightning counts an epoch's batches when it builds the loader (the first epoch's 3 here); the last epoch
    of a per-epoch order is done after its 1."""
    sampler = OrderedBatchSampler([[0], [1], [2]], order=[[0, 1, 2], [2, 1, 0], [1]])
    trainer = _fitting(2)
    trainer.num_training_batches = 3
    trainer.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=SimpleNamespace(current=SimpleNamespace(processed=1))))
    loader = ResumableDataLoader(range(3), batch_sampler=sampler)
    loader.trainer = sampler.trainer = trainer
    assert loader.state_dict() == {"epoch": 3, "consumed": 0, "plan": sampler.plan_digest(3, 0)}
