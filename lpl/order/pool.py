"""The reference run's data, as the recorder and retraining see it: the pool of planned batches and each step's
batch, samples collated by id, and the validation loss as a differentiable closure."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch

from lpl.utils.errors import LplError
from lpl.utils.loss import loss_weight, module_loss, to_module


def plan_pool(batch_sampler: Any, batches_per_epoch: int, total_steps: int) -> tuple[list[list[int]], list[int]]:
    """The run's planned global batches, deduplicated into a pool, and the pool batch of each step 0..T-1."""
    pool: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    order: list[int] = []
    epoch = 0
    while len(order) < total_steps:
        planned = batch_sampler.global_batches(epoch)[:batches_per_epoch]
        if not planned:
            raise LplError(f"the train loader's batch sampler plans no batches for epoch {epoch}; check the dataset.")
        for batch in planned[: total_steps - len(order)]:
            key = tuple(int(i) for i in batch)
            if key not in index:
                index[key] = len(pool)
                pool.append(list(key))
            order.append(index[key])
        epoch += 1
    return pool, order


def collate_samples(loader: Any, ids: Sequence[int]) -> Any:
    """The samples ``ids`` of ``loader``'s dataset, collated as the loader does (on the CPU)."""
    return loader.collate_fn([loader.dataset[i] for i in ids])


def single_val_loader(loaders: Any) -> Any:
    """The one validation loader of a run: a list or tuple of one loader is that loader; several (a list, tuple or
    dict of them, as Lightning allows) are refused."""
    if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
        return loaders[0]
    if isinstance(loaders, (Sequence, Mapping)):
        raise LplError(
            f"recording, retraining and estimating take one validation loader (its loss is what every estimate "
            f"predicts), but the run has a {type(loaders).__name__} of {len(loaders)}; return a single DataLoader from "
            "val_dataloader() (join the sets with torch.utils.data.ConcatDataset to validate on all of them).")
    return loaders


def validation_loss_fn(
    loader: Any, module: L.LightningModule, forward: Callable = contextlib.nullcontext
) -> Callable[[], torch.Tensor]:
    """A closure computing the sample-weighted mean ``module_loss`` over ``loader``, differentiable (the caller
    chooses eval or train mode); ``forward`` is the precision context to run each batch in."""
    def val_loss() -> torch.Tensor:
        total, count = None, 0
        for batch in loader:
            batch = to_module(batch, module, training=False)
            size = loss_weight(batch)
            with forward():  # summed in float32: a bfloat16 module's losses would round the mean to ~3 digits
                loss = module_loss(module, batch).float() * size
            total = loss if total is None else total + loss
            count += size
        if total is None:
            raise LplError("the validation loader is empty; TrainOrderRecorder needs validation data to probe.")
        return total / count

    return val_loss
