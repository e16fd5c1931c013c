"""What every example DataModule shares: indexed samples, seeded or explicit batch orders, eval loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from lpl.data.samplers import OrderedBatchSampler, SeededBatchSampler, _ResumableBatchSampler
from lpl.utils.errors import LplError


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning treats as stateful, so its batch sampler's position survives a checkpoint.

    Workers and Lightning's prefetching fetcher draw batches ahead of training, so the sampler's own count runs
    ahead of the steps taken; with ``trainer`` set (the DataModules do), the saved position is the number of batches
    Lightning actually trained in this epoch, so a resume neither skips nor repeats a batch.
    """

    trainer: Any = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        # fitting, not trainer.training: a checkpoint saved when a mid-epoch validation ends is taken in the
        # validating stage, and the sampler's count then runs ahead by what the workers prefetched
        if trainer is None or trainer.state.fn != "fit":
            return self.batch_sampler.state_dict()
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        # Lightning counts an epoch's batches when it builds the loader; a shorter epoch of a per-epoch order
        # (OrderedBatchSampler) ends before that count
        epoch, consumed = trainer.current_epoch, trained
        if trained >= min(trainer.num_training_batches, len(self.batch_sampler)):
            epoch, consumed = trainer.current_epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed, "plan": self.batch_sampler.plan_digest(epoch, consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def attach_trainer(loader: Any, trainer: Any) -> None:
    """Give ``trainer`` to an lpl loader and batch sampler built without it (by the user, not an lpl DataModule) or
    for an earlier Trainer (a loader reused by the next fit): a sampler then follows this Trainer's epoch and ranks,
    and the loader saves the batches trained, not those its workers prefetched. Anything else is left alone."""
    for part in (loader, getattr(loader, "batch_sampler", None)):
        if isinstance(part, (ResumableDataLoader, _ResumableBatchSampler)) and part.trainer is not trainer:
            part.trainer = trainer


class IndexedDataModule(L.LightningDataModule):
    """Base for the example DataModules.

    Subclasses implement ``build_datasets() -> (train, val)``; samples are dicts with an ``index`` entry.
    The training loader is either seeded (``order`` and ``batches`` unset: reshuffled per epoch from ``seed``) or
    explicit: ``batches`` (lists of training sample ids; default: one seeded epoch, ``train_batches()``) visited in
    ``order`` (positions in ``batches``, or one list of them per epoch: see ``OrderedBatchSampler``).
    """

    def __init__(
        self,
        batch_size: int,
        seed: int,
        batches: list[list[int]] | None,
        order: list[int] | list[list[int]] | None,
        eval_batch_size: int,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise LplError(
                f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}."
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.batches = batches
        self.order = order
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self._log_clashing_hparams_apart()
        if self.train_set is None:
            self.train_set, self.val_set = self.build_datasets()
            if self.batches is None and len(self.train_set) < self.batch_size:  # given batches set their own sizes
                raise LplError(
                    f"batch_size {self.batch_size} is larger than the {len(self.train_set)} training samples; lower it."
                )

    def _log_clashing_hparams_apart(self) -> None:
        """Log this module's hyperparameters under ``data/`` when the model's share a name with other values (a
        model taking any image size has img_size=None, the data 28): Lightning would refuse to merge them and stop
        the fit. Runs in setup, before the Trainer logs them."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        if module is None or not trainer.loggers or not self._log_hyperparams:
            return
        ours, theirs = self.hparams_initial, module.hparams_initial
        if any(key != "_class_path" and (type(ours[key]) is not type(theirs[key]) or ours[key] != theirs[key])
               for key in ours.keys() & theirs.keys()):
            self._log_hyperparams = False  # the Trainer logs the model's alone
            for logger in trainer.loggers:
                logger.log_hyperparams({f"data/{key}": value for key, value in ours.items() if key != "_class_path"})

    def loader_kwargs(self) -> dict[str, Any]:
        """Extra DataLoader arguments (workers, pinning); in-memory example datasets need none."""
        return {}

    def train_batches(self) -> list[list[int]]:
        """The default pool: one seeded epoch of training batches (lists of sample ids)."""
        self.setup()
        return SeededBatchSampler(len(self.train_set), self.batch_size, self.seed).global_batches(0)

    def train_batch_sampler(self) -> SeededBatchSampler | OrderedBatchSampler:
        self.setup()
        if self.batches is None and self.order is None:
            return SeededBatchSampler(len(self.train_set), self.batch_size, self.seed)
        sampler = OrderedBatchSampler(self.batches if self.batches is not None else self.train_batches(), self.order)
        bad = [i for batch in sampler.batches for i in batch if i >= len(self.train_set)]
        if bad:
            raise LplError(
                f"batches name sample id {bad[0]}, but the training set has ids 0..{len(self.train_set) - 1}."
            )
        return sampler

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_batch_sampler()
        loader = ResumableDataLoader(self.train_set, batch_sampler=sampler, **self.loader_kwargs())
        loader.trainer = sampler.trainer = self.trainer
        return loader

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, **self.loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
