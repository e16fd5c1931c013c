"""The loss protocol: how method code asks any LightningModule for its loss on a batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lpl.utils.errors import LplError


def module_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    """Scalar training loss of ``module`` on ``batch``.

    Uses ``module.loss(batch)`` when the module defines it (every ``lpl`` example does), else
    ``module.training_step(batch, 0)``, which may return a tensor or a dict holding ``"loss"``.
    """
    if callable(getattr(module, "loss", None)):
        out = module.loss(batch)
    elif callable(getattr(module, "training_step", None)):
        out = module.training_step(batch, 0)
    else:
        raise LplError(
            f"{type(module).__name__} has neither a `loss(batch)` method nor a `training_step`; "
            "add `def loss(self, batch) -> Tensor` returning the scalar training loss."
        )
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        raise LplError(
            f"{type(module).__name__}'s loss must be a scalar tensor (or a dict with a scalar 'loss'), "
            f"got {type(out).__name__}; return the mean loss of the batch."
        )
    return out
