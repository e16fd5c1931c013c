"""Command-line plumbing shared by the ``lpl`` method commands: a parser that accepts both flag spellings, and
argparse types for output folders and counts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


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


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}.")
    return value
