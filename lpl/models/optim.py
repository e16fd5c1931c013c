"""Optimizer and learning-rate schedule shared by the example models: Adam(W) with linear warm-up then cosine."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from lpl.utils.errors import LplError, checked_count, finite_number

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def check_adam_options(*, optimizer: str, lr: float, weight_decay: float, betas: Any, warmup_steps: int,
                       min_lr_ratio: float, schedule: str) -> None:
    """Refuse optimizer and schedule options that would train wrongly or fail inside torch, naming them (a negative
    min_lr_ratio turned the cosine's tail into a negative learning rate: Adam climbed the loss)."""
    if optimizer not in OPTIMIZERS:
        raise LplError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    if schedule not in ("cosine", "constant"):
        raise LplError(f"schedule must be 'cosine' or 'constant', got {schedule!r}.")
    given = {"lr": lr, "weight_decay": weight_decay, "min_lr_ratio": min_lr_ratio}
    read = {name: finite_number(value) for name, value in given.items()}
    bad = [name for name, value in read.items() if value is None]
    if bad:
        raise LplError(f"{bad[0]} must be a finite number, got {given[bad[0]]!r}.")
    lr, weight_decay, min_lr_ratio = read.values()
    if lr <= 0:
        raise LplError(f"lr must be positive, got {lr}.")
    if weight_decay < 0:
        raise LplError(f"weight_decay must be >= 0, got {weight_decay}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise LplError(f"min_lr_ratio must be in [0, 1] (the cosine ends at lr * min_lr_ratio), got {min_lr_ratio}.")
    checked_count("warmup_steps", warmup_steps, 0)
    try:
        beta_values = [float(b) for b in betas]
    except (TypeError, ValueError):
        beta_values = []
    if len(beta_values) != 2 or not all(0.0 <= b < 1.0 for b in beta_values):
        raise LplError(f"betas must be two numbers in [0, 1), got {betas!r}.")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_NO_LENGTH = ("the cosine learning-rate schedule decays over the run's length, and {why}: set {limit} on the "
              "Trainer, or use schedule='constant' (--model.init_args.schedule=constant).")


def _run_length(module: Any) -> int:
    """The number of optimizer steps the fit will take, or an LplError when Lightning cannot tell it: no limit at
    all, or max_epochs over a loader without a length (estimated_stepping_batches is then inf, or max_steps=-1)."""
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise LplError(_NO_LENGTH.format(why=f"Lightning cannot tell it (estimated_stepping_batches={total}: a "
                                             "train loader without a length, or no step or epoch limit)",
                                         limit="max_steps"))
    return int(total)


def configure_adam(
    module: Any, *, optimizer: str, lr: float, weight_decay: float, betas: tuple[float, float],
    warmup_steps: int, min_lr_ratio: float, schedule: str,
) -> dict[str, Any] | torch.optim.Optimizer:
    """Build the optimizer (and, with ``schedule='cosine'``, a per-step warm-up/cosine scheduler)."""
    check_adam_options(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                       min_lr_ratio=min_lr_ratio, schedule=schedule)
    # One parameter group: the training-order tools replay Adam with a single set of hyperparameters.
    params = [p for p in module.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if schedule == "constant":
        return opt
    # The run's length is read at the first step, not here: reading it while optimizers are configured builds the
    # train loader before a resumed checkpoint is restored, and Lightning then drops the loader's saved position
    # (a mid-epoch resume would train the epoch's first batches again). Step 0 needs no length (the curve starts at
    # 1, or warms up). A plain function, not a callable object: LambdaLR would store an object's attributes (the
    # module) in checkpoints.
    # The limits themselves are read here (no loader built): a run without one has no length to decay over
    trainer = getattr(module, "_trainer", None)  # None: configured by hand, outside a fit
    # (max_epochs is None under max_time alone, -1 when set so: both no limit)
    if trainer is not None and trainer.max_steps == -1 and trainer.max_epochs in (None, -1):
        raise LplError(_NO_LENGTH.format(why=f"the Trainer has no step or epoch limit (max_steps=-1, max_epochs="
                                             f"{trainer.max_epochs}; max_time alone is no length)",
                                         limit="max_steps or max_epochs"))
    total_steps = functools.cache(lambda: _run_length(module))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup_steps, total_steps() if step else 0, min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
