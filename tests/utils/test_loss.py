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


class ManualStep(WithStep):
    """Manual optimization: the training step steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_manual_optimization_needs_a_loss_method_and_its_step_is_never_run():
    module = ManualStep()
    with pytest.raises(LplError, match="manual optimization.*def loss"):
        module_loss(module, BATCH)
    assert module.steps == 0
    module.loss = lambda batch: F.cross_entropy(module.net(batch["x"]), batch["y"])
    assert module_loss(module, BATCH).ndim == 0 and module.steps == 0
