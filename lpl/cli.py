"""The ``lpl`` command: LightningCLI (fit / validate / test / predict) plus the method helpers.

    lpl fit --config configs/mnist_vit.yaml
    lpl estimate --recording runs/rec --orders random:16
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from lpl.utils.errors import LplError

# Method subcommands that are not Trainer entry points: name -> (module, function taking argv, one-line summary).
HELPER_COMMANDS: dict[str, tuple[str, str, str]] = {
    "prune": ("lpl.prune.commands", "prune_main", "block-prune a trained model's Linear layers, save the result"),
    "estimate": ("lpl.order.commands", "estimate_main", "estimate the final loss of batch orders from a recording"),
    "curriculum": ("lpl.order.commands", "curriculum_main", "search a batch order by estimated loss"),
    "position-map": ("lpl.order.commands", "position_map_main", "end loss of each batch by its position"),
    "sensitivity": ("lpl.order.commands", "sensitivity_main",
                    "add full-space data to a recording (methods linearized, adjoint)"),
    "check-methods": ("lpl.order.commands", "check_methods_main",
                      "score every estimation method against retrained orders"),
}


def _default_wandb_offline() -> None:
    """W&B without a login or network would block on a prompt: default to offline unless the user chose."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in Path(netrc).read_text(encoding="utf-8", errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def _helper(name: str) -> Callable[[list[str]], int | None]:
    import importlib

    module_name, function, _ = HELPER_COMMANDS[name]
    return getattr(importlib.import_module(module_name), function)


def run_lightning_cli(args: list[str] | None = None, run: bool = True):
    """Build (and with ``run``, run) the LightningCLI: any LightningModule / LightningDataModule by class path."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class LastValidationStep(L.Callback):
        """The global step of a fit's last validation run (its metrics are that step's weights')."""

        step: int | None = None

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.step = trainer.global_step

    class LplCLI(LightningCLI):
        def before_validate(self) -> None:
            _resolve_best(self.config_init["validate"], self.trainer)

        def before_test(self) -> None:
            _resolve_best(self.config_init["test"], self.trainer)

        def before_predict(self) -> None:
            _resolve_best(self.config_init["predict"], self.trainer)

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


TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _resolve_best(init: Any, trainer: Any) -> None:
    """``--ckpt_path best`` in a new process: Lightning knows the best checkpoint only in the process that trained,
    so read it off the ModelCheckpoint state the run saved in ``last.ckpt`` of the callback's folder."""
    callback = trainer.checkpoint_callback
    if init.get("ckpt_path") != "best" or callback is None or callback.best_model_path:
        return  # Lightning decides (and explains what is missing)
    import torch

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


def _user_error(error: BaseException) -> str | None:
    """The message for a user's mistake behind ``error`` (jsonargparse and Lightning wrap what they raise), or None
    for anything else (a bug: its traceback is kept)."""
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LplError):
            return str(error)
        if isinstance(error, MisconfigurationException):  # a Trainer setting Lightning refuses
            return f"{error} (a Trainer or LightningModule setting; see `lpl fit --help`)"
        if isinstance(error, FileNotFoundError) and "checkpoint" in str(error).lower():
            return f"{error}: give --ckpt_path an existing checkpoint file (or 'last' / 'best' of the config's folder)."
        if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return (f"the checkpoint could not be read: it is not a Lightning checkpoint, is truncated, or holds "
                    f"objects other than tensors and plain values ({first}).")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _print_helper_commands(file: Any = None) -> None:
    print("\nmethod commands (lpl COMMAND --help for each):", file=file)
    for name, (_, _, summary) in HELPER_COMMANDS.items():
        print(f"  {name:<15} {summary}", file=file)


def _suggest_command(name: str) -> None:
    """After LightningCLI refused an unknown subcommand: the helper commands too, and the nearest name."""
    import difflib

    _print_helper_commands(sys.stderr)
    close = difflib.get_close_matches(name, [*TRAINER_COMMANDS, *HELPER_COMMANDS], n=1)
    if close:
        print(f"\nlpl: unknown command {name!r}; did you mean {close[0]!r}?", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The ``lpl`` command: a helper command by name (``lpl prune``, ``lpl estimate``, ...), else the LightningCLI."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _default_wandb_offline()
    try:
        if argv and argv[0] in HELPER_COMMANDS:
            code = _helper(argv[0])(argv[1:])
            sys.exit(code or 0)
        try:
            # from the command line LightningCLI reads sys.argv itself (given them as args too, it warns every run)
            run_lightning_cli(None if from_command_line else argv)
        except SystemExit:
            if not argv or argv[0] in ("-h", "--help"):  # the Trainer commands' help, then ours
                _print_helper_commands()
            elif not argv[0].startswith("-") and argv[0] not in TRAINER_COMMANDS:
                _suggest_command(argv[0])
            raise
    except Exception as error:
        message = _user_error(error)
        if message is None:
            raise
        print(f"lpl: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
