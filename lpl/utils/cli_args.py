"""Command-line plumbing shared by the ``lpl`` method commands and the benchmark scripts: a parser that accepts both
flag spellings, argparse types for output folders and files, counts and fractions, and the device check."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lpl.utils.errors import LplError

if TYPE_CHECKING:
    import torch


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose long options take both spellings, ``--batch_size`` and ``--batch-size`` (LightningCLI
    writes the first, most tools the second), and whose help shows defaults unless ``defaults_in_help=False``."""

    def __init__(self, *args: Any, defaults_in_help: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a prefix would match both spellings of one option: ambiguous
        if defaults_in_help:
            kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        others = [_other_spelling(flag) for flag in flags if flag.startswith("--")]
        others = [flag for flag in others if flag is not None and flag not in flags]
        if others and "dest" not in kwargs:
            kwargs["dest"] = next(flag for flag in flags if flag.startswith("--"))[2:].replace("-", "_")
        return super().add_argument(*flags, *others, **kwargs)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help with "(default: X)" after options that have a default worth saying (not None, not a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and not action.required and not (default is None or default is False
                                                                         or default == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _other_spelling(flag: str) -> str | None:
    name = flag[2:]
    if "-" in name:
        return "--" + name.replace("-", "_")
    if "_" in name:
        return "--" + name.replace("_", "-")
    return None


def output_dir(text: str) -> Path:
    """An argparse ``type`` for output folders: refused at parse time (before any work) when a file is in the way."""
    path = Path(text)
    try:
        _check_writable(text, path)
    except OSError as error:  # a path the system cannot even look up (a name too long for the file system)
        raise argparse.ArgumentTypeError(f"{text!r}: {error.strerror or error}; choose another path.") from None
    return path


def _check_writable(text: str, path: Path) -> None:
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r}: {str(part)!r} is a file, not a folder; choose another path.")
        if part.exists():  # the deepest existing folder: where the outputs (or their folders) get created
            if not os.access(part, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {str(part)!r} (no permission, or a "
                                                 "read-only file system); choose another path.")
            break


def output_file(text: str) -> Path:
    """An argparse ``type`` for an output file: refused at parse time when it is a folder or its folder cannot be
    created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; --out takes a file path (markdown).")
    output_dir(str(path.parent))  # a file in the way of its folder, or no permission: ArgumentTypeError
    return path


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for counts that may be 0."""
    return _int_at_least(text, 0)


def generator_seed(text: str) -> int:
    """An argparse ``type`` for a random generator's seed: a whole number torch's generators take."""
    value = _int_at_least(text, -(2**63))
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {value}.")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number.") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}.")
    return value


def comma_separated(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated list of names from ``choices`` (``what``: a name's kind, for the
    error)."""
    def names(text: str) -> list[str]:
        picked = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in picked if name not in choices]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(map(repr, unknown)) or repr(text)}: "
                                             f"choose from {', '.join(choices)} (comma-separated).")
        return picked

    return names


def unit_fraction(text: str) -> float:
    """An argparse ``type`` for a fraction kept (FLOPs, blocks): a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number.") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}.")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type`` for a duration or budget in seconds: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number.") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}.")
    return value


def device_argument(parser: argparse.ArgumentParser, name: str, types: tuple[str, ...] = ("cpu", "cuda")
                    ) -> "torch.device":
    """``--device name`` as a device this machine has (of ``types``), or the parser's usage error saying what to
    pass: checked before any work."""
    try:
        return checked_device(name, types)
    except LplError as error:
        parser.error(str(error))


def checked_device(name: str, types: tuple[str, ...] = ("cpu", "cuda")) -> "torch.device":
    """``name`` as a torch device this machine has and this build can run, of one of ``types`` (cpu and cuda unless
    the caller allows more), or an LplError saying what to pass instead. A meta device (shapes, no data) is refused
    always."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LplError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "meta" or device.type not in types:
        why = " (a meta device holds tensor shapes only, no data)" if device.type == "meta" else ""
        runs = " or ".join(t for t in types if t != "meta")
        raise LplError(f"--device {name!r}: this runs on {runs}{why}.")
    if not _available(device.type):
        lacks = ("no CUDA GPU is visible on this machine" if device.type == "cuda"
                 else f"this machine or its torch build cannot run {device.type}")
        raise LplError(f"--device {name}: {lacks}; use --device cpu.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LplError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    return device


def _available(device_type: str) -> bool:
    """Whether this torch build and machine can run ``device_type`` (cuda, mps, xpu, ...: its backend's
    ``is_available``)."""
    import torch

    if device_type == "cpu":
        return True
    if device_type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, device_type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else False
