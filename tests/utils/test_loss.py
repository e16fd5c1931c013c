"""module_loss: which of a module's methods gives its loss on a batch."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpl.utils.errors import LplError
from lpl.utils.loss import module_loss

BATCH = {"x": torch.randn(6, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2])}


class WithStep(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch["x"]), batch["y"])
        self.log("train/loss", loss)  # silenced on probes
        return {"loss": loss}


class WithCriterion(WithStep):
    def __init__(self) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss()


class WithHelper(WithStep):
    def loss(self, logits, target):
        return F.cross_entropy(logits, target) * 100.0


class WithProtocol(WithStep):
    def loss(self, batch):
        return F.cross_entropy(self.net(batch["x"]), batch["y"]) * 2.0


def test_a_criterion_attribute_or_a_helper_named_loss_is_not_the_batch_protocol():
    for cls in (WithStep, WithCriterion, WithHelper):
        torch.manual_seed(0)
        model = cls()
        torch.manual_seed(0)
        reference = WithStep()
        torch.testing.assert_close(module_loss(model, BATCH), module_loss(reference, BATCH))
    torch.manual_seed(0)
    protocol = WithProtocol()
    torch.manual_seed(0)
    torch.testing.assert_close(module_loss(protocol, BATCH), 2.0 * module_loss(WithStep(), BATCH))


def test_a_module_with_neither_or_a_non_scalar_loss_is_refused():
    with pytest.raises(LplError, match="neither a `loss\\(batch\\)` method nor a `training_step`"):
        module_loss(nn.Linear(2, 2), BATCH)

    class Vector(WithStep):
        def loss(self, batch):
            return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")

    with pytest.raises(LplError, match="must be a scalar tensor"):
        module_loss(Vector(), BATCH)
