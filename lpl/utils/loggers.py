"""Which Lightning logger a plug-in talks to (W&B gets tables and plots on top of the scalars every logger gets), and
the check of W&B's mode setting."""

from __future__ import annotations

import difflib
import os
import typing
from typing import Any

from lpl.utils.errors import LplError

# The modes W&B takes (wandb 0.31's Settings.mode); a value outside them is looked up in the installed wandb's own list
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def is_wandb(logger: Any) -> bool:
    """Whether ``logger`` is Lightning's WandbLogger, or a subclass of it."""
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def check_wandb_mode() -> None:
    """Refuse a ``WANDB_MODE`` that W&B does not take: W&B itself fails only when a run starts, after a command's work,
    with a long validation traceback."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None or mode in WANDB_MODES:
        return
    modes = _installed_wandb_modes()
    if mode in modes:
        return
    if not mode.strip():
        raise LplError(f"WANDB_MODE is set but empty: unset it (lpl then runs W&B offline unless you are logged in) or "
                       f"set one of {', '.join(modes)}.")
    close = difflib.get_close_matches(mode.strip().lower(), modes, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise LplError(f"WANDB_MODE={mode!r} is not a W&B mode{hint}: set one of {', '.join(modes)}, or unset it.")


def _installed_wandb_modes() -> tuple[str, ...]:
    """The modes the installed wandb takes, read off its settings model; ``WANDB_MODES`` when it cannot be read."""
    try:
        from wandb.sdk.wandb_settings import Settings

        return typing.get_args(Settings.model_fields["mode"].annotation) or WANDB_MODES
    except (ImportError, AttributeError, KeyError):
        return WANDB_MODES
