"""The Trainer commands of ``lpl`` (fit / validate / test / predict): Lightning's LightningCLI with lpl's additions.

Its classes live at module level so that ``--trainer.strategy=ddp_spawn`` can pickle the CLI and its callback into
the processes it starts (classes local to a function cannot be pickled).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lpl.utils.errors import LplError


class LastValidationStep(L.Callback):
    """The global step of a fit's last validation run (its metrics are that step's weights')."""

    step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


class LplCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path best`` in a new process and prints the final metrics."""

    def before_validate(self) -> None:
        resolve_best(self.config_init["validate"], self.trainer)

    def before_test(self) -> None:
        resolve_best(self.config_init["test"], self.trainer)

    def before_predict(self) -> None:
        resolve_best(self.config_init["predict"], self.trainer)

    def before_fit(self) -> None:
        self.last_validation = LastValidationStep()
        self.trainer.callbacks.append(self.last_validation)

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        if "val/acc" in metrics:
            validated = getattr(getattr(self, "last_validation", None), "step", None)
            if stage == "fit" and validated is not None and validated != self.trainer.global_step:
                print(f"validation accuracy at step {validated} (the last validation; training ended at step "
                      f"{self.trainer.global_step}): {metrics['val/acc']:.4f}")
            else:
                print(f"final validation accuracy: {metrics['val/acc']:.4f}")
        if metrics:
            print(f"{stage} metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> LplCLI:
    """Build (and with ``run``, run) the LightningCLI: any LightningModule / LightningDataModule by class path."""
    with warnings.catch_warnings():
        # an argument list given on purpose (`lpl prune` builds the CLI from its own): not the mistake it warns of
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LplCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def resolve_best(init: Any, trainer: L.Trainer) -> None:
    """``--ckpt_path best`` in a new process: Lightning knows the best checkpoint only in the process that trained,
    so read it off the ModelCheckpoint state the run saved in ``last.ckpt`` of the callback's folder. ``init``: the
    subcommand's parsed arguments (a jsonargparse Namespace), whose ``ckpt_path`` this sets."""
    callback = trainer.checkpoint_callback
    if init.get("ckpt_path") != "best" or callback is None or callback.best_model_path:
        return  # Lightning decides (and explains what is missing)
    if not callback.dirpath:
        raise LplError("--ckpt_path best: the run's ModelCheckpoint has no dirpath, so a new process cannot find the "
                       "run's checkpoints; pass a checkpoint file (or give ModelCheckpoint a dirpath).")
    # the newest last*.ckpt, as Lightning resolves 'last': a fresh run in a folder an earlier run used writes last-v1
    lasts = sorted(Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"),
                   key=lambda path: path.stat().st_mtime)
    last = lasts[-1] if lasts else Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    best = None
    if last.is_file():
        try:
            # memory-mapped: only the callbacks' state is read, not the weights and optimizer state
            states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
        except Exception as error:  # unreadable: said below, as for a missing one
            states = {}
            warnings.warn(f"lpl: could not read {last} ({type(error).__name__}).", stacklevel=2)
        state = states.get(callback.state_key) or next(
            (v for k, v in states.items() if k.startswith("ModelCheckpoint") and v.get("best_model_path")), {})
        best = state.get("best_model_path") or None
    if best is None or not Path(best).is_file():
        found = f"it names {best}, which is gone" if best else "there is none, or it records no best checkpoint"
        raise LplError(f"--ckpt_path best: a new process reads the best checkpoint off the run's last checkpoint "
                       f"({last}), and {found}; pass a checkpoint file or 'last'.")
    init["ckpt_path"] = best
