"""User-facing errors: one or two lines that say what was wrong and what to do."""

from __future__ import annotations

import math
import operator
import sys
from pathlib import Path
from typing import Any, Callable


class LplError(ValueError):
    """A mistake in user input (a config value, a file, an argument).

    The CLI prints the message alone (no traceback) and exits with code 2.
    """


def checked_count(name: str, value: Any, minimum: int) -> int:
    """An int argument (a numpy int too) of at least ``minimum``, or an LplError naming it: a float or bool passes a
    range check and then miscounts (calib_batches=2.5 calibrated on the whole loader)."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise LplError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return count


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is one finite real number (Python, numpy, or a one-element tensor or array, as
    configs and torch hand them over), else None: bools (boolean tensors too), strings, NaN and inf are not."""
    if isinstance(value, (bool, str, bytes)) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def run_script(main: Callable[[], Any]) -> None:
    """Run a script's ``main``: a user mistake ends it with its message alone (exit code 2), as the ``lpl`` command
    does, and an int it returns is the exit code."""
    try:
        code = main()
    except LplError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
