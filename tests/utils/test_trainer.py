"""Strategy checks the callbacks share."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lpl.order import TrainOrderRecorder
from lpl.prune import BlockPruneCallback
from lpl.prune.callback import _check_trainer as check_prune_trainer
from lpl.utils.errors import LplError
from lpl.utils.trainer import check_replicated_strategy


def _unbuilt(strategy: type) -> object:
    """An instance without running __init__ (FSDP and DeepSpeed need a GPU or their package to be built)."""
    return strategy.__new__(strategy)


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy])
def test_strategies_that_shard_the_model_are_refused_by_both_callbacks(strategy):
    trainer = SimpleNamespace(strategy=_unbuilt(strategy), callbacks=[],
                              optimizers=[torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])])
    with pytest.raises(LplError, match=f"BlockPruneCallback runs on one device or under DDP.*{strategy.__name__}"):
        check_prune_trainer(BlockPruneCallback(), trainer)
    with pytest.raises(LplError, match=f"TrainOrderRecorder runs on one device or under DDP.*{strategy.__name__}"):
        TrainOrderRecorder._check_trainer(trainer, None)


def test_one_device_and_ddp_pass():
    check_replicated_strategy(L.Trainer(accelerator="cpu", devices=1, logger=False), "x")
    check_replicated_strategy(SimpleNamespace(strategy=_unbuilt(DDPStrategy)), "x")
