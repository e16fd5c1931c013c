"""Which Lightning logger a plug-in talks to (W&B gets tables and plots on top of the scalars every logger gets)."""

from __future__ import annotations

from typing import Any


def is_wandb(logger: Any) -> bool:
    """Whether ``logger`` is Lightning's WandbLogger, or a subclass of it."""
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)
