"""The ``lpl`` command: LightningCLI (fit / validate / test / predict) plus the method helpers.

    lpl fit --config configs/mnist_vit.yaml
    lpl estimate --recording runs/rec --orders random:16
"""

from __future__ import annotations

import os
import sys
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
    """W&B without a login or network would block on a prompt: default to offline unless the user chose (a mode
    W&B takes: refused here, before any work, instead of when the first run starts)."""
    from lpl.utils.loggers import check_wandb_mode

    check_wandb_mode()
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


TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _user_error(error: BaseException) -> str | None:
    """The message for a user's mistake behind ``error`` (jsonargparse and Lightning wrap what they raise), or None
    for anything else (a bug: its traceback is kept)."""
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LplError):
            return _original_message(error)
        if isinstance(error, RuntimeError) and "more than one stateful callback of type `" in str(error):
            return _one_callback_per_trainer(str(error))
        if isinstance(error, MisconfigurationException) and _no_such_accelerator(str(error)):
            return f"{error} Pass --trainer.accelerator=cpu to run on this machine's CPU."
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


def _one_callback_per_trainer(message: str) -> str:
    """Lightning's refusal of two instances of a stateful callback, in lpl's words for lpl's callbacks (its hint, a
    unique state_key, would only lead to lpl refusing the pair), as Lightning says it for others."""
    name = message.split("`")[1]
    if name == "BlockPruneCallback":
        from lpl.prune.callback import ONE_PER_TRAINER

        return ONE_PER_TRAINER
    if name == "TrainOrderRecorder":
        return ("a Trainer takes one TrainOrderRecorder (a run is one recording); record another run in a fit of its "
                "own.")
    return message  # a configuration mistake all the same: one line, not a traceback


def _original_message(error: LplError) -> str:
    """The message of an LplError, also when torch re-raised it from a DataLoader worker process ("Caught LplError
    in DataLoader worker process 0. Original Traceback ...": the worker's traceback, the message last)."""
    text = str(error)
    kind = type(error)
    marker = f"\n{kind.__module__}.{kind.__qualname__}: "
    if not text.startswith("Caught ") or marker not in text:
        return text
    return text[text.rindex(marker) + len(marker):].strip()


def _no_such_accelerator(message: str) -> bool:
    """Whether Lightning refused the Trainer's accelerator because this machine lacks it (a GPU config on a CPU)."""
    return "can not run on your system" in message or "No supported gpu backend found" in message


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
    try:
        _default_wandb_offline()
        if argv and argv[0] in HELPER_COMMANDS:
            code = _helper(argv[0])(argv[1:])
            sys.exit(code or 0)
        try:
            from lpl.lightning_cli import run_lightning_cli

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
