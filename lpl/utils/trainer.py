"""Plumbing the callbacks share: process rank under torch.distributed, and Lightning's loader state on resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from lpl.utils.errors import LplError

_single_process = False  # set by ``single_process()``


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside an initialised process group, and inside
    ``single_process()``."""
    if not _single_process and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Within the block ``rank_and_world()`` is (0, 1) whatever process group is initialised: for a one-process
    Trainer (retraining a recording; ``TrainOrderRecorder`` enters it for a one-device fit) run in a script after a
    DDP fit, whose process group Lightning leaves initialised; the lpl batch samplers would otherwise give it only
    this rank's share of every batch."""
    global _single_process
    previous, _single_process = _single_process, True
    try:
        yield
    finally:
        _single_process = previous


def restore_loader_position(trainer: L.Trainer) -> bool:
    """Give the train loader the position a resumed checkpoint saved, when Lightning dropped it; True if it did.

    Lightning builds the train loader early when ``trainer.estimated_stepping_batches`` is read before the checkpoint's
    loop state is restored (in ``configure_optimizers`` or ``on_fit_start``, as Lightning's own docs suggest for
    schedulers); it then never hands the loader its saved state and a mid-epoch resume trains the epoch's first
    batches again (https://github.com/Lightning-AI/pytorch-lightning/issues/20550). Called from ``on_train_start``
    (after the restore, before the first batch is drawn for training), it loads that state and restarts the loader's
    iterator there. It reads Lightning's private loop attributes and does nothing when they are not there.
    """
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if not pending or fetcher is None or getattr(fit_loop, "_combined_loader", None) is None:
        return False
    fit_loop._load_combined_loader_states()
    iter(fetcher)  # the iterator built before the restore started at the epoch's first batch
    return True


@contextlib.contextmanager
def metrics_unsynced(module: torch.nn.Module) -> Iterator[None]:
    """The module's torchmetrics compute without gathering from other processes (one process of a leftover process
    group trains alone: a gather would wait on ranks that left), and sync as before afterwards."""
    import torchmetrics

    metrics = [m for m in module.modules() if isinstance(m, torchmetrics.Metric)]
    before = [metric.sync_on_compute for metric in metrics]
    for metric in metrics:
        metric.sync_on_compute = False
    try:
        yield
    finally:
        for metric, sync in zip(metrics, before):
            metric.sync_on_compute = sync


def check_replicated_strategy(trainer: L.Trainer, who: str) -> None:
    """Refuse strategies that shard the model or its optimizer state (FSDP, DeepSpeed, tensor parallelism): ``who``
    reads and writes whole weights, gradients and Adam moments, which every process holds only under one device or
    DDP."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy):
        return
    raise LplError(f"{who} runs on one device or under DDP (strategy='ddp'), where every process holds the whole "
                   f"model and optimizer state; this run's {type(strategy).__name__} shards them. Use one of those "
                   "for this run.")


def weight_averaging_callbacks() -> tuple[type, ...]:
    """Lightning's callbacks that write averaged weights into the model when training ends (those this Lightning
    has: StochasticWeightAveraging, WeightAveraging with EMAWeightAveraging)."""
    from lightning.pytorch import callbacks

    return tuple(getattr(callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging")
                 if hasattr(callbacks, name))


def fit_val_loaders(trainer: L.Trainer) -> Any:
    """The validation loader(s) of the trainer's fit (the datamodule's, or those given to fit() or defined by the
    module), as returned (one loader, or a list or dict of several); None without validation data."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if trainer.datamodule is not None and is_overridden("val_dataloader", trainer.datamodule):
        return trainer.datamodule.val_dataloader()
    if trainer.val_dataloaders is not None:
        return trainer.val_dataloaders
    # loaders given to fit() or defined by the module: Lightning builds them only when it first validates
    source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
    return source.dataloader() if source is not None and source.is_defined() else None


def own_metric_states(module: torch.nn.Module) -> None:
    """Give every torchmetrics Metric in ``module`` state tensors of its own (a reset makes fresh ones). Under
    ddp_spawn on CPU the processes receive the module through shared memory and Lightning unshares only parameters
    and buffers: every process added into one metric state (a lost update gave val/ppl 237.3 for 254.2)."""
    import torchmetrics

    for metric in module.modules():
        if isinstance(metric, torchmetrics.Metric):
            metric.reset()
